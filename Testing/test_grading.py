"""Tests of the fracture grading (SPEC §4): Genant thresholds, normal-shape losses, reference
heights and their guards, and agreement with the phantom's analytic truth."""

from __future__ import annotations

import dataclasses
import math

import pytest

from VertebralFractureScreenLib.measure import grading
from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.phantom import render as phantom
from VertebralFractureScreenLib.measure.grading import NORMAL_HA_HP, VertebraGrade, exam_fracture_summary, genant_grade, grade_spine, is_borderline
from VertebralFractureScreenLib.measure.morphometry import VertebraHeights
from VertebralFractureScreenLib.phantom.render import AP_FRACTIONS, Fracture, PhantomSpec, SpineScene
from VertebralFractureScreenLib.phantom.anatomy import PHYSIOLOGICAL_HA_HP

NAN = float("nan")


def vertebra(level, ha, hm, hp, complete=True):
    """The morphometry's record of a vertebra with the given heights (mm), nothing else measured."""
    return VertebraHeights(level, 0, complete, ha, hm, hp)


def normal(level, mean_height=20.0, ratio=None):
    """A vertebra of the level's normal shape with the given mean of Ha and Hp."""
    r = NORMAL_HA_HP.get(level, 1.0) if ratio is None else ratio
    hp = 2.0 * mean_height / (1.0 + r)
    return vertebra(level, r * hp, 0.5 * (1.0 + r) * hp, hp)


def spine(names, **changes):
    """Normal vertebrae of constant mean height; ``changes`` maps level → record."""
    return [changes.get(name) or normal(name) for name in names]


def by_level(grades):
    return {g.level: g for g in grades}


LUMBAR = ("T12", "L1", "L2", "L3", "L4")


# ------------------------------------------------------------------------------------------------
# Genant grade and borderline
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss, grade", [(0.0, 0), (0.1999, 0), (0.20, 1), (0.2499, 1), (0.25, 2), (0.3999, 2),
                                         (0.40, 2), (0.4001, 3), (1.0, 3)])
def test_genant_grade_boundaries(loss, grade):
    assert genant_grade(loss) == grade


def test_genant_grade_of_nan_raises():
    with pytest.raises(ValueError):
        genant_grade(NAN)


@pytest.mark.parametrize("loss, borderline", [(0.0, False), (0.165, False), (0.175, True), (0.20, True), (0.225, True),
                                              (0.25, True), (0.275, True), (0.285, False), (0.33, False),
                                              (0.375, True), (0.40, True), (0.425, True), (0.435, False), (NAN, False)])
def test_is_borderline(loss, borderline):
    assert is_borderline(loss) is borderline


def test_phantom_uses_the_grading_functions():
    assert phantom.genant_grade is grading.genant_grade
    assert phantom.is_borderline is grading.is_borderline


def test_normal_table_is_the_phantom_table():
    assert NORMAL_HA_HP == PHYSIOLOGICAL_HA_HP
    assert grading.normal_ha_hp("L3") == 1.0 and grading.normal_ha_hp("T12") == 0.91
    assert grading.normal_hm_hp("L5") == pytest.approx(1.07)


# ------------------------------------------------------------------------------------------------
# Losses, grade and shape of one vertebra
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["L2", "T12", "L5"])
@pytest.mark.parametrize("fraction, grade", [(0.20, 1), (0.25, 2), (0.40, 2), (0.41, 3), (0.19, 0)])
def test_wedge_grade_exactly_at_boundaries(level, fraction, grade):
    """Ha/Hp exactly (1 - F) times the level's normal ratio grades as F, boundaries included."""
    names = [n for n in lv.LEVELS if lv.level_position("T11") <= lv.level_position(n) <= lv.level_position("L5")]
    r = NORMAL_HA_HP.get(level, 1.0)
    hp = 20.0
    target = vertebra(level, r * (1.0 - fraction) * hp, 0.5 * (1.0 + r) * hp, hp)
    g = by_level(grade_spine(spine(names, **{level: target})))[level]
    assert g.wedge_loss == pytest.approx(fraction, abs=1e-12)
    assert g.height_loss == pytest.approx(fraction, abs=1e-12)
    assert g.genant_grade == grade
    assert g.shape == ("wedge" if grade else "normal")
    assert g.borderline is is_borderline(fraction)


