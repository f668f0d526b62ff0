"""Bone attenuation against phantom truth: trabecular ROI, bone summary, contrast (SPEC §4).

The phantoms are small and coarse so the file stays fast; the accuracy benchmark over spacings,
rotations and noise levels is ``Testing/benchmarks/bench_attenuation.py``. Truth used here: the
phantom's ``trabecular_hu`` per vertebra and its tissue map, the body's analytic shape (elliptic
wall, endplate surfaces) from the phantom's scene, and the aorta's HU.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from VertebralFractureScreenLib.measure import attenuation as at
from VertebralFractureScreenLib.measure import trabecular_roi as tr
from VertebralFractureScreenLib.measure.contrast import measure_contrast
from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.measure.grading import grade_spine
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap
from VertebralFractureScreenLib.measure.morphometry import measure_heights
from VertebralFractureScreenLib.phantom.render import TISSUES, Fracture, PhantomSpec, SpineScene, make_phantom

TRABECULAR = {"T12": 180.0, "L1": 95.0, "L2": 130.0}
NO_FAT = dict(autochthon_fat_fraction=0.0, iliopsoas_fat_fraction=0.0)  # fewer edges: faster rendering


class Exam:
    """A rendered phantom with its morphometry and grades."""

    def __init__(self, spec: PhantomSpec):
        self.spec = spec
        self.phantom = make_phantom(spec)
        p = self.phantom
        self.heights = measure_heights(p.total, p.ijk_to_ras, body_labels=p.vertebrae_body, ct=p.ct)
        self.grades = grade_spine(self.heights)
        self.truth = {v["level"]: v for v in p.truth["vertebrae"]}

    def rois(self, **kwargs):
        p = self.phantom
        kwargs.setdefault("body_labels", p.vertebrae_body)
        kwargs.setdefault("grades", self.grades)
        return at.measure_trabecular(p.ct, p.total, p.ijk_to_ras, self.heights, **kwargs)


@pytest.fixture(scope="module")
def rotated():
    """2.5 mm voxels, anatomy rotated against the grid, partial volume rendered, L1 wedge-fractured,
    contrast-enhanced aorta, no noise."""
    return Exam(PhantomSpec(levels=("T12", "L1", "L2"), spacing=(2.5, 2.5, 2.5), supersampling=3,
                            rotation_deg=(15.0, -5.0, 10.0), fractures=(Fracture("L1", "wedge", 0.35),),
                            trabecular_hu=TRABECULAR, contrast=True, **NO_FAT))


@pytest.fixture(scope="module")
def thoracic():
    """Small mid-thoracic bodies at 3 mm (partial volume rendered), tilted; native aorta."""
    return Exam(PhantomSpec(levels=("T5", "T6", "T7"), spacing=(3.0, 3.0, 3.0), supersampling=3,
                            rotation_deg=(0.0, 10.0, 0.0), trabecular_hu=120.0, **NO_FAT))


# ------------------------------------------------------------------------------------------------
# geometry truth of an ROI
# ------------------------------------------------------------------------------------------------

_ANGLES = np.linspace(0.0, 2.0 * np.pi, 2881)
_CORNERS = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))


def roi_voxels_ijk(slices, roi):
    index = np.nonzero(roi)
    return np.stack([index[2] + slices[2].start, index[1] + slices[1].start, index[0] + slices[0].start],
                    axis=1).astype(float)


def true_local(exam: Exam, level: str, ijk: np.ndarray):
    """The phantom's own body coordinates (u, v, w) of voxel positions ``ijk`` (N, 3)."""
    p = exam.phantom
    to_anatomy = np.linalg.inv(np.asarray(p.truth["anatomy_to_ras"])) @ p.ijk_to_ras
    scene = SpineScene(exam.spec)
    model = scene.models[level]
    return model, model.local(ijk @ to_anatomy[:3, :3].T + to_anatomy[:3, 3])


