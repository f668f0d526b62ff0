"""The per-vertebra records of the QC picture (:class:`QCVertebra`): everything :mod:`.qc` draws
of one vertebra, built by :func:`qc_vertebrae` from the morphometry, its grades and the trabecular
HU.

Points and axes are RAS millimetres, heights millimetres, height losses fractions; a value not
measured is NaN, a vertebra without a grade has ``genant_grade`` None. The records accept the
library's own results or any records (objects or mappings) with the same names, so that a caller
can draw results from elsewhere. Kept apart from the drawing so that the records are built and
checked without matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

NAN = float("nan")

HU_ATTRIBUTES = ("trabecular_hu_mean", "mean_hu", "hu_mean", "mean", "trabecular_hu")
"""Attribute (or key) names under which an HU record may carry its mean (see :func:`qc_vertebrae`)."""

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


def _get(record, name, default=None):
    """``record[name]`` of a mapping, ``record.name`` of an object: callers may pass either."""
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def _float(value) -> float:
    """``value`` as a finite float, NaN when it is missing, not a number or not finite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return NAN
    return value if math.isfinite(value) else NAN


def _hu_value(record) -> float:
    """Mean HU of an HU record: a number, or an object / mapping with one of :data:`HU_ATTRIBUTES`
    (NaN for None or a record without one)."""
    if isinstance(record, (int, float, np.number)):
        return _float(record)
    for name in HU_ATTRIBUTES:
        value = _get(record, name)
        if value is not None:
            return _float(value)
    return NAN


def hu_by_level(hu) -> dict[str, float]:
    """``{LEVEL: HU}`` from a mapping level → HU record, or from records that carry ``level``."""
    if not hu:
        return {}
    if isinstance(hu, Mapping):
        return {str(k).upper(): _hu_value(v) for k, v in hu.items()}
    return {str(_get(r, "level")).upper(): _hu_value(r) for r in hu if _get(r, "level") is not None}


def qc_vertebrae(heights: Sequence, grades: Sequence | Mapping | None = None,
                 hu: Mapping | Sequence | None = None) -> list[QCVertebra]:
    """Build the QC records from the morphometry, its grades and the trabecular HU.

    ``heights``: :class:`~.morphometry.VertebraHeights` (or records with the same attributes:
    ``level``, ``complete``, ``ha_mm``/``hm_mm``/``hp_mm``, ``frame`` with ``centre``/``ap``/``cc``,
    ``height_lines_ras``, ``flags``); ``grades``: :class:`~.grading.VertebraGrade` per vertebra,
    as a list in the same order or a mapping level → grade (default: :func:`~.grading.grade_spine`
    of ``heights``); ``hu``: optional trabecular HU per level: a mapping level → HU, where the HU
    is a number or an object / mapping carrying it under one of :data:`HU_ATTRIBUTES` (such as
    :class:`~.attenuation.TrabecularROI`'s ``mean_hu``), or a list of such records that carry
    their ``level``."""
    heights = list(heights)
    if grades is None:
        from ..measure.grading import grade_spine

        grades = grade_spine(heights)
    if isinstance(grades, Mapping):
        by_level = {str(k).upper(): g for k, g in grades.items()}
    else:
        grades = list(grades)
        if len(grades) != len(heights):
            raise ValueError("grades must have one entry per vertebra of heights")
        by_level = {str(_get(h, "level")).upper(): g for h, g in zip(heights, grades)}
    by_level_hu = hu_by_level(hu)
    records = []
    for h in heights:
        level = str(_get(h, "level")).upper()
        grade = by_level.get(level)
        frame = _get(h, "frame")
        lines = {key: (np.asarray(top, float), np.asarray(bottom, float))
                 for key, (top, bottom) in (_get(h, "height_lines_ras") or {}).items()}
        flags = list(_get(h, "flags") or [])
        if grade is not None:
            flags += [f for f in (_get(grade, "flags") or []) if f not in flags]
        complete = bool(_get(h, "complete")) and (grade is None or bool(_get(grade, "complete", True)))
        records.append(QCVertebra(
            level=level,
            complete=complete,
            centre_ras=None if frame is None else np.asarray(frame.centre, float),
            ap_ras=None if frame is None else np.asarray(frame.ap, float),
            cc_ras=None if frame is None else np.asarray(frame.cc, float),
            height_lines_ras=lines,
            ha_mm=_float(_get(h, "ha_mm")), hm_mm=_float(_get(h, "hm_mm")), hp_mm=_float(_get(h, "hp_mm")),
            genant_grade=None if grade is None else _get(grade, "genant_grade"),
            shape="" if grade is None else str(_get(grade, "shape") or ""),
            height_loss=NAN if grade is None else _float(_get(grade, "grade_loss", _get(grade, "height_loss"))),
            borderline=False if grade is None else bool(_get(grade, "borderline")),
            trabecular_hu=by_level_hu.get(level, NAN),
            flags=flags,
            **_grade_basis(h, grade),
        ))
    return records


def _grade_basis(heights, grade) -> dict:
    """The QC fields that show why a vertebra got its grade: its measured outline, the expected
    superior endplate and the lost part (empty without an outline or an expected profile)."""
    outline = {key: np.asarray(points, float) for key, points in (_get(heights, "endplate_outline_ras") or {}).items()}
    expected = tuple(_get(grade, "expected_profile_mm") or ()) if grade is not None else ()
    frame = _get(heights, "frame")
    if set(outline) != {"superior", "inferior"} or frame is None or len(expected) != len(outline["inferior"]):
        return {"outline_ras": outline}
    expected = np.asarray(expected, float)
    cc = np.asarray(frame.cc, float)
    measured = (outline["superior"] - outline["inferior"]) @ cc
    depression = _get(heights, "endplate_depression_mm") or (NAN, NAN)
    side = "inferior" if _float(depression[1]) > _float(depression[0]) else "superior"
    return {"outline_ras": outline, "expected_superior_ras": outline["inferior"] + expected[:, None] * cc,
            "lost": measured <= (1.0 - LOST_HEIGHT) * expected, "depressed_side": side}