def test_loss_components_and_shape_argmax():
    names = ("L1", "L2", "L3", "L4", "L5")
    hp = 2 * 20.0 / (1 + 1.0)  # L2–L4 normal Hp at mean height 20
    cases = {
        "wedge": vertebra("L3", 0.7 * hp, 0.85 * hp, hp),  # Hm follows half the wedge
        "biconcave": vertebra("L3", hp, 0.65 * hp, hp),
        "crush": vertebra("L3", 0.7 * hp, 0.7 * hp, 0.7 * hp),
    }
    for shape, record in cases.items():
        g = by_level(grade_spine(spine(names, L3=record)))["L3"]
        losses = {"wedge": g.wedge_loss, "biconcave": g.biconcave_loss, "crush": g.crush_loss}
        assert max(losses, key=losses.get) == shape == g.shape
        assert g.height_loss == pytest.approx(0.35 if shape == "biconcave" else 0.3)
        assert g.genant_grade == 2
    g = by_level(grade_spine(spine(names, L3=cases["wedge"])))["L3"]
    assert g.ha_hp == pytest.approx(0.7) and g.hm_hp == pytest.approx(0.85)
    assert g.wedge_loss == pytest.approx(0.3) and g.biconcave_loss == pytest.approx(0.15)
    assert g.crush_loss == pytest.approx(0.0) and g.hp_ref_ratio == pytest.approx(1.0)


def test_height_loss_clipped_at_zero_and_normal_shape():
    names = ("L2", "L3", "L4")
    tall = vertebra("L3", 26.0, 25.0, 24.0)  # Ha > Hp and taller than its neighbours
    g = by_level(grade_spine(spine(names, L3=tall)))["L3"]
    assert g.wedge_loss < 0 and g.crush_loss < 0
    assert g.height_loss == 0.0 and g.genant_grade == 0 and g.shape == "normal" and not g.borderline


def test_mild_deformity_is_grade_zero_shape_normal():
    g = by_level(grade_spine(spine(LUMBAR, L2=vertebra("L2", 17.0, 19.0, 20.0))))["L2"]
    assert g.height_loss == pytest.approx(0.15) and g.genant_grade == 0 and g.shape == "normal"


# ------------------------------------------------------------------------------------------------
# Physiological shape guards
# ------------------------------------------------------------------------------------------------


def test_t12_physiological_wedge_is_not_a_fracture():
    names = ("T10", "T11", "T12", "L1", "L2")
    grades = by_level(grade_spine(spine(names)))
    for name in names:
        assert grades[name].genant_grade == 0 and grades[name].height_loss == pytest.approx(0.0, abs=1e-9)
    # A T12 wedged beyond a flat box's 20 % but within its physiological range: not a fracture.
    wedged = vertebra("T12", 0.78 * 21.0, 0.89 * 21.0, 21.0)
    g = by_level(grade_spine(spine(names, T12=wedged)))["T12"]
    assert g.genant_grade == 0 and g.wedge_loss == pytest.approx(1 - 0.78 / 0.91)
    flat = by_level(grade_spine(spine(names, T12=wedged), normal_shape={}))["T12"]
    # What grading against a flat box would wrongly call, the SPEC's and the reader-like grade
    # alike: the level's normal wedging comes from the table, not from the neighbours.
    assert flat.quantitative_grade == 1 and flat.genant_grade == 1


