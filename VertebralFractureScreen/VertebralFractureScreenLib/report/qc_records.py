"""The per-vertebra records of the QC picture (:class:`QCVertebra`): everything :mod:`.qc` draws
of one vertebra, built by :func:`qc_vertebrae` from the morphometry, its grades and the trabecular
HU.

Points and axes are RAS millimetres, heights millimetres, height losses fractions; a value not
measured is NaN, a vertebra without a grade has ``genant_grade`` None. The records are built from
the library's own results (:class:`~.morphometry.VertebraHeights`, :class:`~.grading.VertebraGrade`
and the trabecular HU per level); a caller with results from elsewhere builds :class:`QCVertebra`
records itself. Kept apart from the drawing so that the records are built and checked without
matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only named in annotations: grading is imported when it is needed
    from ..measure.grading import VertebraGrade
    from ..measure.morphometry import VertebraHeights

NAN = float("nan")

LOST_HEIGHT = 0.20
"""A point of the outline whose height is this fraction or more below the expected one is drawn
as lost (Genant's grade-1 height reduction)."""


@dataclass
class QCVertebra:
    """Everything the QC picture shows of one vertebra. Points and axes in RAS mm.

    ``centre_ras`` (body centre) and ``ap_ras`` (unit vector towards anterior) place the vertebra
    on the spine's centre line; without a centre it is listed in the title only. ``cc_ras`` (unit,
    superior) is only needed when the spine has one vertebra. ``height_lines_ras`` maps
    ``"ha"``/``"hm"``/``"hp"`` to the (superior, inferior) end points of each measured height.
    ``genant_grade`` is None for an ungraded vertebra; ``height_loss`` a fraction;
    ``trabecular_hu`` NaN when not measured."""

    level: str
    complete: bool = False
    centre_ras: np.ndarray | None = None
    ap_ras: np.ndarray | None = None
    cc_ras: np.ndarray | None = None
    height_lines_ras: dict = field(default_factory=dict)
    ha_mm: float = NAN
    hm_mm: float = NAN
    hp_mm: float = NAN
    genant_grade: int | None = None
    shape: str = ""
    height_loss: float = NAN
    borderline: bool = False
    trabecular_hu: float = NAN
    flags: list[str] = field(default_factory=list)
    confidence: float = NAN
    """Trust in the result, 0–1 (``measure/confidence.py``); NaN when not given."""
    outline_ras: dict = field(default_factory=dict)
    """The measured endplates in the mid-sagittal plane, ``superior``/``inferior`` → (N, 3) RAS
    points along the depth (``morphometry.VertebraHeights.endplate_outline_ras``)."""
    expected_superior_ras: np.ndarray | None = None
    """Where the superior endplate would lie with the expected normal heights (the grading's
    ``expected_profile_mm``) over the measured inferior endplate: the basis of the grade."""
    lost: np.ndarray | None = None
    """Per outline point, whether its height is :data:`LOST_HEIGHT` or more below the expected:
    the depressed part of the endplate."""
    depressed_side: str = "superior"
    """The endplate drawn as depressed: the one deeper below its chord."""


def qc_vertebrae(heights: Sequence[VertebraHeights],
                 grades: Sequence[VertebraGrade] | Mapping[str, VertebraGrade] | None = None,
                 hu: Mapping[str, float] | None = None) -> list[QCVertebra]:
    """Build the QC records from the morphometry, its grades and the trabecular HU.

    ``heights``: the :class:`~.morphometry.VertebraHeights` of the exam; ``grades``: their
    :class:`~.grading.VertebraGrade`, as a list in the same order or a mapping level → grade
    (default: :func:`~.grading.grade_spine` of ``heights``); ``hu``: optional trabecular mean HU
    per level, a mapping level → HU (NaN or absent where not measured; e.g.
    ``{r.level: r.mean_hu for r in rois}`` of :func:`~.attenuation.measure_trabecular`'s ROIs)."""
    heights = list(heights)
    if grades is None:
        from ..measure.grading import grade_spine

        grades = grade_spine(heights)
    if isinstance(grades, Mapping):
        by_level = dict(grades)
    else:
        grades = list(grades)
        if len(grades) != len(heights):
            raise ValueError("grades must have one entry per vertebra of heights")
        by_level = {h.level: g for h, g in zip(heights, grades)}
    hu = hu or {}
    records = []
    for h in heights:
        grade = by_level.get(h.level)
        frame = h.frame
        lines = {key: (np.asarray(top, float), np.asarray(bottom, float))
                 for key, (top, bottom) in h.height_lines_ras.items()}
        flags = list(h.flags)
        if grade is not None:
            flags += [f for f in grade.flags if f not in flags]
        records.append(QCVertebra(
            level=h.level,
            complete=bool(h.complete) and (grade is None or grade.complete),
            centre_ras=None if frame is None else np.asarray(frame.centre, float),
            ap_ras=None if frame is None else np.asarray(frame.ap, float),
            cc_ras=None if frame is None else np.asarray(frame.cc, float),
            height_lines_ras=lines,
            ha_mm=float(h.ha_mm), hm_mm=float(h.hm_mm), hp_mm=float(h.hp_mm),
            genant_grade=None if grade is None else grade.genant_grade,
            shape="" if grade is None else grade.shape,
            height_loss=NAN if grade is None else float(grade.grade_loss),
            borderline=False if grade is None else bool(grade.borderline),
            trabecular_hu=float(hu.get(h.level, NAN)),
            flags=flags,
            **_grade_basis(h, grade),
        ))
    return records


def _grade_basis(heights: VertebraHeights, grade: VertebraGrade | None) -> dict:
    """The QC fields that show why a vertebra got its grade: its measured outline, the expected
    superior endplate and the lost part (empty without an outline or an expected profile)."""
    outline = {key: np.asarray(points, float) for key, points in heights.endplate_outline_ras.items()}
    expected = tuple(grade.expected_profile_mm) if grade is not None else ()
    frame = heights.frame
    if set(outline) != {"superior", "inferior"} or frame is None or len(expected) != len(outline["inferior"]):
        return {"outline_ras": outline}
    expected = np.asarray(expected, float)
    cc = np.asarray(frame.cc, float)
    measured = (outline["superior"] - outline["inferior"]) @ cc
    superior, inferior = heights.endplate_depression_mm
    side = "inferior" if inferior > superior else "superior"  # NaN: not measured, superior
    return {"outline_ras": outline, "expected_superior_ras": outline["inferior"] + expected[:, None] * cc,
            "lost": measured <= (1.0 - LOST_HEIGHT) * expected, "depressed_side": side}