def distance_to_surface(model, u, v, w):
    """Distance (mm, positive inside) to the true outer surface of the body: elliptic wall or
    endplate along the body's axis."""
    a, b = model.half_width, model.half_depth
    wall = np.sqrt(np.min((u[:, None] - a * np.cos(_ANGLES)[None]) ** 2
                          + (v[:, None] - b * np.sin(_ANGLES)[None]) ** 2, axis=1))
    wall = np.where((u / a) ** 2 + (v / b) ** 2 <= 1.0, wall, -wall)
    top, bottom = model.endplates(u, v)
    return np.minimum(wall, np.minimum(top - w, w - bottom))


def corner_distance(exam: Exam, level: str, ijk: np.ndarray) -> np.ndarray:
    """Smallest distance of each voxel's corners to the body's true surface."""
    model, (u, v, w) = true_local(exam, level, (ijk[:, None, :] + _CORNERS[None]).reshape(-1, 3))
    return distance_to_surface(model, u, v, w).reshape(len(ijk), -1).min(axis=1)


# ------------------------------------------------------------------------------------------------
# trabecular ROI
# ------------------------------------------------------------------------------------------------


def test_roi_is_pure_trabecular_bone(rotated):
    """Noise-free CT with rendered partial volume: any voxel reaching cortex (700 HU) or disc would
    move the mean, median or SD away from the level's trabecular HU."""
    rois = rotated.rois()
    assert [r.level for r in rois] == ["T12", "L1", "L2"]
    for roi in rois:
        truth = rotated.truth[roi.level]["trabecular_hu"]
        assert roi.voxels >= (10 if roi.fractured else at.ROI_MIN_VOXELS), roi.level  # L1 lost 35 % anteriorly
        assert roi.mean_hu == pytest.approx(truth, abs=1e-9), roi.level
        assert roi.median_hu == truth and roi.sd_hu == 0.0, roi.level
        assert roi.volume_ml == pytest.approx(roi.voxels * 2.5 ** 3 / 1000.0)
        slices, mask, _ = tr.trabecular_roi_mask(next(h for h in rotated.heights if h.level == roi.level),
                                                 rotated.phantom.total, rotated.phantom.ijk_to_ras,
                                                 body_labels=rotated.phantom.vertebrae_body)
        assert mask.sum() == roi.voxels
        assert np.all(rotated.phantom.tissue[slices][mask] == TISSUES["trabecular_bone"])
    flags = {r.level: r.flags for r in rois}
    assert "fractured" in flags["L1"] and "fractured" not in flags["L2"]
    assert {r.level: r.fractured for r in rois} == {"T12": False, "L1": True, "L2": False}