def test_l5_short_posterior_wall_is_not_a_fracture():
    names = ("L3", "L4", "L5", "S1")
    records = spine(names)
    grades = by_level(grade_spine(records))
    l5 = grades["L5"]
    assert l5.ha_hp == pytest.approx(1.14)
    assert l5.genant_grade == 0 and l5.height_loss == pytest.approx(0.0, abs=1e-9)
    # L5's expected Hp is L4's scaled by the normal shapes, so its short wall is no crush.
    assert l5.hp_ref_mm == pytest.approx(records[1].hp_mm / 1.07)
    assert l5.crush_loss == pytest.approx(0.0, abs=1e-9)
    assert "one_sided_reference" in l5.flags
    # Against a flat box (Hp compared with L4's as is) the same L5 looks 6.5 % crushed.
    flat = by_level(grade_spine(records, normal_shape={}))["L5"]
    assert flat.crush_loss == pytest.approx(1 - 2 / 2.14, abs=1e-9)


def test_l5_wedge_fracture_is_measured_against_its_own_normal_shape():
    names = ("L3", "L4", "L5", "S1")
    hp = 2 * 20.0 / 2.14
    fractured = vertebra("L5", 1.14 * 0.7 * hp, 1.07 * hp, hp)  # 30 % anterior height loss
    g = by_level(grade_spine(spine(names, L5=fractured)))["L5"]
    assert g.wedge_loss == pytest.approx(0.3) and g.genant_grade == 2 and g.shape == "wedge"
    flat = by_level(grade_spine(spine(names, L5=fractured), normal_shape={}))["L5"]
    assert flat.wedge_loss == pytest.approx(1 - 1.14 * 0.7)  # a flat box underestimates it (20.2 %)
    assert flat.genant_grade == 1


# ------------------------------------------------------------------------------------------------
# Reference height
# ------------------------------------------------------------------------------------------------


def test_reference_is_mean_of_both_neighbours():
    records = [vertebra("L2", 20.0, 20.0, 20.0), vertebra("L3", 22.0, 22.0, 22.0), vertebra("L4", 24.0, 24.0, 24.0)]
    g = grade_spine(records)
    assert g[1].hp_ref_mm == pytest.approx(22.0) and g[1].hp_ref_ratio == pytest.approx(1.0)
    assert "one_sided_reference" not in g[1].flags
    assert g[0].hp_ref_mm == pytest.approx(22.0) and "one_sided_reference" in g[0].flags
    assert g[2].hp_ref_mm == pytest.approx(22.0) and "one_sided_reference" in g[2].flags
    assert g[0].crush_loss == pytest.approx(1 - 20 / 22)


def test_reference_scales_neighbours_by_normal_shape():
    """T12 (r = 0.91) between T11 (0.93) and L1 (0.93), all of mean height 20."""
    grades = by_level(grade_spine(spine(("T11", "T12", "L1"))))
    expected = 2 * 20.0 / 1.91
    assert grades["T12"].hp_ref_mm == pytest.approx(expected)
    assert grades["T12"].hp_ref_ratio == pytest.approx(1.0)


def test_no_reference_for_a_lone_vertebra():
    (g,) = grade_spine([vertebra("L2", 15.6, 18.0, 20.0)])
    assert "no_reference" in g.flags
    assert math.isnan(g.hp_ref_mm) and math.isnan(g.hp_ref_ratio) and math.isnan(g.crush_loss)
    assert g.genant_grade == 1 and g.shape == "wedge"  # still graded on its own ratios


def test_crushed_neighbour_is_excluded_from_reference():
    names = ("T12", "L1", "L2", "L3", "L4")
    records = spine(names, L2=vertebra("L2", 14.0, 14.0, 14.0))  # 30 % crush of a 20 mm body
    grades = by_level(grade_spine(records))
    assert grades["L2"].genant_grade == 2 and grades["L2"].shape == "crush"
    assert grades["L2"].crush_loss == pytest.approx(0.3)
    for name, other in (("L1", "T12"), ("L3", "L4")):
        g = grades[name]
        assert "crushed_neighbour_excluded" in g.flags and "one_sided_reference" in g.flags
        other_record = records[names.index(other)]
        scale = grading.normal_hm_hp(other) / grading.normal_hm_hp(name)
        assert g.hp_ref_mm == pytest.approx(other_record.hp_mm * scale)
        assert g.hp_ref_ratio == pytest.approx(1.0) and g.genant_grade == 0


