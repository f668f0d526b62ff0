"""Semi-quantitative fracture grading from vertebral heights (SPEC §4), and the grade as a reader
gives it.

Two grades per vertebra. ``quantitative_grade`` is SPEC §4's: Genant's height boundaries applied
to ``height_loss`` (below). ``genant_grade`` grades as a reader of Genant's method does
(:func:`reader_grade`, derivation in ``docs/methods.md``): against the normal profile expected
from the nearest unfractured neighbours and the level's proportions (:func:`expected_profile`), at
the middle region's deepest point, by height and sagittal area together. ``grade_basis`` says
which part decided.

Pure functions, no I/O. Input: one :class:`~.morphometry.VertebraHeights` per vertebra, cranial
to caudal (a caller holding heights in another form, such as the phantom's ``truth["vertebrae"]``
rows, builds them). Output: one :class:`VertebraGrade` per input record, same order.

Definitions (Ha, Hm, Hp: anterior, middle and posterior heights; ``r`` the level's expected
normal Ha/Hp from :data:`NORMAL_HA_HP`, in :mod:`.genant` with Genant's scales):

* ``ha_hp = Ha/Hp`` and ``hm_hp = Hm/Hp`` as measured;
* **wedge loss** ``1 - (Ha/Hp) / r``;
* **biconcave loss** ``1 - (Hm/Hp) / m`` with ``m = (1 + r) / 2`` (the middle height of a normal
  body lies halfway between its anterior and posterior heights);
* **crush loss** ``1 - Hp / Hp_ref`` where ``Hp_ref`` is the level's *expected* posterior height
  from its adjacent complete vertebrae (see :func:`grade_spine`);
* **height loss** = the largest of the three, clipped to [0, 1]; **shape** its argmax,
  ``normal`` below grade 1; **Genant grade** and **borderline** from :func:`genant_grade` and
  :func:`is_borderline`.
* **grade uncertainty**: when the heights carry their standard deviations (``ha_sd_mm``,
  ``hm_sd_mm``, ``hp_sd_mm`` of :class:`~.morphometry.VertebraHeights`: the CT's noise, at least
  the fit's model error, NaN when not measured),
  each loss gets its SD by first-order propagation (the reference's from the neighbours' Hp SDs),
  and a vertebra whose grade differs between all losses lowered by :data:`UNCERTAIN_SDS` SDs and
  all raised by as many is flagged ``grade_uncertain``. SPEC §4 fixes ``borderline`` at 3
  percentage points whatever the image; this flag says where the image's own precision leaves
  the grade open (thick slices, an endplate lying along a slice), and stays off where it does not.

Losses are taken relative to each level's expected *normal shape*, not to a flat box: that is
how the physiological wedging of T11–L1 (and of the mid-thoracic kyphosis) and L5's short
posterior wall (Ha > Hp) are kept from being called fractures (SPEC §4 false-positive sources).
Schmorl's nodes are handled upstream (heights come from the whole central band in
:mod:`.morphometry`, a median over its lines or a fit over its voxels with a bounded lateral term) and scoliosis by measuring in each vertebra's own frame; a level
misidentification shows here only as a gap in the level sequence, which is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import levels as lv
from ..anatomy import normal_body
from . import morphometry
from .genant import (AP_SPAN_END, AP_SPAN_START, AREA_BOUNDARIES, BORDERLINE_MARGIN, GRADE_BOUNDARIES, NORMAL_HA_HP,
                     genant_grade, is_borderline, normal_ha_hp, normal_hm_hp, normal_shape_at, reader_grade)

# ------------------------------------------------------------------------------------------------
# Grading
# ------------------------------------------------------------------------------------------------

CRUSH_SUSPECT_RATIO = 0.80
"""A vertebra whose Hp is below this fraction of what a neighbour predicts is not used as a
reference for its neighbours (it may be crushed itself)."""

LOSS_DECIMALS = 9
"""Losses are rounded to this many decimals, so that a ratio exactly on a grade boundary grades as
the boundary says instead of by floating-point noise (1 - 0.8 = 0.19999999999999996)."""

UNCERTAIN_SDS = 2.0
"""A grade is ``grade_uncertain`` when the losses moved by this many standard deviations (down,
and up) give different grades: about a 95 % interval for each loss."""

SHAPES = ("wedge", "biconcave", "crush")
"""Fracture shapes, in the order used to break a tie of equal losses."""

NAN = float("nan")


@dataclass
class VertebraGrade:
    """Grade of one vertebra. Ratios and losses are fractions (NaN when not available); losses
    are relative to the level's expected normal shape and may be negative before clipping
    (only ``height_loss`` is clipped to [0, 1]).

    ``flags`` holds the grading's own flags only (not the morphometry's):

    * ``not_graded``: S1 (or a level outside C1–S1), never graded;
    * ``heights_missing``: marked complete but a height is NaN or not positive — treated as
      incomplete (``complete`` is then False);
    * ``one_sided_reference``: Hp_ref from one neighbour only;
    * ``no_reference``: no usable neighbour, no crush criterion (``crush_loss`` NaN);
    * ``crushed_neighbour_excluded``: a neighbour was left out of Hp_ref as crush-suspect;
    * ``level_gap``: the level next to this one on that side is absent from the input (possible
      level misidentification or missing vertebra); no reference is taken across the gap;
    * ``grade_uncertain``: the heights' noise leaves the grade open (see the module docstring).

    ``height_loss_sd``: SD of ``height_loss`` from the heights' SDs (the SD of the loss that
    decides it; NaN when the heights carry none). The three heights' errors are treated as
    independent; they partly share their endplates, which cancels in the ratios, so this errs on
    the large side.
    """

    level: str
    complete: bool
    ha_hp: float = NAN
    hm_hp: float = NAN
    hp_ref_mm: float = NAN
    hp_ref_ratio: float = NAN
    wedge_loss: float = NAN
    biconcave_loss: float = NAN
    crush_loss: float = NAN
    height_loss: float = NAN
    genant_grade: int | None = None
    shape: str = ""
    borderline: bool = False
    height_loss_sd: float = NAN
    flags: list[str] = field(default_factory=list)
    quantitative_grade: int | None = None
    """The SPEC §4 grade: :func:`genant_grade` of ``height_loss`` alone."""
    quantitative_shape: str = ""
    """The SPEC §4 shape (argmax of the three ratio losses), ``normal`` below grade 1."""
    reference_levels: list[str] = field(default_factory=list)
    """The unfractured neighbours the expected normal shape comes from (nearest on each side)."""
    expected_ha_mm: float = NAN
    expected_hm_mm: float = NAN
    expected_hp_mm: float = NAN
    """Expected normal heights (mm) at 15 %, at the middle region's deepest point and at 85 % of
    the depth, from the reference neighbours and the level's normal proportions
    (:func:`expected_profile`)."""
    expected_profile_mm: tuple[float, ...] = ()
    """Expected normal height (mm) at each of ``morphometry.PROFILE_FRACTIONS``."""
    middle_loss: float = NAN
    """Loss of the middle region's smallest height against the expected shape scaled to the
    vertebra's own posterior height (the deepest point of a depression, not a fixed position)."""
    size_loss: float = NAN
    """The largest loss of Ha, the middle minimum or Hp against the expected heights."""
    area_loss: float = NAN
    """Loss of the sagittal area against the expected outline on the vertebra's own depth."""
    endplate_depression: float = NAN
    """The deeper endplate's depression below its chord, as a fraction of the expected middle
    height (``morphometry.VertebraHeights.endplate_depression_mm``)."""
    grade_loss: float = NAN
    """The loss behind ``genant_grade``: the largest shape loss, or the size loss when the size
    decided (``grade_basis == "size"``). ``borderline`` is True when moving every loss by
    :data:`BORDERLINE_MARGIN` changes ``genant_grade``."""
    grade_basis: str = ""
    """What decided ``genant_grade``: ``shape`` (the vertebra's own proportions), ``size`` (its
    heights against its neighbours, confirmed by its area), ``shape+size`` or ``normal``."""

    @property
    def graded(self) -> bool:
        return self.genant_grade is not None

    @property
    def fractured(self) -> bool:
        return self.genant_grade is not None and self.genant_grade >= 1