def test_focal_lesions_are_left_out_of_the_roi(rotated):
    """A bone island (1000 HU) in L2's ROI and a haemangioma's fat (-50 HU) in T12's would move
    their means by tens of HU; they are left out with their rim, and the rest is the level's
    trabecular HU. Gaussian noise of 30 HU alone excludes nothing."""
    p = rotated.phantom
    clean = {r.level: r for r in rotated.rois()}
    ct = p.ct.copy()
    for level, value in (("L2", 1000), ("T12", -50)):
        slices, mask, _ = tr.trabecular_roi_mask(next(h for h in rotated.heights if h.level == level), p.total,
                                                 p.ijk_to_ras, body_labels=p.vertebrae_body)
        # The middle one of the ROI's voxels whose 2x2x2 cube (towards lower indices) lies in the ROI:
        # the lesion must be inside the ROI whatever its shape (the middle voxel alone had a cube
        # half outside once the ROI lost 2 of its 196 voxels to a 0.05 mm change of T12's heights).
        whole = mask[1:, 1:, 1:] & mask[:-1, 1:, 1:] & mask[1:, :-1, 1:] & mask[1:, 1:, :-1] \
            & mask[:-1, :-1, 1:] & mask[:-1, 1:, :-1] & mask[1:, :-1, :-1] & mask[:-1, :-1, :-1]
        inside = np.argwhere(whole) + 1
        k, j, i = inside[len(inside) // 2] + [s.start for s in slices]
        ct[k - 1:k + 1, j - 1:j + 1, i - 1:i + 1] = value  # 2x2x2 voxels, 5 mm across
    lesioned = {r.level: r for r in at.measure_trabecular(ct, p.total, p.ijk_to_ras, rotated.heights,
                                                           body_labels=p.vertebrae_body, grades=rotated.grades)}
    for level in ("T12", "L2"):
        roi = lesioned[level]
        assert "focal_lesion_excluded" in roi.flags, level
        assert roi.mean_hu == pytest.approx(rotated.truth[level]["trabecular_hu"], abs=1e-9), level
        assert 8 <= clean[level].voxels - roi.voxels <= 40, level  # the 8 voxels and some of their rim
    assert "focal_lesion_excluded" not in lesioned["L1"].flags and lesioned["L1"].voxels == clean["L1"].voxels
    noisy = p.ct + np.random.default_rng(5).normal(0.0, 30.0, p.ct.shape)
    for roi in at.measure_trabecular(noisy, p.total, p.ijk_to_ras, rotated.heights, body_labels=p.vertebrae_body):
        assert "focal_lesion_excluded" not in roi.flags and roi.voxels == clean[roi.level].voxels, roi.level


def test_roi_obeys_its_definition_in_true_geometry(rotated):
    """Against the phantom's analytic body: every ROI voxel lies wholly 3 mm or more inside the
    body's outer surface, its centre in the central half of the height and out of the posterior
    fifth; and the ROI is not needlessly small: at least half the voxels that satisfy the same
    definition exactly (corners >= 3 mm inside) are in it."""
    p = rotated.phantom
    for h in rotated.heights:
        slices, roi, _ = tr.trabecular_roi_mask(h, p.total, p.ijk_to_ras, body_labels=p.vertebrae_body)
        ijk = roi_voxels_ijk(slices, roi)
        assert corner_distance(rotated, h.level, ijk).min() >= tr.ROI_MARGIN_MM, h.level
        model, (u, v, w) = true_local(rotated, h.level, ijk)
        top, bottom = model.endplates(np.zeros_like(v), v)
        quarter = 0.25 * (top - bottom)
        tolerance = 0.5  # mm: how far the measured walls and endplates may be off at 2.5 mm voxels
        assert np.all(w <= top - quarter + tolerance) and np.all(w >= bottom + quarter - tolerance), h.level
        depth = 2.0 * model.half_depth
        assert np.all(v >= -model.half_depth + tr.POSTERIOR_EXCLUDED * depth - tolerance), h.level

        # The same definition on every body voxel, with the true geometry.
        body = (p.total == h.label) & (p.vertebrae_body == lv.BODY_LABEL)
        candidates = np.argwhere(body)[:, ::-1].astype(float)
        model, (u, v, w) = true_local(rotated, h.level, candidates)
        top, bottom = model.endplates(np.zeros_like(v), v)
        quarter = 0.25 * (top - bottom)
        ideal = ((v >= -model.half_depth + tr.POSTERIOR_EXCLUDED * depth) & (w <= top - quarter)
                 & (w >= bottom + quarter))
        ideal[ideal] = corner_distance(rotated, h.level, candidates[ideal]) >= tr.ROI_MARGIN_MM
        assert roi.sum() >= 0.5 * ideal.sum(), (h.level, int(roi.sum()), int(ideal.sum()))


def test_small_thoracic_bodies_at_3mm_shrink_and_say_so(thoracic):
    rois = thoracic.rois()
    p = thoracic.phantom
    for roi, h in zip(rois, thoracic.heights):
        slices, mask, _ = tr.trabecular_roi_mask(h, p.total, p.ijk_to_ras, body_labels=p.vertebrae_body)
        if roi.voxels:
            assert np.all(p.tissue[slices][mask] == TISSUES["trabecular_bone"]), roi.level
            assert corner_distance(thoracic, roi.level, roi_voxels_ijk(slices, mask)).min() >= tr.ROI_MARGIN_MM
            assert roi.mean_hu == 120.0 and roi.sd_hu == 0.0
        small = roi.voxels < at.ROI_MIN_VOXELS or roi.volume_ml < at.ROI_MIN_ML
        assert ("roi_small" in roi.flags or "roi_empty" in roi.flags) == small, roi.level
        assert roi.usable == (roi.complete and not small)
    assert any("roi_small" in r.flags or "roi_empty" in r.flags for r in rois)  # T5-T7 at 3 mm are tight


def test_roi_without_body_map_and_in_a_cut_vertebra(rotated):
    """Without ``vertebrae_body`` the posterior elements are in the mask, but the ROI stays in the
    body; a vertebra cut by the field of view is measured, flagged and stays trabecular."""
    p = rotated.phantom
    without_map = rotated.rois(body_labels=None)
    for roi in without_map:
        assert roi.mean_hu == rotated.truth[roi.level]["trabecular_hu"] and roi.sd_hu == 0.0
    # Cut away the slices above T12's mid-height (k is roughly cranio-caudal here).
    t12 = np.argwhere(p.total == lv.TOTAL_VERTEBRA_IDS["T12"])
    k_cut = int(np.median(t12[:, 0]))
    ct, total, body, tissue = (a[:k_cut + 1] for a in (p.ct, p.total, p.vertebrae_body, p.tissue))
    heights = measure_heights(total, p.ijk_to_ras, body_labels=body, ct=ct)
    rois = {r.level: r for r in at.measure_trabecular(ct, total, p.ijk_to_ras, heights, body_labels=body)}
    assert not rois["T12"].complete and "incomplete_vertebra" in rois["T12"].flags
    assert not rois["T12"].usable
    for h in heights:
        slices, mask, _ = tr.trabecular_roi_mask(h, total, p.ijk_to_ras, body_labels=body)
        if mask is not None:
            assert np.all(tissue[slices][mask] == TISSUES["trabecular_bone"]), h.level


# ------------------------------------------------------------------------------------------------
# bone summary
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hu, category", [(60.0, "osteoporosis-likely"), (110.0, "osteoporosis-likely"),
                                          (110.5, "low-bone-density-possible"), (160.0, "low-bone-density-possible"),
                                          (160.5, "normal"), (250.0, "normal")])