def test_two_adjacent_crushes_do_not_hide_each_other():
    crushed = {n: vertebra(n, 14.0, 14.0, 14.0) for n in ("L2", "L3")}
    grades = by_level(grade_spine(spine(("T12", "L1", "L2", "L3", "L4", "L5"), **crushed)))
    for name in ("L2", "L3"):
        assert grades[name].shape == "crush" and grades[name].genant_grade == 2
        assert grades[name].crush_loss == pytest.approx(0.3)
    for name in ("L1", "L4"):
        assert grades[name].genant_grade == 0


def test_incomplete_vertebrae_are_never_called_nor_references():
    names = ("L1", "L2", "L3", "L4")
    records = spine(names, L2=vertebra("L2", 5.0, 5.0, 40.0, complete=False),
                    L4=vertebra("L4", 10.0, NAN, 20.0, complete=True))
    grades = by_level(grade_spine(records))
    for name in ("L2", "L4"):
        g = grades[name]
        assert g.genant_grade is None and g.shape == "" and not g.borderline and not g.complete
        assert math.isnan(g.height_loss) and not g.fractured
    assert "heights_missing" in grades["L4"].flags
    assert grades["L2"].ha_hp == pytest.approx(0.125)  # ratios are still reported when measured
    assert math.isnan(grades["L4"].ha_hp)
    # L3's neighbours are both unusable, L1's only neighbour too: no reference, no crush call.
    for name in ("L1", "L3"):
        assert "no_reference" in grades[name].flags and grades[name].genant_grade == 0
    assert exam_fracture_summary(list(grades.values()))["count"] == 0


def test_s1_is_never_graded_nor_a_reference():
    records = spine(("L4", "L5"), L4=vertebra("L4", 20.0, 20.0, 20.0)) + [vertebra("S1", 5.0, 10.0, 40.0)]
    grades = by_level(grade_spine(records))
    s1 = grades["S1"]
    assert s1.genant_grade is None and s1.shape == "" and "not_graded" in s1.flags
    assert s1.complete  # it is measured, only not graded
    l5 = grades["L5"]
    assert l5.hp_ref_mm == pytest.approx(20.0 / 1.07) and "one_sided_reference" in l5.flags


def test_level_gap_is_flagged_and_not_bridged():
    names = ("T11", "T12", "L2", "L3")  # L1 missing
    records = spine(names, L2=vertebra("L2", 20.0, 20.0, 20.0), T12=vertebra("T12", 13.0, 13.5, 14.0))
    grades = by_level(grade_spine(records))
    assert "level_gap" in grades["T12"].flags and "level_gap" in grades["L2"].flags
    assert "level_gap" not in grades["T11"].flags and "level_gap" not in grades["L3"].flags
    # L2 would have had the (crushed-looking) T12 as its upper neighbour across the gap: it does not.
    assert "one_sided_reference" in grades["L2"].flags
    assert grades["L2"].hp_ref_mm == pytest.approx(records[3].hp_mm)
    assert "one_sided_reference" in grades["T12"].flags


def test_output_order_and_duplicates():
    records = [vertebra("L2", 20.0, 20.0, 20.0), vertebra("L1", 14.0, 18.0, 20.0)]
    grades = grade_spine(records)
    assert [g.level for g in grades] == ["L2", "L1"]
    assert grades[1].genant_grade == 1 and grades[1].hp_ref_mm == pytest.approx(20.0 / 0.965)
    with pytest.raises(ValueError):
        grade_spine(records + [dataclasses.replace(records[0])])


def test_unknown_level_is_not_graded():
    grades = grade_spine([vertebra("L5", 20.0, 20.0, 20.0), vertebra("L6", 10.0, 10.0, 20.0)])
    assert grades[1].genant_grade is None and "not_graded" in grades[1].flags


