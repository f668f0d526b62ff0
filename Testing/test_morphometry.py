"""Vertebral morphometry against phantom truth: frames, body separation, heights (SPEC §4).

The phantoms here are small (three to four levels) so the file stays fast; the accuracy benchmark
over a large phantom suite lives in ``Testing/benchmarks/bench_morphometry.py``.
"""

import numpy as np
import pytest

from VertebralFractureScreenLib.measure import muscles as mu
from VertebralFractureScreenLib.measure.frames import VertebraFrame, spine_tangents
from VertebralFractureScreenLib.measure.morphometry import measure_heights
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, make_phantom

LOCAL_IS_RAS = VertebraFrame(np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))
"""A vertebra frame whose local ``(u, v, w)`` are RAS millimetres (the synthetic endplate patches'
frame)."""

FRACTURES = (Fracture("L1", "wedge", 0.3), Fracture("L2", "biconcave", 0.3), Fracture("L3", "crush", 0.25))


@pytest.fixture(scope="module")
def phantom_1mm():
    """1 mm isotropic, rotated against the grid, noise 10 HU, one fracture of each shape."""
    spec = PhantomSpec(levels=("T12", "L1", "L2", "L3", "L4"), spacing=(1.0, 1.0, 1.0), supersampling=3,
                       rotation_deg=(8.0, -5.0, 12.0), noise_hu=10.0, fractures=FRACTURES, seed=3)
    return make_phantom(spec)


def _errors(results, truth, keys=("ha_mm", "hm_mm", "hp_mm")):
    by_level = {v["level"]: v for v in truth["vertebrae"]}
    return np.array([getattr(r, k) - by_level[r.level][k] for r in results if by_level[r.level]["complete"]
                     for k in keys])


def _angle_deg(a, b):
    return float(np.degrees(np.arccos(np.clip(abs(np.dot(a, b)), -1.0, 1.0))))


def test_frames_follow_the_anatomy(phantom_1mm):
    results = measure_heights(phantom_1mm.total, phantom_1mm.ijk_to_ras, body_labels=phantom_1mm.vertebrae_body)
    truth = {v["level"]: v for v in phantom_1mm.truth["vertebrae"]}
    assert [r.level for r in results] == ["T12", "L1", "L2", "L3", "L4"]
    for r in results:
        axes = truth[r.level]["axes_ras"]
        assert _angle_deg(r.frame.cc, axes["cc"]) < 4.0, r.level
        assert _angle_deg(r.frame.ap, axes["ap"]) < 4.0, r.level
        assert np.dot(r.frame.ap, axes["ap"]) > 0  # anterior, not posterior
        assert np.allclose(np.cross(r.frame.ap, r.frame.cc), r.frame.lr)


@pytest.mark.parametrize("use_body_map", [True, False], ids=["vertebrae_body", "shape"])
def test_heights_with_ct_are_sub_voxel(phantom_1mm, use_body_map):
    body = phantom_1mm.vertebrae_body if use_body_map else None
    results = measure_heights(phantom_1mm.total, phantom_1mm.ijk_to_ras, body_labels=body, ct=phantom_1mm.ct)
    errors = _errors(results, phantom_1mm.truth)
    assert np.median(np.abs(errors)) <= 0.3
    assert np.max(np.abs(errors)) <= 0.8
    assert all(r.endplate_method == "ct" for r in results)


def _axis_point_ap_errors(results, truth):
    """Per complete vertebra: (axis point, Hm line's midpoint) minus the true Hm line's midpoint,
    along the true antero-posterior axis (mm)."""
    by_level = {v["level"]: v for v in truth["vertebrae"]}
    errors = []
    for r in results:
        t = by_level[r.level]
        if not t["complete"]:
            continue
        true_mid = np.mean(np.asarray(t["height_points_ras"]["hm"], dtype=float), axis=0)
        hm_mid = np.mean(np.asarray(r.height_lines_ras["hm"], dtype=float), axis=0)
        ap = np.asarray(t["axes_ras"]["ap"])
        errors.append(((r.axis_point_ras - true_mid) @ ap, (hm_mid - true_mid) @ ap))
    return np.array(errors)