def _positive(value: float) -> float:
    """A measured length or area: ``value`` when finite and positive, else NaN (not measured)."""
    value = float(value)
    return value if math.isfinite(value) and value > 0.0 else NAN


def _sd(value: float) -> float:
    """A height's SD (mm), 0 when not measured (NaN: mask-only heights)."""
    value = float(value)
    return value if math.isfinite(value) and value >= 0.0 else 0.0


def _ratio_sd(top: float, top_sd: float, bottom: float, bottom_sd: float) -> float:
    """First-order SD of ``top / bottom`` for independent errors."""
    return abs(top / bottom) * math.hypot(top_sd / top, bottom_sd / bottom)


def _uncertain(losses: Mapping[str, float], sds: Mapping[str, float]) -> bool:
    """Whether the grade of the largest loss differs between every loss lowered and every loss
    raised by :data:`UNCERTAIN_SDS` of its SD."""
    def grade(sign: float) -> int:
        loss = max(loss + sign * UNCERTAIN_SDS * sds[shape] for shape, loss in losses.items())
        return genant_grade(min(1.0, max(0.0, loss)))

    return grade(-1.0) != grade(+1.0)


def _round(value: float) -> float:
    return round(value, LOSS_DECIMALS) if math.isfinite(value) else NAN


def _position(level: str) -> int | None:
    try:
        return lv.level_position(level)
    except ValueError:
        return None