def test_exam_fracture_summary():
    grades = [VertebraGrade("T12", True, genant_grade=0, shape="normal"),
              VertebraGrade("L1", True, genant_grade=2, shape="wedge", borderline=True),
              VertebraGrade("L2", False),
              VertebraGrade("L3", True, genant_grade=1, shape="crush")]
    grades[3].flags.append("grade_uncertain")
    assert exam_fracture_summary(grades) == {"max_grade": 2, "fractured_levels": ["L1", "L3"], "count": 2,
                                             "possibly_pathological_levels": [],
                                             "graded_levels": 3, "borderline_levels": ["L1"],
                                             "uncertain_grade_levels": ["L3"]}
    assert exam_fracture_summary([VertebraGrade("L2", False)])["max_grade"] is None
    # A fracture at a suspected lesion is reported apart and not counted as osteoporotic.
    summary = exam_fracture_summary(grades, pathological=["L1", "T12"])
    assert summary["possibly_pathological_levels"] == ["L1"] and summary["fractured_levels"] == ["L3"]
    assert summary["max_grade"] == 1 and summary["count"] == 1 and summary["graded_levels"] == 3


# ------------------------------------------------------------------------------------------------
# Grade uncertainty from the heights' SDs
# ------------------------------------------------------------------------------------------------


def with_sd(record, ha_sd, hm_sd, hp_sd):
    """The record with the heights' SDs (mm) that the morphometry reports."""
    record.ha_sd_mm, record.hm_sd_mm, record.hp_sd_mm = ha_sd, hm_sd, hp_sd
    return record


def test_grade_uncertain_only_where_the_noise_straddles_a_boundary():
    # L2 wedge loss 0.22 (grade 1). SDs of 0.5 mm (a thick-slice endplate) give the loss an SD of
    # about 0.026: its 2-SD interval 0.17-0.27 spans grades 0 to 2. SDs of 0.05 mm do not.
    names = ("L1", "L2", "L3")
    for sd, uncertain in ((0.5, True), (0.05, False)):
        heights = [with_sd(normal(n, 25.0), sd, sd, sd) for n in names]
        heights[1] = with_sd(vertebra("L2", 0.78 * 25.0, 22.0, 25.0), sd, sd, sd)
        g = by_level(grade_spine(heights))
        assert g["L2"].genant_grade == 1 and g["L2"].shape == "wedge"
        assert ("grade_uncertain" in g["L2"].flags) is uncertain
        expected = 0.78 * math.hypot(sd / (0.78 * 25.0), sd / 25.0)  # first order, r = 1 at L2
        assert g["L2"].height_loss_sd == pytest.approx(expected, rel=1e-9)
        # A normal vertebra far from every boundary is not flagged by the same SDs.
        assert "grade_uncertain" not in g["L3"].flags and g["L3"].genant_grade == 0


def test_grade_uncertainty_needs_reported_sds():
    heights = spine(("L1", "L2", "L3"), L2=vertebra("L2", 0.78 * 25.0, 22.0, 25.0))
    g = by_level(grade_spine(heights))["L2"]
    assert g.genant_grade == 1 and math.isnan(g.height_loss_sd) and "grade_uncertain" not in g.flags


@pytest.mark.parametrize("shape", ["wedge", "biconcave", "crush"])
def test_height_loss_sd_matches_the_spread_over_height_draws(shape):
    # The first-order SD of the deciding loss against the spread of the loss when the heights
    # (the vertebra's and, for a crush, its neighbours' Hp) are drawn with their SDs.
    import numpy as np

    rng = np.random.default_rng(7)
    names = ("L1", "L2", "L3")
    sd = {"L1": (0.3, 0.3, 1.0), "L2": (0.6, 0.5, 0.7), "L3": (0.2, 0.3, 1.2)}  # the reference's SD counts
    middle = {"wedge": (0.7 * 26.0, 23.0, 26.0), "biconcave": (26.0, 0.7 * 26.0, 26.0),
              "crush": (0.7 * 25.0, 0.7 * 25.0, 0.7 * 25.0)}[shape]
    truth = [normal("L1", 25.0), vertebra("L2", *middle), normal("L3", 25.0)]
    reported = grade_spine([with_sd(vertebra(v.level, v.ha_mm, v.hm_mm, v.hp_mm), *sd[v.level]) for v in truth])[1]
    assert reported.shape == shape
    losses = []
    for _ in range(4000):
        drawn = [vertebra(v.level, *(h + s * rng.standard_normal()
                                     for h, s in zip((v.ha_mm, v.hm_mm, v.hp_mm), sd[v.level]))) for v in truth]
        losses.append(getattr(grade_spine(drawn)[1], f"{shape}_loss"))
    assert reported.height_loss_sd == pytest.approx(float(np.std(losses)), rel=0.08)