def test_axis_points_and_slab_planes_follow_the_phantom(phantom_1mm):
    """The axis point lies between the CT-fitted walls; with 1 mm voxels the slab planes' normals
    are the secants between them and follow the phantom's mid-disc planes."""
    results = measure_heights(phantom_1mm.total, phantom_1mm.ijk_to_ras, body_labels=phantom_1mm.vertebrae_body,
                              ct=phantom_1mm.ct)
    assert all(r.axis_point_from_ct for r in results)
    for r in results:  # a 1 mm voxel's width along an axis oblique to the grid: 1 to sqrt(3) mm
        assert np.allclose(r.voxel_extent_mm, [np.abs(axis).sum() for axis in (r.frame.lr, r.frame.ap, r.frame.cc)])
    errors = _axis_point_ap_errors(results, phantom_1mm.truth)
    assert np.max(np.abs(errors[:, 0])) <= 0.05, errors
    truth = {(r["muscle"], r["level"]): r for r in phantom_1mm.truth["muscles"]}
    angles = []
    for slab in mu.level_slabs(results):
        for side in ("below", "above"):
            plane = getattr(slab, side)
            if plane.measured:
                angles.append(_angle_deg(plane.normal, truth[("autochthon_left", slab.level)]["slab_planes_ras"][side]["normal"]))
    assert len(angles) == 8 and max(angles) <= 0.5, angles


def test_axis_point_at_thick_voxels_is_placed_by_the_ct():
    """Upright 3 mm voxels: the mask's walls are off by up to half a voxel on every row, the
    CT-fitted walls much less; without the CT the axis point is the Hm line's midpoint."""
    p = make_phantom(PhantomSpec(levels=("L1", "L2", "L3", "L4"), spacing=(3.0, 3.0, 3.0), supersampling=3, seed=5))
    with_ct = measure_heights(p.total, p.ijk_to_ras, body_labels=p.vertebrae_body, ct=p.ct)
    assert all(r.axis_point_from_ct for r in with_ct)
    errors = _axis_point_ap_errors(with_ct, p.truth)
    assert np.max(np.abs(errors[:, 1])) > 1.0  # the mask's midpoint (L3 here)
    assert np.mean(np.abs(errors[:, 0])) <= 0.4 * np.mean(np.abs(errors[:, 1])), errors
    assert np.max(np.abs(errors[:, 0])) <= 0.6, errors
    for r in measure_heights(p.total, p.ijk_to_ras, body_labels=p.vertebrae_body):
        assert not r.axis_point_from_ct
        assert np.allclose(r.axis_point_ras, np.mean(np.asarray(r.height_lines_ras["hm"], dtype=float), axis=0))


def test_heights_from_masks_only(phantom_1mm):
    """VerSe-style input: no CT, no body map: heights within about a voxel."""
    results = measure_heights(phantom_1mm.verse, phantom_1mm.ijk_to_ras, convention="verse")
    errors = _errors(results, phantom_1mm.truth)
    assert len(errors) == 15
    assert np.median(np.abs(errors)) <= 0.6
    assert np.max(np.abs(errors)) <= 1.5
    assert all(r.endplate_method == "mask" for r in results)


def test_shape_separated_body_matches_body_map(phantom_1mm):
    with_map = measure_heights(phantom_1mm.total, phantom_1mm.ijk_to_ras, body_labels=phantom_1mm.vertebrae_body)
    by_shape = measure_heights(phantom_1mm.total, phantom_1mm.ijk_to_ras)
    truth = {v["level"]: v for v in phantom_1mm.truth["vertebrae"]}
    for a, b in zip(with_map, by_shape):
        assert b.body_volume_ml == pytest.approx(a.body_volume_ml, rel=0.08)
        assert a.body_volume_ml == pytest.approx(truth[a.level]["body_volume_ml"], rel=0.03)
        assert b.depth_mm == pytest.approx(truth[b.level]["body_depth_mm"], abs=1.0)