def grade_spine(heights: Iterable[morphometry.VertebraHeights],
                normal_shape: Mapping[str, float] = NORMAL_HA_HP) -> list[VertebraGrade]:
    """Grade every vertebra of one spine (SPEC §4). ``heights``: one
    :class:`~.morphometry.VertebraHeights` per vertebra, each level once (a level given twice
    raises ``ValueError``). Returns one :class:`VertebraGrade` per input record, in input order.

    **Who is graded.** A vertebra is graded when it is ``complete`` and its Ha, Hm, Hp are finite
    and positive. Others get ``genant_grade = None`` and ``shape = ''``: they never produce a
    fracture call and are never used as a reference. S1 is never graded and never a reference
    (it is not a free vertebral body); levels outside C1–S1 (e.g. VerSe's L6/T13) are not graded.

    **Reference height.** The expected posterior height of a level from its neighbours, one level
    above and one below (only the immediately adjacent levels; a missing, incomplete or S1
    neighbour leaves that side empty; nothing is taken across a gap in the level sequence).
    Each neighbour ``n`` predicts ``Hp_n · m_n / m`` for this level, where ``m = (1 + r) / 2`` is
    a level's normal Hm/Hp: ``Hp · m`` is the mean height of a body of normal shape, which
    varies smoothly along the spine, whereas Hp alone jumps where the normal shape changes. With
    all ``r = 1`` this is exactly the mean of the neighbours' Hp (SPEC §4's example); for L5,
    whose only reference is L4 (S1 never is one), it expects ``Hp_L5 = Hp_L4 / 1.07`` because of
    L5's short posterior wall, instead of calling that shortness a crush. ``Hp_ref`` is the mean
    of the predictions; ``hp_ref_ratio = Hp / Hp_ref`` and ``crush_loss = 1 - hp_ref_ratio``.
    A neighbour's Hp is robust to its own wedge or biconcave fracture but not to a crush, so in
    a first pass every gradeable vertebra whose Hp is below :data:`CRUSH_SUSPECT_RATIO` of the
    prediction of *either* neighbour is marked crush-suspect (checking each neighbour separately
    keeps two adjacent crushes from hiding each other), and the second pass leaves suspects out
    of their neighbours' references.

    ``normal_shape`` maps level → expected normal Ha/Hp (default :data:`NORMAL_HA_HP`; 1.0 for
    levels not in it).

    **Reader-like grade.** After the SPEC's losses (kept as ``quantitative_grade`` and
    ``quantitative_shape``), ``genant_grade``, ``shape``, ``borderline`` and the expected heights
    come from :func:`reader_grade` of each vertebra's shape, size and area losses against
    :func:`expected_profile`. Where the heights have no ``height_profile_mm`` (empty), ``hm_min_mm``,
    ``hm_min_fraction``, ``sagittal_area_mm2``, ``depth_mm`` or ``endplate_depression_mm`` (NaN),
    the profile is the line through Ha, Hm and Hp, the middle minimum Hm at 50 % and the area the
    profile's.
    """
    records = list(heights)
    levels = [r.level.upper() for r in records]
    seen: set[str] = set()
    for name in levels:
        if name in seen:
            raise ValueError(f"level {name} occurs twice in the heights to grade")
        seen.add(name)
    positions = [_position(name) for name in levels]
    grades, gradeable, hp, sds = _start_grades(records, levels, positions)
    neighbours = _adjacent_gradeable(positions, gradeable, grades)
    m_norm = [normal_hm_hp(name, normal_shape) for name in levels]

    def prediction(i: int, j: int) -> float:
        """Hp that neighbour ``j`` predicts for vertebra ``i``."""
        return hp[j] * m_norm[j] / m_norm[i]

    suspect = [gradeable[i] and any(hp[i] < CRUSH_SUSPECT_RATIO * prediction(i, j) for j in neighbours[i])
               for i in range(len(records))]

    for i, grade in enumerate(grades):
        if not gradeable[i]:
            continue
        used = [j for j in neighbours[i] if not suspect[j]]
        if len(used) < len(neighbours[i]):
            grade.flags.append("crushed_neighbour_excluded")
        _grade_by_ratios(grade, hp[i], sds[i], [prediction(i, j) for j in used],
                         [sds[j][2] * m_norm[j] / m_norm[i] for j in used],
                         normal_ha_hp(levels[i], normal_shape), m_norm[i])
    _read_like_a_reader(records, levels, positions, grades, gradeable, normal_shape)
    return grades