def test_opportunistic_category_thresholds(hu, category):
    assert at.opportunistic_category(hu) == category


def test_category_of_nan_is_an_error():
    with pytest.raises(ValueError):
        at.opportunistic_category(float("nan"))


def test_bone_summary_falls_back_from_a_fractured_l1(rotated):
    rois = rotated.rois()
    contrast = measure_contrast(rotated.phantom.ct, rotated.phantom.total, rotated.phantom.ijk_to_ras)
    summary = at.bone_summary(rois, contrast)
    assert summary.l1_level == "L2"
    assert summary.l1_hu == pytest.approx(TRABECULAR["L2"])
    assert summary.category == at.opportunistic_category(TRABECULAR["L2"]) == "low-bone-density-possible"
    assert any("L1" in w and "L2" in w and "fractured" in w for w in summary.warnings)
    assert summary.lumbar_levels == ["L2"] and summary.lumbar_mean_hu == pytest.approx(TRABECULAR["L2"])
    assert summary.excluded_lumbar == {"L1": "fractured", "L3": "missing", "L4": "missing", "L5": "missing"}
    assert summary.per_level_hu == pytest.approx(TRABECULAR)
    assert summary.contrast_enhanced is True and any("contrast" in w for w in summary.warnings)
    json.dumps(summary.to_dict())