def test_cut_vertebra_is_incomplete():
    spec = PhantomSpec(levels=("L1", "L2", "L3"), spacing=(2.0, 2.0, 2.0), supersampling=1)
    full = make_phantom(spec)
    nk = full.total.shape[0]
    cut = PhantomSpec(levels=spec.levels, spacing=spec.spacing, supersampling=1,
                      size_ijk=(full.total.shape[2], full.total.shape[1], nk - 8))
    phantom = make_phantom(cut)
    results = {r.level: r for r in measure_heights(phantom.total, phantom.ijk_to_ras)}
    truth = {v["level"]: v["complete"] for v in phantom.truth["vertebrae"]}
    for level, result in results.items():
        assert result.complete == truth[level], level
        if not truth[level]:
            assert "touches_field_of_view_edge" in result.flags


def test_spine_tangents_of_a_circle_are_exact():
    """Centroids on a circular arc with unequal spacing: the parabola fit gives the tangent."""
    radius = 250.0
    angles = np.radians([30.0, 22.0, 15.5, 7.0, 0.0])  # cranial first
    points = [np.array([0.0, radius * (1 - np.cos(a)), radius * np.sin(a)]) for a in angles]
    for point, tangent, angle in zip(points, spine_tangents(points), angles):
        expected = np.array([0.0, np.sin(angle), np.cos(angle)])
        assert _angle_deg(tangent, expected) < 0.3


def test_real_example_ct(example_data):
    """TotalSegmentator's example CT (3 mm, T11–S1): L1–L5 complete and graded, none grade ≥ 2;
    T11 and T12, cut by the field of view, incomplete and never graded."""
    from VertebralFractureScreenLib.measure.grading import grade_spine
    from VertebralFractureScreenLib.io.images import read_ct, read_labelmap

    ct = read_ct(example_data / "example_ct.nii.gz")
    labels = read_labelmap(example_data / "spine_report" / "totalseg.nii.gz", reference=ct)
    bodies = read_labelmap(example_data / "spine_report" / "totalseg_vertebrae_body.nii.gz", reference=ct)
    heights = measure_heights(labels.array, ct.ijk_to_ras, body_labels=bodies.array, ct=ct.array)
    grades = {g.level: g for g in grade_spine(heights)}
    by_level = {h.level: h for h in heights}
    for level in ("L1", "L2", "L3", "L4", "L5"):
        assert by_level[level].complete, by_level[level].flags
        assert grades[level].genant_grade is not None and grades[level].genant_grade < 2
        for value in (by_level[level].ha_mm, by_level[level].hm_mm, by_level[level].hp_mm):
            assert 18.0 < value < 35.0  # adult lumbar body heights
    for level in ("T11", "T12"):
        assert not by_level[level].complete
        assert "touches_field_of_view_edge" in by_level[level].flags
        assert grades[level].genant_grade is None


def test_no_negative_height_on_a_vertebra_cut_by_the_field_of_view(example_data):
    """The 20-slice DICOM example (2 mm slices) ends inside T11: the body is cut at its superior
    endplate, so T11 is incomplete and says so; a line whose superior endplate was found at or
    below the inferior one has no height (NaN, ``endplates_cross``, no line); no vertebra reports
    a height <= 0. (With the frames of an earlier version T11's anterior endplates crossed here;
    its frame now leaves T11's cut body out of the spine's centre line, and they do not.)"""
    from VertebralFractureScreenLib.io.images import read_ct, read_labelmap

    ct = read_ct(example_data / "example_ct_dicom")
    labels = read_labelmap(example_data / "example_seg_dicom.nii.gz", reference=ct)
    by_level = {h.level: h for h in measure_heights(labels.array, ct.ijk_to_ras, ct=ct.array)}
    t11 = by_level["T11"]
    assert {"endplate_cut_superior", "touches_field_of_view_edge"} <= set(t11.flags) and not t11.complete
    for h in by_level.values():
        heights = np.array([h.ha_mm, h.hm_mm, h.hp_mm])
        assert not np.any(heights[np.isfinite(heights)] <= 0.0), h.level
        for key, value in zip(("ha", "hm", "hp"), heights):
            assert np.isfinite(value) == (key in h.height_lines_ras), (h.level, key)
        if not np.all(np.isfinite(heights)) and h.complete:
            assert "endplates_cross" in h.flags or "heights_not_measurable" in h.flags, h.flags