def _start_grades(records: list[morphometry.VertebraHeights], levels: list[str], positions: list[int | None]):
    """One :class:`VertebraGrade` per record with its measured ratios and flags, whether it is
    gradeable (complete, measured, a level from C1 to L5), its Hp (mm) and its heights' SDs
    ``(Ha, Hm, Hp)`` (mm, 0 when not given)."""
    s1 = lv.level_position("S1")
    grades: list[VertebraGrade] = []
    gradeable: list[bool] = []
    hp: list[float] = []
    sds: list[tuple[float, float, float]] = []  # Ha, Hm, Hp SDs (mm), 0 when not given
    for record, name, position in zip(records, levels, positions):
        a, m, p = _positive(record.ha_mm), _positive(record.hm_mm), _positive(record.hp_mm)
        hp.append(p)
        sds.append((_sd(record.ha_sd_mm), _sd(record.hm_sd_mm), _sd(record.hp_sd_mm)))
        measured = all(math.isfinite(x) for x in (a, m, p))
        complete = bool(record.complete) and measured
        grade = VertebraGrade(level=name, complete=complete)
        if record.complete and not measured:
            grade.flags.append("heights_missing")
        if measured:
            grade.ha_hp, grade.hm_hp = a / p, m / p
        ok = complete and position is not None and position != s1
        if position is None or position == s1:
            grade.flags.append("not_graded")
        gradeable.append(ok)
        grades.append(grade)
    return grades, gradeable, hp, sds