# ------------------------------------------------------------------------------------------------
# Against the phantom's truth
# ------------------------------------------------------------------------------------------------


def phantom_truth(fractures, levels="T4-S1"):
    """The phantom's true heights and grades (as ``phantom.truth['vertebrae']`` computes them,
    without rendering)."""
    spec = PhantomSpec(levels=lv.parse_level_range(levels), fractures=tuple(Fracture.parse(f) for f in fractures))
    scene = SpineScene(spec)
    rows = []
    for name in scene.levels:
        model = scene.models[name]
        heights = {f"{key}_mm": model.height_at(f) for key, f in AP_FRACTIONS.items()}
        loss = model.fracture.fraction if model.fracture else 0.0
        grade = genant_grade(loss)
        rows.append(dict(level=name, complete=True, **heights, height_loss=loss, genant_grade=grade,
                         shape=model.fracture.shape if model.fracture and grade > 0 else "normal",
                         borderline=is_borderline(loss)))
    return rows


def truth_heights(truth):
    """The true heights of :func:`phantom_truth`'s rows as the morphometry's records, to grade."""
    return [vertebra(t["level"], t["ha_mm"], t["hm_mm"], t["hp_mm"], t["complete"]) for t in truth]


def check_against_truth(truth, crush_tolerance=0.04):
    grades = grade_spine(truth_heights(truth))
    for t, g in zip(truth, grades):
        assert g.level == t["level"]
        if t["level"] == "S1":
            assert g.genant_grade is None
            continue
        context = f"{t['level']}: truth {t['shape']} {t['height_loss']}, graded {g.shape} {g.height_loss:.4f}"
        if t["genant_grade"] == 0 and t["height_loss"] == 0.0:
            assert g.genant_grade == 0 and g.shape == "normal" and g.height_loss < 0.10, context
            continue
        # Wedge and biconcave losses are exact on true heights; crush depends on the neighbours.
        tolerance = crush_tolerance if t["shape"] == "crush" or t["genant_grade"] == 0 else 1e-9
        assert g.height_loss == pytest.approx(t["height_loss"], abs=tolerance), context
        if not t["borderline"]:
            assert g.genant_grade == t["genant_grade"] and g.shape == t["shape"], context
    return grades


def test_grading_reproduces_phantom_truth():
    truth = phantom_truth(["T7:wedge:0.22", "T12:biconcave:0.3", "L1:wedge:0.45", "L3:crush:0.3"])
    grades = by_level(check_against_truth(truth))
    assert {n: (g.genant_grade, g.shape) for n, g in grades.items() if g.fractured} == {
        "T7": (1, "wedge"), "T12": (2, "biconcave"), "L1": (3, "wedge"), "L3": (2, "crush")}
    summary = exam_fracture_summary(list(grades.values()))
    assert summary["max_grade"] == 3 and summary["fractured_levels"] == ["T7", "T12", "L1", "L3"]
    assert summary["borderline_levels"] == ["T7"]


@pytest.mark.parametrize("shape", ["wedge", "biconcave", "crush"])
def test_every_level_and_grade_against_phantom_truth(shape):
    """One fracture at a time at every screened level, grades 0 to 3, against the phantom's truth
    (physiological wedging on): validates the losses and the normal-shape table together."""
    for level in lv.SCREENING_LEVELS:
        for fraction in (0.12, 0.22, 0.32, 0.5):
            check_against_truth(phantom_truth([f"{level}:{shape}:{fraction}"]))


def test_normal_phantom_spine_has_no_fracture():
    grades = grade_spine(truth_heights(phantom_truth([], levels="T1-S1")))
    assert all(g.genant_grade == 0 for g in grades if g.level != "S1")
    assert max(g.height_loss for g in grades if g.level != "S1") < 0.05