def test_bone_summary_without_grades_uses_l1_and_warns(rotated):
    summary = at.bone_summary(rotated.rois(grades=None))
    assert summary.l1_level == "L1" and summary.category == "osteoporosis-likely"  # 95 HU
    assert summary.lumbar_mean_hu == pytest.approx((TRABECULAR["L1"] + TRABECULAR["L2"]) / 2)
    assert any("unknown" in w for w in summary.warnings)


def test_roi_mean_carries_its_standard_error(rotated):
    """The phantom's trabecular bone is uniform, so with Gaussian noise of 20 HU added the ROI mean's
    true standard error is 20 / sqrt(voxels); the reported one must match it and the spread of the
    means over noise draws (same ROIs: the heights of the noise-free exam). The reported SE is
    measured on the noise of block means in the soft tissue around the body (issue 30), not on the
    ROI's SD: the partial-volume edges of the phantom's soft tissue make it 10–15 % larger here
    (block variance x voxels 500–520 HU² against 400 with this white noise; 396 on pure noise), so
    it must lie within 20 % of the true SE and never below it by more than 5 %."""
    p = rotated.phantom
    noise_free = {r.level: r for r in rotated.rois()}
    assert all(r.mean_hu_se == pytest.approx(0.0, abs=1e-9) for r in noise_free.values())  # uniform bone
    rng = np.random.default_rng(7)
    means, ses = {level: [] for level in noise_free}, {level: [] for level in noise_free}
    for _ in range(40):
        ct = (p.ct + rng.normal(0.0, 20.0, p.ct.shape)).astype(np.float32)
        for r in at.measure_trabecular(ct, p.total, p.ijk_to_ras, rotated.heights, body_labels=p.vertebrae_body,
                                       grades=rotated.grades):
            assert r.voxels == noise_free[r.level].voxels
            means[r.level].append(r.mean_hu)
            ses[r.level].append(r.mean_hu_se)
    for level, roi in noise_free.items():
        true_se = 20.0 / np.sqrt(roi.voxels)
        assert 0.95 * true_se <= np.median(ses[level]) <= 1.2 * true_se
        assert np.std(means[level], ddof=1) == pytest.approx(true_se, rel=0.35)  # 40 draws: ±11 % (1 SD)


def _roi(level: str, mean_hu: float, se: float, voxels: int = 100) -> at.TrabecularROI:
    return at.TrabecularROI(level, lv.TOTAL_VERTEBRA_IDS[level], mean_hu=mean_hu, median_hu=mean_hu,
                            sd_hu=se * np.sqrt(voxels), mean_hu_se=se, voxels=voxels, volume_ml=2.7, complete=True,
                            fractured=False)


@pytest.mark.parametrize("mean_hu, se, uncertain", [(108.0, 1.5, True), (112.5, 1.5, True), (105.0, 1.5, False),
                                                    (113.5, 1.5, False), (158.0, 1.5, True), (135.0, 10.0, False),
                                                    (135.0, 13.0, True)])
def test_category_is_uncertain_within_two_standard_errors_of_a_threshold(mean_hu, se, uncertain):
    summary = at.bone_summary([_roi("L1", mean_hu, se), _roi("L2", 200.0, 1.0)])
    assert summary.l1_level == "L1" and summary.l1_hu == mean_hu and summary.l1_hu_se == se
    assert summary.category == at.opportunistic_category(mean_hu)
    assert summary.category_uncertain is uncertain
    assert any("category uncertain" in w for w in summary.warnings) is uncertain


def test_category_without_a_standard_error_is_not_called_certain():
    spread_unknown = at.TrabecularROI("L1", lv.TOTAL_VERTEBRA_IDS["L1"], mean_hu=108.0, voxels=40, volume_ml=1.0,
                                 complete=True, fractured=False)  # no SD, no standard error
    summary = at.bone_summary([spread_unknown])
    assert summary.category == "osteoporosis-likely"
    assert summary.l1_hu_se is None and summary.category_uncertain is None