def _adjacent_gradeable(positions: list[int | None], gradeable: list[bool],
                        grades: list[VertebraGrade]) -> list[list[int]]:
    """Indices of each vertebra's gradeable neighbours one level above and below; a level missing
    inside the sequence's span flags ``level_gap``."""
    by_position = {p: i for i, p in enumerate(positions) if p is not None}
    present = sorted(by_position)
    first, last = (present[0], present[-1]) if present else (0, -1)
    neighbours: list[list[int]] = []
    for i, position in enumerate(positions):
        found = []
        if position is not None:
            for step in (-1, 1):
                j = by_position.get(position + step)
                if j is None:
                    if first <= position + step <= last:
                        grades[i].flags.append("level_gap")
                elif gradeable[j]:
                    found.append(j)
        neighbours.append(found)
    return neighbours


def _grade_by_ratios(grade: VertebraGrade, hp: float, sds: tuple[float, float, float], predictions: list[float],
                     prediction_sds: list[float], r: float, m: float) -> None:
    """Set SPEC §4's grade of a gradeable vertebra (also kept as ``quantitative_grade`` and
    ``quantitative_shape``): ``Hp_ref`` the mean of its neighbours' ``predictions`` of its Hp
    (SDs ``prediction_sds``), the wedge, biconcave and crush losses against the level's normal
    Ha/Hp ``r`` and Hm/Hp ``m``, and the grade's uncertainty from the heights' ``sds``."""
    sd_a, sd_m, sd_p = sds
    crush_sd = NAN
    if predictions:
        grade.hp_ref_mm = sum(predictions) / len(predictions)
        grade.hp_ref_ratio = hp / grade.hp_ref_mm
        ref_sd = math.hypot(*prediction_sds) / len(predictions)
        crush_sd = _ratio_sd(hp, sd_p, grade.hp_ref_mm, ref_sd)
        if len(predictions) == 1:
            grade.flags.append("one_sided_reference")
    else:
        grade.flags.append("no_reference")

    grade.wedge_loss = _round(1.0 - grade.ha_hp / r)
    grade.biconcave_loss = _round(1.0 - grade.hm_hp / m)
    grade.crush_loss = _round(1.0 - grade.hp_ref_ratio)
    losses = {"wedge": grade.wedge_loss, "biconcave": grade.biconcave_loss, "crush": grade.crush_loss}
    loss_sds = {"wedge": _ratio_sd(hp * grade.ha_hp, sd_a, hp, sd_p) / r,
                "biconcave": _ratio_sd(hp * grade.hm_hp, sd_m, hp, sd_p) / m, "crush": crush_sd}
    finite = {shape: loss for shape, loss in losses.items() if math.isfinite(loss)}
    worst = max(SHAPES, key=lambda s: finite.get(s, -math.inf))  # first of equal maxima
    grade.height_loss = min(1.0, max(0.0, finite[worst]))
    grade.genant_grade = genant_grade(grade.height_loss)
    grade.shape = worst if grade.genant_grade >= 1 else "normal"
    grade.borderline = is_borderline(grade.height_loss)
    if any(x > 0.0 for x in (sd_a, sd_m, sd_p)):
        grade.height_loss_sd = loss_sds[worst]
        if _uncertain(finite, loss_sds):
            grade.flags.append("grade_uncertain")
    grade.quantitative_grade, grade.quantitative_shape = grade.genant_grade, grade.shape