def test_adjacent_level():
    assert lv.adjacent_level("L1", cranial=True) == "T12"
    assert lv.adjacent_level("T12", cranial=False) == "L1"
    assert lv.adjacent_level("L5", cranial=False) == "S1"
    assert lv.adjacent_level("S1", cranial=False) is None
    assert lv.adjacent_level("C1", cranial=True) is None


# ------------------------------------------------------------------------------------------------
# The reader-like grade: expected shape from the neighbours, deepest point, height and area
# ------------------------------------------------------------------------------------------------


def sized(level, scale=1.0, ratio=None, concavity=0.0, profile=None):
    """A normal vertebra of the level's nominal size (``phantom_anatomy.level_dimensions``) times
    ``scale``, with endplates concave by ``concavity`` of the height at mid-depth, or the given
    height ``profile`` (fractions 15–85 % every 5 %)."""
    from VertebralFractureScreenLib.phantom.anatomy import level_dimensions

    r = NORMAL_HA_HP.get(level, 1.0) if ratio is None else ratio
    hp = scale * 2.0 * level_dimensions(level).height_mm / (1.0 + r)
    fractions = grading.PROFILE_FRACTIONS
    if profile is None:
        profile = [hp * grading.normal_shape_at(level, f) * (1.0 - concavity * math.cos(math.pi * (f - 0.5) / 0.7) ** 2)
                   for f in fractions]
    middle = [(h, f) for h, f in zip(profile, fractions) if 0.25 <= f <= 0.75]
    hm_min, where = min(middle)
    return VertebraHeights(level, 0, True, profile[0], profile[fractions.index(0.5)], profile[-1], depth_mm=30.0,
                           height_profile_mm=tuple(profile), hm_min_mm=hm_min, hm_min_fraction=where,
                           sagittal_area_mm2=30.0 * 0.70 * grading.mean_profile(profile))


def test_a_body_short_against_its_neighbours_is_graded_by_size_and_area():
    """All three heights 20–28 % below the neighbours' with nearly normal own ratios: the SPEC's
    ratio losses stay under 20 % (grade 0), the reader sees a short body with its area lost."""
    names = ("T11", "T12", "L1", "L2", "L3")
    neighbours = {n: sized(n) for n in names}
    normal_l1 = sized("L1")
    profile = [h * (0.72 + 0.08 * k / 14) for k, h in enumerate(normal_l1.height_profile_mm)]
    short = sized("L1", profile=profile)
    g = by_level(grade_spine([short if n == "L1" else neighbours[n] for n in names]))["L1"]
    assert g.quantitative_grade == 0 and g.height_loss < 0.20
    assert g.size_loss == pytest.approx(0.28, abs=0.01) and g.area_loss == pytest.approx(0.24, abs=0.01)
    assert g.genant_grade == 2 and g.grade_basis == "size" and g.shape == "crush"
    assert g.reference_levels == ["T12", "L2"]


def test_a_depression_off_the_middle_is_found_at_its_deepest_point():
    """A superior endplate depressed at 30–40 % of the depth: Hm at 50 % is only 12 % below
    normal, the deepest point 30 % below."""
    names = ("L1", "L2", "L3", "L4", "L5")
    base = sized("L3")
    dent = [h * (1.0 - 0.30 * math.exp(-((f - 0.35) / 0.09) ** 2)) for h, f in
            zip(base.height_profile_mm, grading.PROFILE_FRACTIONS)]
    depressed = sized("L3", profile=dent)
    g = by_level(grade_spine([depressed if n == "L3" else sized(n) for n in names]))["L3"]
    assert g.biconcave_loss == pytest.approx(1 - dent[grading.PROFILE_FRACTIONS.index(0.5)] / base.hm_mm, abs=1e-6)
    assert g.quantitative_grade == 0
    assert g.middle_loss == pytest.approx(0.30, abs=0.01) and g.genant_grade == 2 and g.shape == "biconcave"


