"""Genant's semi-quantitative scales and each level's normal vertebral shape: what the grading
(:mod:`.grading`) measures a vertebra's losses against (SPEC §4).

Losses are fractions (0.2 = 20 % lost). **Scales** (Genant et al., JBMR 1993): the height-loss
boundaries :data:`GRADE_BOUNDARIES` (:func:`genant_grade`, ``borderline`` within
:data:`BORDERLINE_MARGIN` of one) and the area-loss boundaries :data:`AREA_BOUNDARIES`, which
:func:`reader_grade` combines with the heights as a reader grades height and area together.
**Normal shape**: each level's expected Ha/Hp (:data:`NORMAL_HA_HP`), from which follow its normal
Hm/Hp and its normal height at any depth fraction relative to its posterior height
(:func:`normal_shape_at`; fractions from the anterior wall, as in :mod:`.morphometry`). Losses
are taken against it, not against a flat box, so that physiological wedging is not called a
fracture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from . import morphometry

# ------------------------------------------------------------------------------------------------
# Scales
# ------------------------------------------------------------------------------------------------

GRADE_BOUNDARIES = (0.20, 0.25, 0.40)
"""Height-loss fractions where the Genant grade steps 0→1, 1→2 and 2→3 (Genant et al., JBMR 1993)."""

BORDERLINE_MARGIN = 0.03
"""A loss within this distance (3 percentage points) of a grade boundary is ``borderline``."""

AREA_BOUNDARIES = (0.10, 0.20, 0.40)
"""Area-loss fractions where Genant's grade steps 0→1, 1→2 and 2→3: a reduction of the projected
vertebral area of about 10–20 % (grade 1), 20–40 % (grade 2) and over 40 % (grade 3) (Genant et
al., JBMR 1993)."""


def genant_grade(height_loss: float) -> int:
    """Genant semi-quantitative grade of a height-loss fraction (Genant et al., JBMR 1993):
    0 below 0.20, 1 for [0.20, 0.25), 2 for [0.25, 0.40], 3 above 0.40.

    Raises ``ValueError`` for NaN (an unmeasured vertebra has no grade)."""
    if math.isnan(height_loss):
        raise ValueError("a NaN height loss has no Genant grade")
    return _band_grade(height_loss, GRADE_BOUNDARIES)


def is_borderline(height_loss: float, margin: float = BORDERLINE_MARGIN) -> bool:
    """True when the loss lies strictly within ``margin`` of a Genant grade boundary (20, 25, 40 %)."""
    return any(abs(height_loss - boundary) < margin for boundary in GRADE_BOUNDARIES)


def _band_grade(loss: float, boundaries: Sequence[float]) -> int:
    """Grade of a loss against three boundaries (grade 1 from the first, 2 from the second, 3 above
    the third), 0 for NaN."""
    if not math.isfinite(loss):
        return 0
    if loss < boundaries[0]:
        return 0
    if loss < boundaries[1]:
        return 1
    return 2 if loss <= boundaries[2] else 3


def reader_grade(shape_loss: float, size_loss: float, area_loss: float,
                 height_boundaries: Sequence[float] = GRADE_BOUNDARIES,
                 area_boundaries: Sequence[float] = AREA_BOUNDARIES) -> tuple[int, str]:
    """Genant grade from a vertebra's losses, and its basis (``shape``, ``size``, ``shape+size``
    or ``normal``): the larger of the *shape grade* (the largest shape loss against the height
    boundaries) and the *size grade* (the size loss against the height boundaries, but no higher
    than the area loss's grade against the area boundaries: a body that is short against its
    neighbours is fractured when its area is lost too, as Genant grades height and area
    together). NaN size or area losses give no size grade."""
    shape_grade = _band_grade(shape_loss, height_boundaries)
    size_grade = min(_band_grade(size_loss, height_boundaries), _band_grade(area_loss, area_boundaries))
    grade = max(shape_grade, size_grade)
    if grade == 0:
        return 0, "normal"
    return grade, ("shape+size" if shape_grade == size_grade else "shape" if shape_grade > size_grade else "size")


# ------------------------------------------------------------------------------------------------
# Normal shape
# ------------------------------------------------------------------------------------------------

NORMAL_HA_HP: dict[str, float] = {
    "T6": 0.95, "T7": 0.94, "T8": 0.94, "T9": 0.95,
    "T11": 0.93, "T12": 0.91, "L1": 0.93,
    "L5": 1.14,
}
"""Expected Ha/Hp of a normal (unfractured) vertebra per level; 1.0 for levels not listed.

Mild physiological anterior wedging in the mid-thoracic kyphosis (T6–T9) and at the
thoraco-lumbar junction (T11–L1), and L5's short posterior wall (anterior taller than posterior).
The values approximate published normal values for adult vertebrae; they are round numbers
chosen for this product, not taken from one specific study. They are the same table the
synthetic phantom uses for its normal vertebrae (``phantom_anatomy.PHYSIOLOGICAL_HA_HP``; a test
checks that the two agree)."""


def normal_ha_hp(level: str, normal_shape: Mapping[str, float] = NORMAL_HA_HP) -> float:
    """Expected normal Ha/Hp of ``level`` (1.0 when the table does not list it)."""
    return float(normal_shape.get(str(level).upper(), 1.0))


def normal_hm_hp(level: str, normal_shape: Mapping[str, float] = NORMAL_HA_HP) -> float:
    """Expected normal Hm/Hp of ``level``: ``(1 + Ha/Hp) / 2``, the middle height of a normal body
    lying halfway between its anterior and posterior heights."""
    return 0.5 * (1.0 + normal_ha_hp(level, normal_shape))


AP_SPAN_START, AP_SPAN_END = morphometry.AP_FRACTIONS["ha"], morphometry.AP_FRACTIONS["hp"]
"""Depth fractions (from the anterior wall) of the Ha and Hp lines, where the normal shape's chord ends."""


def normal_shape_at(level: str, fraction, normal_shape: Mapping[str, float] = NORMAL_HA_HP):
    """The level's normal height at a depth fraction relative to its posterior height: ``Ha/Hp``
    at 15 %, 1 at 85 %, linear in between (and beyond)."""
    r = normal_ha_hp(level, normal_shape)
    return 1.0 + (r - 1.0) * (AP_SPAN_END - fraction) / (AP_SPAN_END - AP_SPAN_START)