def exam_fracture_summary(grades: Sequence[VertebraGrade], pathological: Sequence[str] = ()) -> dict:
    """Fracture summary of one exam (for ``exam.json``, SPEC §5).

    ``max_grade``: highest Genant grade among graded vertebrae (None when none was graded);
    ``fractured_levels``: levels with grade ≥ 1, cranial to caudal as given; ``count``: their
    number; ``graded_levels``: number of graded vertebrae; ``borderline_levels``: graded levels
    whose loss lies near a grade boundary; ``uncertain_grade_levels``: graded levels whose grade
    the heights' noise leaves open (flag ``grade_uncertain``); ``possibly_pathological_levels``:
    graded levels of ``pathological`` (a suspected lesion or hardware) with grade ≥ 1: reported
    here, not counted as osteoporotic fractures in the others."""
    graded = [g for g in grades if g.genant_grade is not None]
    counted = [g for g in graded if g.level not in pathological]
    fractured = [g.level for g in counted if g.genant_grade >= 1]
    return {
        "max_grade": max((g.genant_grade for g in counted), default=None),
        "fractured_levels": fractured,
        "count": len(fractured),
        "possibly_pathological_levels": [g.level for g in graded if g.level in pathological and g.genant_grade >= 1],
        "graded_levels": len(graded),
        "borderline_levels": [g.level for g in graded if g.borderline],
        "uncertain_grade_levels": [g.level for g in graded if "grade_uncertain" in g.flags],
    }


# ------------------------------------------------------------------------------------------------
# The reader's grade: expected normal shape from the neighbours, height and area together
# ------------------------------------------------------------------------------------------------

REFERENCE_REACH = 3
"""How many levels away an unfractured neighbour may be taken from, on each side, when the
adjacent one is fractured or not measured (a run of up to five fractured vertebrae still has a
reference on each side)."""

SIZE_SUSPECT_RATIO = 0.85
"""A vertebra whose mean chord height, per its level's nominal height, is below this fraction of
the spine's median is not a reference: a run of crushed vertebrae would otherwise make each other
look normal. A normal body rarely lies 15 % below its spine's median size, and one that does only
hands the reference to the next vertebra."""

PROFILE_FRACTIONS = tuple(float(f) for f in morphometry.PROFILE_FRACTIONS)
"""Depth fractions of a height profile (``morphometry.PROFILE_FRACTIONS``: every 5 % from 15 % to
85 % of the depth, from the anterior wall)."""


def _profile(record: morphometry.VertebraHeights) -> list[float] | None:
    """The vertebra's height profile at :data:`PROFILE_FRACTIONS` (mm): its own when it has one
    measured throughout, else the line through Ha, Hm and Hp (mask-only heights); None when
    unmeasured."""
    own = record.height_profile_mm
    if len(own) == len(PROFILE_FRACTIONS) and all(math.isfinite(h) and h > 0 for h in own):
        return [float(h) for h in own]
    a, m, p = _positive(record.ha_mm), _positive(record.hm_mm), _positive(record.hp_mm)
    if not all(math.isfinite(x) for x in (a, m, p)):
        return None
    middle = morphometry.AP_FRACTIONS["hm"]
    return [float(np.interp(f, (AP_SPAN_START, middle, AP_SPAN_END), (a, m, p))) for f in PROFILE_FRACTIONS]


def _middle_minimum(record: morphometry.VertebraHeights, profile: list[float]) -> tuple[float, float]:
    """The middle region's smallest height and its depth fraction: the vertebra's own when
    measured, else Hm at 50 %."""
    value, where = _positive(record.hm_min_mm), float(record.hm_min_fraction)
    if math.isfinite(value) and math.isfinite(where):
        return value, where
    return profile[PROFILE_FRACTIONS.index(0.5)], 0.5


def _interp(fraction: float, values: Sequence[float]) -> float:
    """Linear interpolation of a profile at a depth fraction."""
    step = PROFILE_FRACTIONS[1] - PROFILE_FRACTIONS[0]
    x = min(max((fraction - PROFILE_FRACTIONS[0]) / step, 0.0), len(values) - 1.0)
    k = min(int(x), len(values) - 2)
    return values[k] + (values[k + 1] - values[k]) * (x - k)


