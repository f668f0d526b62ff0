"""How far a vertebra's reported result can be trusted, in one number, and whether the exam needs
a reader's review.

**Per vertebra** (``confidence``, 0–1, None without a grade): the probability that the grade is
right given the image's noise, times a factor for each known reason to doubt it:

* *noise*: the grade's loss (``grade_loss``) read as normally distributed with the SD the
  heights' SDs give it (``height_loss_sd``, at least :data:`MIN_LOSS_SD`); the probability mass
  inside the grade's band of :data:`.genant.GRADE_BOUNDARIES`. A 30 % loss with an SD of 1 %
  gives 1.00; a 24 % loss with an SD of 2 % (a boundary 1 point away) about 0.6;
* *its reference* (:data:`REFERENCE_FACTORS`): one-sided or no reference height, a crushed
  neighbour left out;
* *its identity* (:data:`LEVELS_DOUBTFUL_FACTOR`): the level check doubts the labels;
* *what it is* (:data:`PATHOLOGY_FACTOR`): a suspected lesion or hardware — its shape then does
  not measure osteoporosis;
* *how it lies in the scan* (:data:`LATERAL_TILT_FACTOR`): tilted laterally against the slices
  beyond the tilts validated (flag ``lateral_tilt``, :mod:`.spine_shape`).

**Per exam** (``review``): ``needed`` with its ``reasons``: a fractured vertebra below
:data:`REVIEW_BELOW`, a grade the noise leaves open, doubtful levels, a suspected lesion or
hardware, a mask off the bone, a fracture whose body could not be checked for a lesion (a
collapse leaves no core: the fracture may be pathological), a fracture on a vertebra tilted beyond
the validated tilts.

The factors are the project's judgement, not fitted values: each halves or less what a reader
would trust in the result for that reason; they order the vertebrae for review and are not
probabilities of being right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .genant import GRADE_BOUNDARIES

MIN_LOSS_SD = 0.01
"""Smallest SD of a loss (1 point): the model's own error when the noise is negligible."""

REFERENCE_FACTORS = {"one_sided_reference": 0.9, "no_reference": 0.7, "crushed_neighbour_excluded": 0.9}
"""Grading flags that weaken the reference heights, with their factors."""

LEVELS_DOUBTFUL_FACTOR = 0.6
"""When the level check doubts the labels: the grade may belong to another level."""

PATHOLOGY_FACTOR = 0.3
"""A suspected lesion or hardware: the shape may be pathological, not osteoporotic."""

PATHOLOGY_FLAGS = frozenset({"suspected_lesion", "instrumented"})

LATERAL_TILT_FACTOR = 0.7
"""Tilted laterally beyond the tilts at which the heights were validated."""

REVIEW_BELOW = 0.8
"""A fractured vertebra with a lower confidence makes the exam need a review."""


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def grade_probability(grade: int, loss: float, loss_sd: float) -> float:
    """The probability that a loss measured as ``loss`` with SD ``loss_sd`` lies in ``grade``'s
    band of :data:`.genant.GRADE_BOUNDARIES` (0–1)."""
    edges = (-math.inf, *GRADE_BOUNDARIES, math.inf)
    sd = max(loss_sd if math.isfinite(loss_sd) else 0.0, MIN_LOSS_SD)
    low, high = edges[grade], edges[grade + 1]
    return _normal_cdf((high - loss) / sd) - _normal_cdf((low - loss) / sd)


def vertebra_confidence(grade, flags: Sequence[str], levels_doubtful: bool) -> float | None:
    """The confidence (0–1, two decimals) in a graded vertebra's result (see the module
    docstring); None without a grade. ``grade``: its :class:`.grading.VertebraGrade`;
    ``flags``: all its flags (morphometry, grading, ROI, lesions)."""
    if grade.genant_grade is None:
        return None
    loss = min(1.0, max(0.0, grade.grade_loss)) if math.isfinite(grade.grade_loss) else 0.0
    value = grade_probability(grade.genant_grade, loss, grade.height_loss_sd)
    for flag, factor in REFERENCE_FACTORS.items():
        if flag in flags:
            value *= factor
    if levels_doubtful:
        value *= LEVELS_DOUBTFUL_FACTOR
    if PATHOLOGY_FLAGS.intersection(flags):
        value *= PATHOLOGY_FACTOR
    if "lateral_tilt" in flags:
        value *= LATERAL_TILT_FACTOR
    return round(value, 2)


def review_reasons(rows: Sequence[dict], levels_doubtful: bool) -> list[str]:
    """Why the exam needs a reader's review (empty: it does not). ``rows``: the
    ``vertebrae.csv`` rows with their ``confidence``."""
    why: list[str] = []  # sentences, not flags
    low = [r["level"] for r in rows if r.get("genant_grade") and r.get("confidence") is not None
           and r["confidence"] < REVIEW_BELOW]
    if low:
        why.append(f"fracture with confidence below {REVIEW_BELOW:g}: {', '.join(low)}")
    open_grades = [r["level"] for r in rows if "grade_uncertain" in r["flags"]]
    if open_grades:
        why.append(f"grade left open by the image's noise: {', '.join(open_grades)}")
    if levels_doubtful:
        why.append("level labels doubtful (see level_check)")
    for flag, words in (("suspected_lesion", "suspected lesion"), ("instrumented", "cement or screws"),
                        ("mask_off_bone", "segmentation off the bone"),
                        ("lesions_not_assessed", "fracture whose body could not be checked for a lesion")):
        levels = [r["level"] for r in rows if flag in r["flags"]]
        if levels:
            why.append(f"{words}: {', '.join(levels)}")
    tilted = [r["level"] for r in rows if "lateral_tilt" in r["flags"] and r.get("genant_grade")]
    if tilted:
        why.append(f"fracture on a vertebra tilted beyond the validated 30°: {', '.join(tilted)}")
    return why