def test_bone_summary_without_lumbar_vertebrae(thoracic):
    summary = at.bone_summary(thoracic.rois())
    assert summary.category is None and summary.l1_hu is None and summary.lumbar_mean_hu is None
    assert summary.warnings and set(summary.excluded_lumbar) == set(lv.LUMBAR_LEVELS)


# ------------------------------------------------------------------------------------------------
# contrast
# ------------------------------------------------------------------------------------------------


def test_contrast_from_the_aortas_central_lumen(rotated, thoracic):
    p = rotated.phantom
    result = measure_contrast(p.ct, p.total, p.ijk_to_ras)
    assert p.truth["aorta"]["contrast_enhanced"] and result.contrast_enhanced is True
    assert result.aorta_hu == pytest.approx(p.truth["aorta"]["hu"], abs=1.0)
    # The whole mask is biased by partial volume with the tissue around the aorta; the core is not.
    whole = float(p.ct[p.total == lv.TOTAL_AORTA].mean())
    assert abs(whole - p.truth["aorta"]["hu"]) > 3.0
    native = measure_contrast(thoracic.phantom.ct, thoracic.phantom.total, thoracic.phantom.ijk_to_ras)
    assert native.contrast_enhanced is False
    assert native.aorta_hu == pytest.approx(thoracic.phantom.truth["aorta"]["hu"], abs=1.0)
    assert result.aorta_voxels > 0 and not result.warnings


def test_no_aorta_label_says_so(rotated):
    p = rotated.phantom
    result = measure_contrast(p.ct, p.verse, p.ijk_to_ras)
    assert result.aorta_hu is None and result.contrast_enhanced is None
    assert result.warnings and "aorta" in result.warnings[0]


# ------------------------------------------------------------------------------------------------
# real CT
# ------------------------------------------------------------------------------------------------


def test_example_ct_trabecular_hu_is_plausible(example_data):
    ct = read_ct(example_data / "example_ct.nii.gz")
    labels = read_labelmap(example_data / "spine_report" / "totalseg.nii.gz", reference=ct)
    body = read_labelmap(example_data / "spine_report" / "totalseg_vertebrae_body.nii.gz", reference=ct)
    heights = measure_heights(labels.array, ct.ijk_to_ras, body_labels=body.array, ct=ct.array)
    rois = {r.level: r for r in at.measure_trabecular(ct.array, labels.array, ct.ijk_to_ras, heights,
                                                       body_labels=body.array, grades=grade_spine(heights))}
    for level in lv.LUMBAR_LEVELS:
        roi = rois[level]
        assert roi.complete and roi.voxels >= at.ROI_MIN_VOXELS, level
        assert 50.0 <= roi.mean_hu <= 300.0, (level, roi.mean_hu)
        # Trabecular bone is less dense than the whole vertebra with its cortex (spine report's mean).
        report = json.loads((example_data / "spine_report" / "spine_report.json").read_text())["results"]
        assert roi.mean_hu < report[f"vertebrae_{level}_intensity"] + 20.0, level
    # L1 holds a bone island (13 voxels of 300-770 HU): left out, its mean is its median again,
    # and the opportunistic category is read from the trabecular bone (96 HU, not 123)
    assert "focal_lesion_excluded" in rois["L1"].flags
    assert abs(rois["L1"].mean_hu - rois["L1"].median_hu) < 5.0
    assert not any("focal_lesion_excluded" in rois[level].flags for level in ("L2", "L3", "L4", "L5"))
    summary = at.bone_summary(list(rois.values()))
    assert summary.category == "osteoporosis-likely" and summary.lumbar_mean_hu is not None
    seg = read_labelmap(example_data / "example_seg_fast_force_split.nii.gz", reference=ct)
    contrast = measure_contrast(ct.array, seg.array, ct.ijk_to_ras)
    assert contrast.aorta_hu is not None and -50.0 < contrast.aorta_hu < 500.0