def expected_profile(level: str, neighbours: Sequence[tuple[str, Sequence[float]]],
                     normal_shape: Mapping[str, float] = NORMAL_HA_HP) -> list[float]:
    """Expected normal height profile of ``level`` (mm at :data:`PROFILE_FRACTIONS`) from
    unfractured neighbours ``(level, profile)``, in three parts:

    * **size**: the mean of the neighbour's anterior and posterior heights (its chord's mean),
      carried from its level's nominal mean body height to this level's (the bodies grow
      caudally, about 4 % a level in the lower thoracic spine), averaged over the neighbours;
    * **chord**: the line from anterior to posterior of the level's normal proportions
      (:func:`normal_shape_at`: T11–L1 wedging, L5's short posterior wall), as the SPEC's
      ratio losses use it; a neighbour's own wedging is not carried over, since the normal
      wedging changes sign across the thoraco-lumbar junction;
    * **concavity**: how far the neighbours' endplates lie inside their own chords at each depth
      (real endplates are concave: mid-depth heights about 10 % below the chord), averaged.
    """
    names = (level, *(n for n, _ in neighbours))
    size = {name: normal_body(name).height_mm for name in names}
    last = len(PROFILE_FRACTIONS) - 1
    chord_mean, concavity = 0.0, [0.0] * len(PROFILE_FRACTIONS)
    for name, h in neighbours:
        chord_mean += 0.5 * (h[0] + h[last]) * size[level] / size[name] / len(neighbours)
        for k in range(len(PROFILE_FRACTIONS)):
            chord = h[0] + (h[last] - h[0]) * k / last
            concavity[k] += (1.0 - h[k] / chord) / len(neighbours)
    m = normal_hm_hp(level, normal_shape)
    return [chord_mean / m * normal_shape_at(level, f, normal_shape) * (1.0 - concavity[k])
            for k, f in enumerate(PROFILE_FRACTIONS)]


def _read_like_a_reader(records, levels, positions, grades, gradeable, normal_shape) -> None:
    """Set each graded vertebra's reader-like ``genant_grade`` (see :func:`grade_spine`)."""
    profiles = [_profile(r) if ok else None for r, ok in zip(records, gradeable)]
    by_position = {p: i for i, p in enumerate(positions) if p is not None}
    # Unfractured: quantitative grade 0 (so no crush against its neighbours either) and its own
    # deepest point less than a grade-1 loss below its level's normal shape.
    small = _smaller_than_the_spine(levels, profiles)
    unfractured = []
    for i, grade in enumerate(grades):
        ok = gradeable[i] and profiles[i] is not None and grade.quantitative_grade == 0 and not small[i]
        if ok:
            hm_min, where = _middle_minimum(records[i], profiles[i])
            shape_m = normal_shape_at(levels[i], where, normal_shape)
            ok = 1.0 - hm_min / (profiles[i][-1] * shape_m) < GRADE_BOUNDARIES[0]
        unfractured.append(ok)
    for i, grade in enumerate(grades):
        if not gradeable[i] or profiles[i] is None:
            continue
        references = []
        for step in (-1, 1):
            for distance in range(1, REFERENCE_REACH + 1):
                j = by_position.get(positions[i] + step * distance)
                if j is None:
                    break  # a gap: nothing is taken across it
                if unfractured[j]:
                    references.append(j)
                    break
        profile = profiles[i]
        hm_min, where = _middle_minimum(records[i], profile)
        if references:
            expected = expected_profile(levels[i], [(levels[j], profiles[j]) for j in references], normal_shape)
        else:  # the level's normal shape at the vertebra's own posterior height
            expected = [profile[-1] * normal_shape_at(levels[i], f, normal_shape) for f in PROFILE_FRACTIONS]
        grade.reference_levels = [levels[j] for j in references]
        grade.expected_profile_mm = tuple(expected)
        e_a, e_m, e_p = expected[0], _interp(where, expected), expected[-1]
        grade.expected_ha_mm, grade.expected_hm_mm, grade.expected_hp_mm = e_a, e_m, e_p
        # Shape: the expected shape scaled to the vertebra's own posterior height.
        scale = profile[-1] / e_p
        wedge = 1.0 - profile[0] / (e_a * scale)
        grade.middle_loss = _round(1.0 - hm_min / (e_m * scale))
        shape_losses = {"wedge": _round(wedge), "biconcave": grade.middle_loss, "crush": grade.crush_loss}
        # Size: the heights against the expected ones, confirmed by the area.
        size = max(1.0 - profile[0] / e_a, 1.0 - hm_min / e_m, 1.0 - profile[-1] / e_p) if references else NAN
        grade.size_loss = _round(size)
        # The measured area over the expected outline's on the vertebra's own depth; the profile's
        # mean height over the expected one where the area or depth was not measured (NaN).
        area_ratio = (_positive(records[i].sagittal_area_mm2)
                      / (_positive(records[i].depth_mm) * (AP_SPAN_END - AP_SPAN_START) * mean_profile(expected)))
        if not math.isfinite(area_ratio):
            area_ratio = mean_profile(profile) / mean_profile(expected)
        grade.area_loss = _round(1.0 - area_ratio) if references else NAN
        grade.endplate_depression = _round(float(max(records[i].endplate_depression_mm)) / e_m)  # NaN: not measured
        finite = {k: v for k, v in shape_losses.items() if math.isfinite(v)}
        worst = max(SHAPES, key=lambda k: finite.get(k, -math.inf))
        grade.genant_grade, grade.grade_basis = reader_grade(finite[worst], grade.size_loss, grade.area_loss)
        grade.shape = ("normal" if grade.genant_grade == 0 else "crush" if grade.grade_basis == "size" else worst)
        grade.grade_loss = grade.size_loss if grade.grade_basis == "size" else min(1.0, max(0.0, finite[worst]))
        # Borderline: the grade changes when every loss moves by the SPEC's 3 points.
        lower, upper = (reader_grade(finite[worst] + d, grade.size_loss + d, grade.area_loss + d)[0]
                        for d in (-BORDERLINE_MARGIN, BORDERLINE_MARGIN))
        grade.borderline = lower != upper