def test_natural_endplate_concavity_is_normal_when_the_neighbours_share_it():
    """Real endplates are concave (Hm/Hp about 0.88): a 12 % 'biconcave loss' against flat
    endplates is the neighbours' shape too, so the reader's middle loss is about 0."""
    names = ("T12", "L1", "L2", "L3", "L4")
    grades = by_level(grade_spine([sized(n, concavity=0.12) for n in names]))
    for name in ("L1", "L2", "L3"):
        assert grades[name].biconcave_loss == pytest.approx(0.12, abs=0.005)
        assert abs(grades[name].middle_loss) < 0.005 and abs(grades[name].size_loss) < 0.005
        assert grades[name].genant_grade == 0 and grades[name].grade_basis == "normal"


def test_the_expected_shape_skips_a_fractured_neighbour():
    """L2 is crushed: L3's expectation comes from L1 (two levels up) and L4, not from L2."""
    names = ("T12", "L1", "L2", "L3", "L4")
    spine_ = [sized(n, scale=0.55) if n == "L2" else sized(n) for n in names]
    grades = by_level(grade_spine(spine_))
    assert grades["L2"].genant_grade == 3 and grades["L2"].reference_levels == ["L1", "L3"]
    assert grades["L3"].reference_levels == ["L1", "L4"] and grades["L3"].genant_grade == 0
    assert abs(grades["L3"].size_loss) < 0.005


def test_reader_grade_needs_the_area_for_a_size_call():
    """A size loss alone (heights short against the neighbours, the area not) stays below the
    grade its height would give; a shape loss needs no area."""
    assert grading.reader_grade(0.05, 0.30, 0.05) == (0, "normal")
    assert grading.reader_grade(0.05, 0.30, 0.15) == (1, "size")
    assert grading.reader_grade(0.05, 0.30, 0.25) == (2, "size")
    assert grading.reader_grade(0.30, 0.05, 0.0) == (2, "shape")
    assert grading.reader_grade(0.45, 0.45, 0.45) == (3, "shape+size")


@pytest.mark.parametrize("fractures", [
    ("T12:crush:0.3", "L1:crush:0.3"),
    ("T12:crush:0.3", "L1:crush:0.3", "L2:crush:0.3"),
    ("L1:crush:0.22", "L2:crush:0.22", "L3:crush:0.22"),
    ("L1:wedge:0.3", "L2:wedge:0.3"),
    ("T11:wedge:0.45", "T12:wedge:0.45", "L1:wedge:0.45"),
    ("L2:biconcave:0.3", "L3:biconcave:0.3"),
    ("T12:wedge:0.3", "L1:crush:0.45", "L2:biconcave:0.3"),
], ids=lambda fractures: "+".join(fractures))
def test_consecutive_fractures_do_not_hide_each_other(fractures):
    """Two or three fractured vertebrae in a row, of one or mixed shapes and grades 1–3 (issue 28,
    point 3): each is graded as drawn, with references from the nearest unfractured vertebrae
    (a run of crushes once read grade 0 throughout, each against its crushed neighbours), and the
    normal vertebrae around them stay grade 0."""
    from VertebralFractureScreenLib.measure.morphometry import measure_heights

    levels = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
    drawn = make_phantom_for_grading(levels, fractures)
    heights = measure_heights(drawn.total, drawn.ijk_to_ras, body_labels=drawn.vertebrae_body, ct=drawn.ct)
    grades = by_level(grade_spine(heights))
    fractured = {f.split(":")[0] for f in fractures}
    for truth in drawn.truth["vertebrae"]:
        level = truth["level"]
        if level == "S1":
            continue
        assert grades[level].genant_grade == truth["genant_grade"], (level, grades[level].grade_loss)
        if level in fractured:
            assert fractured.isdisjoint(grades[level].reference_levels)


def make_phantom_for_grading(levels, fractures):
    return phantom.make_phantom(PhantomSpec(levels=levels, spacing=(1.0, 1.0, 1.0), supersampling=1,
                                            fractures=tuple(Fracture.parse(f) for f in fractures)))