def _upright_endplate_voxels(surface_w: float, spacing=(3.0, 3.0, 3.0), disc=90.0, trabecular=160.0,
                             cortical=700.0, cortex=1.0, slope=0.0):
    """CT values of an upright superior endplate (body below ``surface_w``, a ``cortex`` mm plate
    just inside it) on a grid of ``spacing`` mm voxels, each the exact mean of the profile over its
    slice (numerical integration, independent of the fit's partial-volume model). With ``slope``
    the endplate is tilted, ``surface_w + slope · v`` at each voxel's ``v``. Returns the values,
    the voxels' local ``(u, v, w)`` and the grid's IJK→RAS matrix (local = RAS)."""
    su, sv, sw = spacing
    u, v, w = np.meshgrid(np.arange(-2, 3) * su, np.arange(-4, 5) * sv, np.arange(-3, 3) * sw + 0.5 * sw,
                          indexing="ij")
    fine = np.linspace(-0.5, 0.5, 3001)[None, :] * sw + w.reshape(-1, 1)
    surface_w = surface_w + slope * v.reshape(-1, 1)
    profile = np.where(fine > surface_w, disc, np.where(fine > surface_w - cortex, cortical, trabecular))
    values = profile.mean(axis=1)
    local = np.stack([u.ravel(), v.ravel(), w.ravel()], axis=1)
    return values, local, np.diag([su, sv, sw, 1.0])


def test_plate_hu_is_fitted_jointly_over_endplates():
    """An endplate whose plate lies inside one slice cannot tell its plate's HU from its
    position; summed over endplates at several offsets to the slices, the residual is smallest
    at the true cortical HU (700), whatever the trabecular bone beside it."""
    from VertebralFractureScreenLib.measure.endplate_model import plate_hu_residuals
    from VertebralFractureScreenLib.measure.morphometry import PLATE_HUS

    frame = LOCAL_IS_RAS
    knots_v = np.array([10.0, 0.0, -10.0])
    total = np.zeros(len(PLATE_HUS))
    for offset, trabecular in zip(np.linspace(-1.4, 1.4, 8), np.linspace(90.0, 200.0, 8)):  # position in the slice, mm
        values, local, ijk_to_ras = _upright_endplate_voxels(offset, trabecular=trabecular)
        start = np.full(3, offset + 0.6)  # a guess off by a fifth of a voxel
        total += plate_hu_residuals(values, local, +1, knots_v, start, frame, ijk_to_ras, 1.0, 2.0, PLATE_HUS)
    best = PLATE_HUS[int(np.argmin(total))]
    assert best == pytest.approx(700.0, abs=20.0)
    # one endplate with its plate well inside a slice is (nearly) blind to the plate's HU
    values, local, ijk_to_ras = _upright_endplate_voxels(2.0)  # the plate 1 mm from either slice border
    alone = plate_hu_residuals(values, local, +1, knots_v, np.full(3, 2.0), frame, ijk_to_ras, 1.0, 2.0, PLATE_HUS)
    near = np.abs(PLATE_HUS - 700.0) <= 50.0
    assert np.ptp(alone[near]) < 0.01 * np.ptp(total[near])


def test_natural_spline_basis_interpolates_and_keeps_lines():
    from VertebralFractureScreenLib.measure.endplate_model import natural_spline_basis

    knots_v = np.array([-11.0, -5.5, 0.0, 5.5, 11.0])
    v = np.linspace(-15.0, 15.0, 61)
    assert natural_spline_basis(knots_v, knots_v) == pytest.approx(np.eye(5), abs=1e-12)
    line = 2.0 - 0.3 * knots_v
    assert natural_spline_basis(knots_v, v) @ line == pytest.approx(2.0 - 0.3 * v, abs=1e-9)  # beyond the ends too