def _smaller_than_the_spine(levels: Sequence[str], profiles: Sequence) -> list[bool]:
    """Per vertebra, whether its mean chord height (mm) over its level's nominal height
    (:func:`..anatomy.normal_body`) lies below :data:`SIZE_SUSPECT_RATIO` of the median of the
    measured vertebrae: a size its neighbours cannot vouch for when they are crushed too."""
    last = len(PROFILE_FRACTIONS) - 1
    size = [0.5 * (p[0] + p[last]) / normal_body(level).height_mm if p is not None else NAN
            for level, p in zip(levels, profiles)]
    measured = sorted(x for x in size if math.isfinite(x))
    if not measured:
        return [False] * len(levels)
    median = 0.5 * (measured[(len(measured) - 1) // 2] + measured[len(measured) // 2])
    return [math.isfinite(x) and x < SIZE_SUSPECT_RATIO * median for x in size]


def mean_profile(profile: Sequence[float]) -> float:
    """Mean height of a profile at equally spaced fractions (trapezoid rule)."""
    return (sum(profile) - 0.5 * (profile[0] + profile[-1])) / (len(profile) - 1)


GRADING_BASIS = {
    "genant_grade": "semi-quantitative, as a reader grades (Genant et al., JBMR 1993): the larger of the shape "
                    "grade (wedge at 15 %, the middle region's deepest point, crush against the neighbours' "
                    "posterior heights, each against the expected shape) and the size grade (heights against the "
                    "expected normal heights from the nearest unfractured neighbours, confirmed by the sagittal "
                    "area's loss)",
    "height_boundaries": list(GRADE_BOUNDARIES),
    "area_boundaries": list(AREA_BOUNDARIES),
    "thresholds_from": "Genant 1993's published height and area reductions; not tuned on graded scans",
    "quantitative_grade": "SPEC §4: genant grade of height_loss = max(1 - Ha/Hp, 1 - Hm/Hp, 1 - Hp/Hp_ref) "
                          "against the level's normal proportions",
}
"""The basis of the grades, written into ``exam.json`` (``grading``)."""
