"""The contrast phase (``measure.phase``), the bone category for the phase
(``measure.attenuation.phase_adjusted_category``) and feature version 2, against phantom truth.

The phantoms are small and coarse (T12–L3, 3 mm, no supersampling) so the file stays fast; the
benchmark over phases, voxel sizes, noise and missing labels is
``Testing/benchmarks/bench_phase.py``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.geometry import find_label_boxes
from VertebralFractureScreenLib.measure import attenuation as at
from VertebralFractureScreenLib.measure import phase as ph
from VertebralFractureScreenLib.measure.grading import grade_spine
from VertebralFractureScreenLib.measure.morphometry import measure_heights
from VertebralFractureScreenLib.model import features as ft
from VertebralFractureScreenLib.phantom.render import PhantomSpec, make_phantom

TRABECULAR = {"T12": 150.0, "L1": 100.0, "L2": 140.0, "L3": 150.0}
LABELS = {"aorta": lv.TOTAL_AORTA, "inferior_vena_cava": lv.TOTAL_INFERIOR_VENA_CAVA,
          "portal_vein_and_splenic_vein": lv.TOTAL_PORTAL_SPLENIC_VEIN, "kidney_right": lv.TOTAL_KIDNEY_RIGHT,
          "kidney_left": lv.TOTAL_KIDNEY_LEFT}


def phase_spec(phase: str, **kwargs) -> PhantomSpec:
    kwargs = {"levels": lv.parse_level_range("T12-L3"), "spacing": (3.0, 3.0, 3.0), "supersampling": 1,
              "noise_hu": 20.0, "trabecular_hu": TRABECULAR, "autochthon_fat_fraction": 0.0,
              "iliopsoas_fat_fraction": 0.0, "phase": phase, "seed": 5, **kwargs}
    return PhantomSpec(**kwargs)


@pytest.fixture(scope="module")
def phantoms():
    return {phase: make_phantom(phase_spec(phase)) for phase in ph.PHASES}


def without(total: np.ndarray, names) -> np.ndarray:
    """A copy of the ``total`` map without the labels of ``names``."""
    out = total.copy()
    out[np.isin(out, [LABELS[name] for name in names])] = 0
    return out


# ------------------------------------------------------------------------------------------------
# The phase
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ph.PHASES)
def test_each_phase_is_found_with_every_label(phantoms, phase):
    p = phantoms[phase]
    result = ph.estimate_phase(p.ct, p.total, p.ijk_to_ras)
    assert (result.phase, result.confident, result.candidates, result.missing) == (phase, True, (phase,), ())
    truth = p.truth["phase"]["hu"]
    for name in ph.MEASURED:  # medians of eroded cores: no partial volume, noise only (20 HU)
        assert result.voxels[name] >= ph.MIN_VOXELS and 0 < result.hu_se[name] < 10.0, name
        assert result.hu[name] == pytest.approx(truth[name], abs=3.0 * result.hu_se[name]), name
    assert len(result.reasons) == 3 and not result.warnings
    boxes = find_label_boxes(p.total)
    assert ph.estimate_phase(p.ct, p.total, p.ijk_to_ras, label_boxes=boxes) == result
    fields = result.exam_fields()
    assert fields["phase"] == phase and fields["phase_confident"] is True and fields["phase_candidates"] == [phase]
    assert set(fields["phase_hu"]) == set(ph.MEASURED) and fields["phase_missing"] == []


@pytest.mark.parametrize("phase", ph.PHASES)
def test_missing_labels_never_give_a_confident_wrong_phase(phantoms, phase):
    p = phantoms[phase]
    seen = set()
    for count in range(1, len(LABELS) + 1):
        for names in itertools.combinations(LABELS, count):
            result = ph.estimate_phase(p.ct, without(p.total, names), p.ijk_to_ras)
            assert set(names) <= set(result.missing), names
            assert phase in result.candidates, (names, result)
            assert result.phase in (phase, ph.ENHANCED, ph.UNCERTAIN), (names, result)
            assert result.confident is (result.phase == phase)
            if result.phase == ph.ENHANCED:
                assert phase != "native" and set(result.candidates) <= set(ph.ENHANCED_PHASES)
            seen.add(result.phase)
    assert ph.UNCERTAIN in seen  # (every label gone, or one structure left)


def test_one_structure_is_never_confident(phantoms):
    p = phantoms["native"]
    result = ph.estimate_phase(p.ct, without(p.total, ["inferior_vena_cava", "portal_vein_and_splenic_vein",
                                                       "kidney_right", "kidney_left"]), p.ijk_to_ras)
    assert (result.phase, result.candidates, result.confident) == (ph.UNCERTAIN, ("native",), False)
    assert any("not confirmed by a second" in w for w in result.warnings)
    none = ph.estimate_phase(p.ct, np.zeros_like(p.total), p.ijk_to_ras)
    assert none.phase == ph.UNCERTAIN and none.candidates == ph.PHASES and set(none.missing) == set(LABELS)
    assert all(value is None for value in none.hu.values()) and all(v == 0 for v in none.voxels.values())


def test_a_scan_between_phases_is_uncertain():
    """Late arterial / early portal venous: an aorta too bright, and too far above the portal vein,
    for the portal venous phase, with too little corticomedullary difference for the arterial."""
    between = {"aorta": 240.0, "portal_vein_and_splenic_vein": 175.0, "inferior_vena_cava": 120.0,
               "kidney_cortex": 200.0, "kidney_medulla": 160.0}
    p = make_phantom(phase_spec("portal_venous", phase_hu=between))
    result = ph.estimate_phase(p.ct, p.total, p.ijk_to_ras)
    assert (result.phase, result.confident, result.candidates) == (ph.UNCERTAIN, False, ())
    assert any("fit no single phase" in w for w in result.warnings)
    assert result.cues["aorta_minus_portal"] == pytest.approx(65.0, abs=5.0)
    category = at.phase_adjusted_category(130.0, result.phase, candidates=result.candidates)
    assert category.uncertain and category.phases == ph.PHASES and category.offset_hu is None


def test_portal_venous_or_delayed_is_enhanced():
    """Vessels of 150 HU and a homogeneous nephrogram fit both later phases: contrast-enhanced,
    phase unknown; their offsets agree, so the bone category is still given (marked uncertain)."""
    late = {"aorta": 150.0, "portal_vein_and_splenic_vein": 150.0, "inferior_vena_cava": 140.0,
            "kidney_cortex": 160.0, "kidney_medulla": 155.0}
    p = make_phantom(phase_spec("portal_venous", phase_hu=late))
    result = ph.estimate_phase(p.ct, p.total, p.ijk_to_ras)
    assert (result.phase, result.candidates) == (ph.ENHANCED, ("portal_venous", "delayed"))
    category = at.phase_adjusted_category(120.0, result.phase, candidates=result.candidates)
    assert (category.category, category.uncertain, category.offset_hu) == ("osteoporosis-likely", True, 18.0)


@pytest.mark.parametrize("values, phase, candidates", [
    ({"aorta": 40.0, "kidney_cortex": 35.0}, "native", ("native",)),
    ({"aorta": 350.0}, ph.ENHANCED, ("arterial",)),  # one structure: not confirmed
    ({"aorta": 250.0}, ph.ENHANCED, ("arterial", "portal_venous")),
    ({"aorta": 150.0, "inferior_vena_cava": 130.0}, ph.ENHANCED, ("portal_venous", "delayed")),
    ({"aorta": 85.0, "inferior_vena_cava": 80.0}, ph.UNCERTAIN, ("native", "delayed")),
    ({"inferior_vena_cava": 90.0, "kidney_cortex": 200.0, "kidney_medulla": 90.0}, "arterial",
     ("arterial",)),  # the kidneys decide
    ({"aorta": 300.0, "kidney_cortex": 200.0, "kidney_medulla": 90.0}, "arterial", ("arterial",)),
    ({"aorta": 95.0, "kidney_cortex": 85.0}, ph.UNCERTAIN, ()),
    ({}, ph.UNCERTAIN, ph.PHASES),
])
def test_the_rule_on_hand_made_values(values, phase, candidates):
    result = ph.phase_from_hu(values, dict.fromkeys(values, 1.0))
    assert (result.phase, result.candidates) == (phase, candidates)
    assert result.confident is (phase in ph.PHASES) and len(result.reasons) == len(ph.PHASES) - len(candidates)
    assert result.hu_se == {name: 1.0 if name in values else None for name in ph.MEASURED}


def test_a_standard_error_widens_a_value():
    for se, candidates in ((1.0, ("native",)), (5.0, ("native", "delayed"))):
        result = ph.phase_from_hu({"aorta": 62.0}, {"aorta": se})
        assert result.candidates == candidates  # delayed needs 70 HU: 62 + 2 × 5 reaches it
    assert ph.phase_from_hu({"aorta": 62.0}).hu_se["aorta"] == 0.0


def test_thin_and_small_structures():
    """At 5 mm voxels the portal vein (14 mm across) has no voxel clear of partial volume, and no
    voxel of the 7 mm renal cortex is: both count as missing (with a reason), not measured in
    partial-volume voxels; the aorta and the vena cava still narrow the phase down."""
    p = make_phantom(phase_spec("portal_venous", spacing=(5.0, 5.0, 5.0), noise_hu=0.0))
    result = ph.estimate_phase(p.ct, p.total, p.ijk_to_ras)
    assert {"portal_vein_and_splenic_vein", "kidney_right", "kidney_left"} <= set(result.missing)
    assert result.hu["portal_vein_and_splenic_vein"] is None and result.hu["kidney_cortex"] is None
    assert any("portal_vein_and_splenic_vein" in w for w in result.warnings)
    assert any("kidneys not measured" in w for w in result.warnings)
    assert result.hu["aorta"] == 190.0 and result.hu["inferior_vena_cava"] == 150.0
    assert result.phase == ph.ENHANCED and "portal_venous" in result.candidates


# ------------------------------------------------------------------------------------------------
# The bone category for the phase
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ph.PHASES)
def test_category_for_the_phase_is_the_truth_category(phantoms, phase):
    """L1 is 100 HU unenhanced (osteoporosis likely); enhanced it reads 114–118 HU, which the
    unenhanced thresholds would call low bone density possible."""
    p = phantoms[phase]
    heights = measure_heights(p.total, p.ijk_to_ras, body_labels=p.vertebrae_body, ct=p.ct)
    rois = at.measure_trabecular(p.ct, p.total, p.ijk_to_ras, heights, body_labels=p.vertebrae_body,
                                 grades=grade_spine(heights))
    summary = at.bone_summary(rois)
    truth = {v["level"]: v for v in p.truth["vertebrae"]}[summary.l1_level]
    assert summary.l1_level == "L1" and truth["trabecular_hu_native"] == 100.0
    bone = at.bone_for_phase(summary, ph.estimate_phase(p.ct, p.total, p.ijk_to_ras))
    assert bone["category_for_phase"] == truth["category_native"] == "osteoporosis-likely"
    assert bone["category_for_phase_uncertain"] is False and bone["category_for_phase_reason"] is None
    offset = at.PHASE_BONE_OFFSETS_HU[phase]
    assert bone["phase_offset_hu"] == offset == p.truth["phase"]["trabecular_enhancement_hu"]
    assert (bone["phase_osteoporosis_threshold_hu"], bone["phase_normal_threshold_hu"]) == (110.0 + offset,
                                                                                          160.0 + offset)
    assert bone["l1_hu_for_phase"] == pytest.approx(100.0, abs=3.0)
    assert bone["lumbar_mean_hu_for_phase"] == pytest.approx(summary.lumbar_mean_hu - offset)
    assert bone["phase_threshold_source"] == at.PHASE_OFFSET_SOURCES[phase]
    assert (summary.category == "osteoporosis-likely") is (phase == "native")


@pytest.mark.parametrize("hu, phase, category, thresholds", [
    (110.0, "native", "osteoporosis-likely", (110.0, 160.0)),
    (124.0, "arterial", "osteoporosis-likely", (124.0, 174.0)),
    (124.5, "arterial", "low-bone-density-possible", (124.0, 174.0)),
    (178.0, "portal_venous", "low-bone-density-possible", (128.0, 178.0)),
    (178.5, "delayed", "normal", (128.0, 178.0)),
])
def test_thresholds_for_each_phase(hu, phase, category, thresholds):
    result = at.phase_adjusted_category(hu, phase)
    assert (result.category, result.thresholds_hu, result.uncertain) == (category, thresholds, False)
    assert result.phases == (phase,) and result.source == at.PHASE_OFFSET_SOURCES[phase]


def test_an_uncertain_phase_marks_the_category_uncertain():
    agree = at.phase_adjusted_category(60.0, ph.UNCERTAIN)  # under every phase's thresholds
    assert (agree.category, agree.uncertain, agree.offset_hu, agree.hu_for_phase) == ("osteoporosis-likely", True,
                                                                                      None, None)
    differ = at.phase_adjusted_category(120.0, ph.UNCERTAIN)
    assert differ.category is None and differ.uncertain and "disagree" in differ.reason
    enhanced = at.phase_adjusted_category(120.0, ph.ENHANCED)  # 106 or 102 HU unenhanced-equivalent
    assert enhanced.phases == ph.ENHANCED_PHASES and enhanced.category == "osteoporosis-likely" and enhanced.uncertain
    near = at.phase_adjusted_category(126.0, "portal_venous", hu_se=1.5)  # 108 ± 3
    assert near.category == "osteoporosis-likely" and near.uncertain and "standard errors" in near.reason
    with pytest.raises(ValueError):
        at.phase_adjusted_category(float("nan"), "native")


def test_bone_for_phase_without_a_lumbar_vertebra():
    summary = at.BoneSummary()
    result = ph.PhaseResult("arterial", True, ("arterial",), {}, {}, {}, {}, (), ())
    bone = at.bone_for_phase(summary, result)
    assert bone["category_for_phase"] is None and bone["l1_hu_for_phase"] is None
    assert bone["phase_offset_hu"] == 14.0 and bone["lumbar_mean_hu_for_phase"] is None


# ------------------------------------------------------------------------------------------------
# Features: version 2 and version 1
# ------------------------------------------------------------------------------------------------


def exam_json(**contrast) -> dict:
    return {"bone": {"l1_hu": 118.0, "lumbar_mean_hu": 125.0, "l1_hu_for_phase": 100.0,
                     "lumbar_mean_hu_for_phase": 107.0},
            "contrast": {"aorta_hu": 190.0, "contrast_enhanced": True, **contrast}}


ROWS = [{"level": "L1", "complete": True, "genant_grade": 0, "height_loss": 0.05, "trabecular_hu_mean": 118.0}]


def test_features_version_2_adds_the_phase_to_version_1():
    exam = exam_json(phase="portal_venous", phase_confident=True, phase_candidates=["portal_venous"])
    v1, v2 = ft.exam_features(exam, ROWS, version=1), ft.exam_features(exam, ROWS)
    assert tuple(v1) == ft.FEATURE_NAMES_BY_VERSION[1] and tuple(v2) == ft.FEATURE_NAMES == ft.feature_names(2)
    assert ft.FEATURE_NAMES[:len(v1)] == tuple(v1)
    assert all(v2[name] == value or (math.isnan(value) and math.isnan(v2[name])) for name, value in v1.items())
    assert {name: v2[f"phase_{name}"] for name in ph.PHASES} == {"native": 0.0, "arterial": 0.0,
                                                                  "portal_venous": 1.0, "delayed": 0.0}
    assert (v2["l1_hu_for_phase"], v2["lumbar_mean_hu_for_phase"]) == (100.0, 107.0)
    with pytest.raises(ValueError, match="feature version 3"):
        ft.exam_features(exam, ROWS, version=3)


@pytest.mark.parametrize("contrast, expected", [
    ({"phase": "enhanced", "phase_confident": False, "phase_candidates": ["portal_venous", "delayed"]},
     (0.0, 0.0, None, None)),
    ({"phase": "uncertain", "phase_confident": False, "phase_candidates": []}, (None, None, None, None)),
    ({"phase": "uncertain", "phase_confident": False, "phase_candidates": ["native"]}, (None, 0.0, 0.0, 0.0)),
    ({"phase": "arterial", "phase_confident": True, "phase_candidates": ["arterial"]}, (0.0, 1.0, 0.0, 0.0)),
    ({}, (None, None, None, None)),  # an exam.json from before the phase
])
def test_phase_one_hot_with_candidates(contrast, expected):
    values = ft.exam_features(exam_json(**contrast), ROWS)
    got = tuple(None if math.isnan(values[f"phase_{name}"]) else values[f"phase_{name}"] for name in ph.PHASES)
    assert got == expected


def test_phase_features_of_an_exam_without_them():
    values = ft.exam_features({"bone": {"l1_hu": 118.0}, "contrast": {}}, ROWS)
    assert math.isnan(values["l1_hu_for_phase"]) and math.isnan(values["lumbar_mean_hu_for_phase"])
    assert values["l1_hu"] == 118.0