def test_thin_thoracic_discs_at_thick_slices():
    """Mid-thoracic bodies at 0.7x0.7x3 mm, upright (endplates parallel to the slices), bone only
    40–60 HU denser than the discs, which are too thin for a slice of pure disc. The end vertebrae's
    outer endplates face soft tissue, not a disc: their HU must not stand in for the discs' (it
    moved endplates by up to 1.3 mm), and the partial-volume model's misfit must not bend flat
    endplates (up to 0.7 mm). Noise-free, so the tolerance is the method's, not the noise's."""
    spec = PhantomSpec(levels=("T4", "T5", "T6", "T7", "T8"), spacing=(0.7, 0.7, 3.0), fractures=(),
                       trabecular_hu={"T4": 150.0, "T5": 145.0, "T6": 140.0, "T7": 135.0, "T8": 130.0},
                       noise_hu=0.0, psf_fwhm_mm=0.0)
    phantom = make_phantom(spec)
    truth = {v["level"]: v for v in phantom.truth["vertebrae"]}
    results = measure_heights(phantom.total, phantom.ijk_to_ras, body_labels=phantom.vertebrae_body, ct=phantom.ct)
    assert [r.level for r in results] == list(spec.levels)
    for r in results:
        assert r.endplate_method == "ct", r.level
        errors = [getattr(r, f"{key}_mm") - truth[r.level][f"{key}_mm"] for key in ("ha", "hm", "hp")]
        assert np.max(np.abs(errors)) <= 0.5, (r.level, np.round(errors, 2))


def test_height_sd_matches_the_spread_over_noise_draws():
    """The standard deviation reported with an endplate fit (least-squares covariance) is the
    spread of the fitted surface over independent noise draws: an upright endplate at 3 mm
    slices, 40 draws of 20 HU noise, reported and observed spread within 30 % of each other; and
    the spread grows with the noise."""
    from VertebralFractureScreenLib.measure.endplate_fit import EndplateProfileFit

    frame = LOCAL_IS_RAS
    knots_v = np.array([10.0, 0.0, -10.0])
    surface = 0.4  # mm within its slice
    values, local, ijk_to_ras = _upright_endplate_voxels(surface)
    rng = np.random.default_rng(3)
    spread = {}
    for sigma in (10.0, 20.0):
        fitted, reported = [], []
        for _ in range(40):
            noisy = values + rng.normal(0.0, sigma, values.shape)
            fit = EndplateProfileFit(noisy, local, +1, knots_v, frame, ijk_to_ras, 1.0, 2.3, 700.0, 90.0,
                                     thorough=True).fit(np.full(3, surface + 0.5), straight_only=True)
            fitted.append(fit[0])
            reported.append(fit[2])
        observed, reported = np.std(fitted, axis=0, ddof=1), np.median(reported, axis=0)
        assert np.all(np.isfinite(reported)) and np.all(reported > 0)
        assert observed == pytest.approx(reported, rel=0.3), (sigma, observed, reported)
        spread[sigma] = np.median(reported)
    assert spread[20.0] == pytest.approx(2.0 * spread[10.0], rel=0.3)


def test_height_sd_sees_a_residual_made_bumpy_by_the_noise():
    """At 300 HU noise on a 3 mm endplate patch the residual has several minima across the slice
    and the fit jumps between them: its least-squares covariance alone says 1/3.6–1/4.5 of the
    observed spread over 40 draws. The reported SD (at thick slices also the spread of the
    residual's likelihood along shifts and tilts of the endplate, within the fit's window) comes
    within a factor 3.4 of it without overshooting. (The profiles are conditional, one move at a
    time, so they still miss the tilt's share of a knot's spread.)"""
    from VertebralFractureScreenLib.measure.endplate_fit import EndplateProfileFit

    frame = LOCAL_IS_RAS
    knots_v = np.array([10.0, 0.0, -10.0])
    surface = 0.4
    values, local, ijk_to_ras = _upright_endplate_voxels(surface)
    rng = np.random.default_rng(5)
    fitted, reported = [], []
    for _ in range(40):
        noisy = values + rng.normal(0.0, 300.0, values.shape)
        fit = EndplateProfileFit(noisy, local, +1, knots_v, frame, ijk_to_ras, 1.0, 2.3, 700.0, 90.0,
                                 thorough=True).fit(np.full(3, surface + 0.5), straight_only=True)
        fitted.append(fit[0])
        reported.append(fit[2])
    observed, reported = np.std(fitted, axis=0, ddof=1), np.median(reported, axis=0)
    assert np.all(observed <= 3.4 * reported) and np.all(reported <= 1.5 * observed), (observed, reported)


def test_thick_slice_endplate_fit_stays_in_its_window():
    """An endplate fit looks only within its search reach of the mask's endplate (beyond it, a
    thin disc away, lies the neighbour's endplate), in every step: at thick slices also the first
    grid of shifts and tilts, whose corners (a full shift plus a full tilt) lay twice the reach
    away at the end knots. (On the 3 mm attenuation phantom at 20 HU noise such a corner tilted a
    flat T7 endplate by 3.3 mm, and with the fit outside its window the likelihood profile behind
    its SD was skipped: 0.08 mm reported.) Endplates tilted against the mask's flat one by up to
    0.3 mm per mm, 3 mm voxels, noise-free and at 20 HU: every fitted knot lies within the reach,
    and where the endplate lies within it the fit finds it."""
    from VertebralFractureScreenLib.measure.endplate_fit import EndplateProfileFit

    frame = LOCAL_IS_RAS
    knots_v = np.array([10.0, 0.0, -10.0])
    mask, search = np.full(3, 0.9), 2.3
    rng = np.random.default_rng(1)
    for slope in (0.0, 0.1, 0.15, 0.2, 0.25, 0.3):
        values, local, ijk_to_ras = _upright_endplate_voxels(0.4, slope=slope)
        truth = 0.4 + slope * knots_v
        for sigma in (0.0, 20.0):
            noisy = values + rng.normal(0.0, sigma, values.shape)
            fitted, _, sd = EndplateProfileFit(noisy, local, +1, knots_v, frame, ijk_to_ras, 1.0, search, 700.0, 90.0,
                                               thorough=True).fit(mask, straight_only=True)
            assert np.max(np.abs(fitted - mask)) <= search + 1e-9, (slope, sigma, fitted)
            assert np.all(np.isfinite(sd)), (slope, sigma, sd)
            if np.max(np.abs(truth - mask)) <= search:
                assert np.max(np.abs(fitted - truth)) < 0.2, (slope, sigma, fitted, truth)


def test_endplate_fit_leans_on_the_mask_only_where_the_noise_hides_the_endplate():
    """Each CT-fitted endplate is combined with the mask's by inverse variance (the mask's SD half
    a voxel): at 10 HU noise the fit decides (the mask's endplate, 1 mm off, moves it by less than
    0.05 mm); at 300 HU noise the combination lies between the fit and the mask, and its reported
    SD never exceeds either's. An undetermined fit (inf SD) takes the mask's endplate and SD."""
    from VertebralFractureScreenLib.measure.endplate_fit import MASK_ENDPLATE_SD_VOXELS, EndplateProfileFit, with_mask_endplate

    frame = LOCAL_IS_RAS
    knots_v = np.array([10.0, 0.0, -10.0])
    surface = 0.4
    values, local, ijk_to_ras = _upright_endplate_voxels(surface)
    mask = np.full(3, surface + 1.0)
    mask_sd = MASK_ENDPLATE_SD_VOXELS * 3.0
    rng = np.random.default_rng(5)
    for sigma in (10.0, 300.0):
        for _ in range(10):
            noisy = values + rng.normal(0.0, sigma, values.shape)
            fitted, _, sd = EndplateProfileFit(noisy, local, +1, knots_v, frame, ijk_to_ras, 1.0, 2.3, 700.0, 90.0,
                                               thorough=True).fit(mask, straight_only=True)
            combined, combined_sd = with_mask_endplate(fitted, sd, mask, mask_sd)
            assert np.all(combined_sd <= np.minimum(sd, mask_sd) + 1e-12)
            assert np.all((combined - fitted) * (combined - mask) <= 1e-12)  # between the two
            if sigma == 10.0:
                assert np.max(np.abs(combined - fitted)) < 0.05
    combined, combined_sd = with_mask_endplate(np.array([2.0, 3.0]), np.array([np.inf, 0.5]), np.array([1.0, 1.0]), 0.5)
    assert combined == pytest.approx([1.0, 2.0]) and combined_sd == pytest.approx([0.5, 0.5 / np.sqrt(2.0)])


def test_crossings_walk_out_from_each_start():
    """Where each profile first falls below one half walking out from its start, interpolated
    between samples; NaN where it never does (the profile runs off the grid)."""
    from VertebralFractureScreenLib.measure.body import crossings

    coords = np.arange(8) * 0.5  # mm
    profiles = np.array([
        [0.0, 0.2, 1.0, 1.0, 1.0, 0.6, 0.0, 0.0],  # crosses between 2.5 and 3.0 mm up, 0.5 and 1.0 down
        [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # from index 4 it never falls going up
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # started at its last inside sample
    ])
    starts = np.array([3, 4, 3])
    up = crossings(profiles, coords, starts, +1)
    down = crossings(profiles, coords, starts, -1)
    assert up[0] == pytest.approx(2.5 + 0.5 * (0.6 - 0.5) / 0.6)
    assert np.isnan(up[1]) and up[2] == pytest.approx(1.5 + 0.5 * 0.5)
    assert down[0] == pytest.approx(1.0 - 0.5 * (1.0 - 0.5) / 0.8)
    assert down[1] == pytest.approx(1.0 + 0.5 * 0.5) and np.isnan(down[2])


def test_height_profile_finds_the_deepest_point_and_the_area(phantom_1mm):
    """The height profile, the middle region's deepest point, the sagittal area and the endplates'
    depression against the phantom's drawn bodies (wedge L1, biconcave L2, crush L3, normal T12
    and L4 with flat endplates)."""
    results = {r.level: r for r in measure_heights(phantom_1mm.total, phantom_1mm.ijk_to_ras,
                                                    body_labels=phantom_1mm.vertebrae_body, ct=phantom_1mm.ct)}
    truth = {v["level"]: v for v in phantom_1mm.truth["vertebrae"]}
    profile_errors = np.concatenate([np.subtract(results[n].height_profile_mm, truth[n]["height_profile_mm"])
                                     for n in results])
    assert np.median(np.abs(profile_errors)) <= 0.4
    for name, r in results.items():
        assert abs(r.hm_min_mm - truth[name]["hm_min_mm"]) <= 0.8, name
        assert r.sagittal_area_mm2 == pytest.approx(truth[name]["sagittal_area_mm2"], rel=0.04), name
        assert len(r.endplate_outline_ras["superior"]) == len(r.height_profile_mm)
    # The biconcave body is deepest at mid-depth, each endplate depressed by about 15 % of its
    # normal height there (the phantom depresses both by half the 30 % loss); flat ones are not.
    biconcave = results["L2"]
    assert abs(biconcave.hm_min_fraction - truth["L2"]["hm_min_fraction"]) <= 0.06
    depression = 0.5 * 0.3 * truth["L2"]["normal_hm_mm"]
    assert biconcave.endplate_depression_mm == pytest.approx((depression, depression), abs=0.8)
    for name in ("T12", "L4", "L3"):
        assert max(results[name].endplate_depression_mm) <= 0.6, name
