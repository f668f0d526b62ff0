"""Paraspinal muscles per level slab against phantom truth (SPEC §4).

Truth: the phantom's muscle rows per level slab (``volume_ml``, ``lean_hu``, ``imat_fraction``,
``fov_fraction``, ``slab_planes_ras``). The phantoms are coarse (2.5 mm) so the file stays fast;
``Testing/benchmarks/bench_attenuation.py`` covers 1 mm to 3 mm voxels, rotations and noise.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.measure import level_slabs as sl
from VertebralFractureScreenLib.measure import muscles as mu
from VertebralFractureScreenLib.geometry import make_ijk_to_ras, rotation_matrix
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap
from VertebralFractureScreenLib.measure.morphometry import VertebraFrame, VertebraHeights, measure_heights
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, make_phantom

LUMBAR_SPINE = PhantomSpec(levels=("T12", "L1", "L2", "L3", "L4", "L5", "S1"), spacing=(2.5, 2.5, 2.5),
                           supersampling=1, rotation_deg=(10.0, 0.0, 10.0), lordosis_deg=50.0,
                           fractures=(Fracture("L3", "biconcave", 0.3),))


class Exam:
    def __init__(self, spec: PhantomSpec):
        self.phantom = p = make_phantom(spec)
        self.heights = measure_heights(p.total, p.ijk_to_ras, body_labels=p.vertebrae_body, ct=p.ct)
        self.rows = mu.measure_muscles(p.ct, p.total, p.ijk_to_ras, self.heights)
        self.truth = {(r["muscle"], r["level"]): r for r in p.truth["muscles"]}

    def pairs(self):
        """(our row, truth row) for every row the phantom has truth for."""
        return [(r, self.truth[(r.muscle, r.level)]) for r in self.rows if (r.muscle, r.level) in self.truth]


@pytest.fixture(scope="module")
def full():
    """T12–S1, rotated against the grid, strong lordosis, a biconcave L3; no partial volume, no noise."""
    return Exam(LUMBAR_SPINE)


@pytest.fixture(scope="module")
def cut(full):
    """The same anatomy with 40 slices fewer: the field of view cuts through T12 and L1."""
    nk, nj, ni = full.phantom.ct.shape
    return Exam(replace(LUMBAR_SPINE, size_ijk=(ni, nj, nk - 40)))


@pytest.fixture(scope="module")
def partial_volume():
    """L2–L4 with partial volume rendered (fat spheres of 3–7 mm in 2.5 mm voxels)."""
    return Exam(PhantomSpec(levels=("L2", "L3", "L4"), spacing=(2.5, 2.5, 2.5), supersampling=3))


# ------------------------------------------------------------------------------------------------
# slabs
# ------------------------------------------------------------------------------------------------


def test_slab_planes_follow_the_phantoms(full):
    slabs = {s.level: s for s in sl.level_slabs(full.heights)}
    assert list(slabs) == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert slabs["T12"].flags == ["no_vertebra_above"] and not slabs["T12"].above.measured
    truth_v = {v["level"]: v for v in full.phantom.truth["vertebrae"]}
    checked = 0
    for level in ("L1", "L2", "L3", "L4", "L5"):
        slab = slabs[level]
        assert slab.complete and slab.below.measured and slab.above.measured
        true = full.truth[("autochthon_left", level)]["slab_planes_ras"]
        for side in ("below", "above"):
            plane, t = getattr(slab, side), true[side]
            normal, point = np.asarray(t["normal"]), np.asarray(t["point"])
            assert np.degrees(np.arccos(np.clip(plane.normal @ normal, -1, 1))) <= 2.0, (level, side)
            assert abs(plane.signed_distance(point[None])[0]) <= 1.0, (level, side)
            behind = point - 55.0 * np.asarray(truth_v[level]["axes_ras"]["ap"])  # the autochthon
            behind -= ((behind - point) @ normal) * normal
            assert abs(plane.signed_distance(behind[None])[0]) <= 2.0, (level, side)
            checked += 1
        assert slab.thickness_mm == pytest.approx(
            (np.asarray(true["above"]["point"]) - np.asarray(true["below"]["point"])) @ slab.axis, abs=1.5)
    assert checked == 10
    assert slabs["L2"].above is slabs["L1"].below  # adjacent slabs share their plane


def _fake_vertebra(level: str, z: float, top: float, bottom: float) -> VertebraHeights:
    """A vertebra on the S axis: body centre at height ``z``, endplates ``top`` / ``bottom`` mm
    above / below it (RAS), lines 15 mm in front of and behind the centre."""
    frame = VertebraFrame(np.array([0.0, 0.0, z]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]),
                          np.array([0.0, 0.0, 1.0]))
    lines = {key: (np.array([0.0, a, z + top]), np.array([0.0, a, z - bottom]))
             for key, a in (("ha", 10.5), ("hm", 0.0), ("hp", -10.5))}
    return VertebraHeights(level, lv.TOTAL_VERTEBRA_IDS[level], True, ha_mm=top + bottom, hm_mm=top + bottom,
                           hp_mm=top + bottom, frame=frame, height_lines_ras=lines)


def test_thick_slab_normal_averages_the_masks_and_the_cts_middles():
    """With voxels thicker than 2 mm along the bodies' depth, a disc plane's normal is the mean of
    the bodies' axes and of the secant between their middles, each middle the Hm line's midpoint
    (walls from the mask, here 1 mm off to either side) averaged with the CT's axis point (here on
    the true axis): the plane tilts by half the mask's error, and by all of it without the CT."""
    upper, lower = _fake_vertebra("L1", 31.0, 11.0, 11.0), _fake_vertebra("L2", 0.0, 11.0, 11.0)
    for h, ap_error in ((upper, 1.0), (lower, -1.0)):
        h.voxel_extent_mm = (3.0, 3.0, 3.0)
        h.height_lines_ras = {key: (a + [0.0, ap_error, 0.0], b + [0.0, ap_error, 0.0])
                              for key, (a, b) in h.height_lines_ras.items()}
    spine_axis = np.array([0.0, 0.0, 1.0])

    def tilt_deg(heights) -> float:
        plane = sl.level_slabs(heights)[0].below
        return float(np.degrees(np.arctan2(plane.normal[1], plane.normal[2])))

    def expected(ap_offset: float) -> float:  # the middles ap_offset mm off, either way
        secant = np.array([0.0, 2.0 * ap_offset, 31.0])
        normal = secant / np.linalg.norm(secant) + spine_axis
        return float(np.degrees(np.arctan2(normal[1], normal[2])))

    assert tilt_deg([upper, lower]) == pytest.approx(expected(1.0), abs=1e-9)  # no CT axis points
    for h in (upper, lower):
        h.axis_point_ras, h.axis_point_from_ct = h.frame.centre.copy(), True
    assert tilt_deg([upper, lower]) == pytest.approx(expected(0.5), abs=1e-9)
    assert 0.5 < expected(0.5) < 0.5 * expected(1.0) + 0.01


@pytest.mark.parametrize("rotated", [False, True], ids=["slices", "grid turned in plane"])
def test_slab_volume_is_exact_between_arbitrary_planes(rotated):
    """A block of muscle on thick slices: a slab's volume is the block's cross-section times the
    distance between the planes, although the planes fall between voxel centres (voxels cut by a
    plane count with the share of their volume on each side; counting centres would be off by up
    to a slice on each side, ±16 % here)."""
    directions = rotation_matrix(0.0, 0.0, 30.0) if rotated else np.eye(3)
    m = make_ijk_to_ras((1.5, 1.5, 3.0), directions @ np.array([-60.0, -60.0, -90.0]), directions)
    labels = np.zeros((61, 81, 81), dtype=np.uint8)
    # The muscle: every voxel whose centre lies in a 30 x 24 mm prism around x = 40 mm, y = -10 mm.
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in labels.shape), indexing="ij")
    xyz = np.stack([ii, jj, kk], axis=-1).reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
    inside = (np.abs(xyz[:, 0] - 40.0) <= 15.0) & (np.abs(xyz[:, 1] + 10.0) <= 12.0) & (np.abs(xyz[:, 2]) <= 70.0)
    labels.reshape(-1)[inside] = lv.TOTAL_AUTOCHTHON_LEFT
    ct = np.where(labels > 0, 50, -100).astype(np.int16)
    heights = [_fake_vertebra("L1", 31.3, 11.2, 10.9), _fake_vertebra("L2", 0.0, 12.1, 11.7),
               _fake_vertebra("L3", -32.6, 11.4, 12.3)]
    rows = {r.level: r for r in mu.measure_muscles(ct, labels, m, heights, muscles={"autochthon_left": 86},
                                                   lumbar_total=False)}
    upper = 0.5 * ((31.3 - 10.9) + 12.1)  # halfway between L1's inferior and L2's superior endplate
    lower = 0.5 * (-11.7 + (-32.6 + 11.4))
    per_slice = np.count_nonzero(labels, axis=(1, 2))
    per_slice = per_slice[per_slice > 0]
    assert np.all(per_slice == per_slice[0])  # the slices stay along S: the same section in each
    area_mm2 = per_slice[0] * 1.5 * 1.5
    assert rows["L2"].complete and rows["L2"].flags == []
    assert rows["L2"].volume_ml == pytest.approx(area_mm2 * (upper - lower) / 1000.0, rel=1e-6)
    assert rows["L2"].mean_hu == pytest.approx(50.0) and rows["L2"].lean_hu == pytest.approx(50.0)
    assert rows["L2"].imat_fraction == 0.0
    assert rows["L1"].flags == ["no_vertebra_above"] and rows["L3"].flags == ["no_vertebra_below"]
    # Slabs given by the caller (e.g. planes known from elsewhere) replace the morphometry's: an
    # oblique slab 20 mm thick at the block, tilted 10° about the block's long axis (x).
    tilt = np.radians(10.0)
    normal = np.array([0.0, -np.sin(tilt), np.cos(tilt)])
    centre = np.array([40.0, -10.0, 5.0])
    given = [sl.LevelSlab("L2", sl.SlabPlane(centre - 10.0 * normal, normal, ("L2", "L3")),
                          sl.SlabPlane(centre + 10.0 * normal, normal, ("L1", "L2")))]
    row = mu.measure_muscles(ct, labels, m, heights, muscles={"autochthon_left": 86}, lumbar_total=False,
                             slabs=given)[0]
    assert row.level == "L2"
    # a prism cut by two parallel planes 20 mm apart: its cross-section along z times 20 / cos(tilt)
    assert row.volume_ml == pytest.approx(area_mm2 * 20.0 / np.cos(tilt) / 1000.0, rel=0.01)


# ------------------------------------------------------------------------------------------------
# metrics against truth
# ------------------------------------------------------------------------------------------------


def test_volumes_hu_and_fat_against_truth(full):
    pairs = [(r, t) for r, t in full.pairs() if r.complete]
    levels = {r.level for r, _ in pairs}
    assert levels == {"L1", "L2", "L3", "L4", "L5", "lumbar"}
    for r, t in pairs:
        tolerance = 0.015 if r.level == "lumbar" else 0.08  # 2.5 mm voxels
        assert r.volume_ml == pytest.approx(t["volume_ml"], rel=tolerance), (r.muscle, r.level)
        # No partial volume and no noise: every voxel is pure muscle (50 HU) or pure fat.
        assert r.mean_hu == pytest.approx(t["lean_hu"], abs=1e-4) and r.lean_hu == pytest.approx(t["lean_hu"], abs=1e-4)
        assert r.imat_fraction == pytest.approx(t["imat_fraction"], abs=0.025), (r.muscle, r.level)
        assert r.fat_fraction == pytest.approx(t["imat_fraction"], abs=0.025), (r.muscle, r.level)
        assert r.fat_reference_hu == pytest.approx(full.phantom.truth["spec"]["fat_hu"], abs=0.5)
    lumbar = {r.muscle: r for r in full.rows if r.level == "lumbar"}
    for name, total in lumbar.items():
        parts = [r for r in full.rows if r.muscle == name and r.level in lv.LUMBAR_LEVELS]
        assert total.volume_ml == pytest.approx(sum(r.volume_ml for r in parts))


def test_partial_volume_biases_the_spec_metrics_not_the_guarded_ones(partial_volume):
    """With fat spheres of voxel size, the threshold metrics of SPEC §4 read low (partly-fat voxels
    count as muscle with a lowered HU, or as fat only beyond half); the guarded lean HU and the
    unmixed fat fraction stay on the truth."""
    pairs = [(r, t) for r, t in partial_volume.pairs() if r.complete]
    assert {r.level for r, _ in pairs} == {"L3"} and len(pairs) == 4
    for r, t in pairs:
        assert r.mean_hu < t["lean_hu"] - 3.0, r.muscle
        assert r.lean_hu == pytest.approx(t["lean_hu"], abs=2.0), r.muscle
        assert abs(r.lean_hu - t["lean_hu"]) < 0.3 * abs(r.mean_hu - t["lean_hu"]), r.muscle
        assert r.imat_fraction < t["imat_fraction"] - 0.01, r.muscle
        # The iliopsoas' fat spheres (4.6 mm) are smaller than two voxels here: 0.02 off at most.
        assert r.fat_fraction == pytest.approx(t["imat_fraction"], abs=0.025), r.muscle
        assert abs(r.fat_fraction - t["imat_fraction"]) < abs(r.imat_fraction - t["imat_fraction"]), r.muscle


def test_standard_error_of_a_weighted_mean():
    """Unit weights: the sample SD over sqrt(n); a voxel cut in half by a slab plane counts as half
    a voxel in the effective number."""
    rng = np.random.default_rng(5)
    hu = rng.normal(50.0, 20.0, 200)
    ones = np.ones_like(hu)
    se = mu.standard_error(ones.sum(), hu.sum(), (hu * hu).sum(), ones.sum())
    assert se == pytest.approx(hu.std(ddof=1) / np.sqrt(len(hu)), rel=1e-9)
    half = np.where(np.arange(len(hu)) < 100, 1.0, 0.5)
    n_effective = half.sum() ** 2 / (half ** 2).sum()
    mean = (half * hu).sum() / half.sum()
    sd = np.sqrt((half * (hu - mean) ** 2).sum() / half.sum() * n_effective / (n_effective - 1))
    assert mu.standard_error(half.sum(), (half * hu).sum(), (half * hu * hu).sum(), (half ** 2).sum()) == \
        pytest.approx(sd / np.sqrt(n_effective), rel=1e-9)
    assert np.isnan(mu.standard_error(1.0, 50.0, 2500.0, 1.0))  # one voxel: no spread to measure


def test_hu_standard_errors_match_the_spread_over_noise_draws(full):
    """The muscles are uniform (50 HU, fat pure) and noise-free: every SE is 0. With Gaussian noise
    of 20 HU added, in the same slabs (the noise-free exam's heights), each row's reported SE of
    ``lean_hu`` and ``mean_hu`` is the spread of those means over 40 noise draws (within 35 %),
    and ``lean_hu``'s is the larger (its guarded voxels are a subset of the lean ones)."""
    p = full.phantom
    complete = [r for r in full.rows if r.complete and r.voxels > 100]
    assert complete and all(r.lean_hu_se < 1e-3 and r.mean_hu_se < 1e-3 for r in complete)  # rounding only
    slabs = sl.level_slabs(full.heights)
    rng = np.random.default_rng(11)
    draws = {(r.muscle, r.level): [] for r in complete}
    for _ in range(40):
        ct = (p.ct + rng.normal(0.0, 20.0, p.ct.shape)).astype(np.float32)
        for r in mu.measure_muscles(ct, p.total, p.ijk_to_ras, full.heights, slabs=slabs):
            if (r.muscle, r.level) in draws:
                draws[(r.muscle, r.level)].append((r.lean_hu, r.lean_hu_se, r.mean_hu, r.mean_hu_se))
    for key, rows in draws.items():
        lean, lean_se, mean, mean_se = np.array(rows).T
        assert np.median(lean_se) == pytest.approx(np.std(lean, ddof=1), rel=0.35), key
        assert np.median(mean_se) == pytest.approx(np.std(mean, ddof=1), rel=0.35), key
        assert np.all(lean_se > mean_se), key  # the guarded voxels are a subset of the lean ones


@pytest.mark.parametrize("voxel_mm", [1.0, 3.0])
def test_fat_at_the_muscles_edge_counts_where_its_neighbour_is_close(voxel_mm):
    """A 20-voxel cube of muscle (50 HU) whose outer 6 voxel layers on one side are fat (−100 HU),
    in 0 HU tissue: 30 % fat. The edge voxels' own HU would mix with the tissue around a real
    muscle, so the unmixing does not use it. With 1 mm voxels each edge voxel stands in with its
    interior neighbours' HU and the band's fat on the edge counts (only the cube's edges and
    corners, with no interior face neighbour, drop out: 0.296); with 3 mm voxels the neighbours
    are too far and the edge is left out, reading the interior's 5 fat layers of 18 (0.278)."""
    n, band = 20, 6
    m = make_ijk_to_ras((voxel_mm,) * 3, (-0.5 * (n + 3) * voxel_mm,) * 3)  # the cube's centre at 0
    labels = np.zeros((n + 4,) * 3, dtype=np.uint8)
    labels[2:-2, 2:-2, 2:-2] = lv.TOTAL_AUTOCHTHON_LEFT
    ct = np.where(labels > 0, 50, 0).astype(np.int16)
    ct[2:-2, 2:-2, 2:2 + band] = -100
    up = np.array([0.0, 0.0, 1.0])
    slab = sl.LevelSlab("L2", sl.SlabPlane(np.array([0.0, 0.0, -1e3]), up, ("L2", "L3")),
                        sl.SlabPlane(np.array([0.0, 0.0, 1e3]), up, ("L1", "L2")))
    row = mu.measure_muscles(ct, labels, m, [], muscles={"autochthon_left": lv.TOTAL_AUTOCHTHON_LEFT},
                             lumbar_total=False, slabs=[slab])[0]
    assert row.voxels == n ** 3 and row.lean_hu == pytest.approx(50.0) and row.fat_reference_hu == pytest.approx(-100.0)
    truth = band / n
    interior_only = (band - 1) / (n - 2)
    if voxel_mm == 1.0:
        assert row.fat_fraction == pytest.approx(truth, abs=0.005)
        assert abs(interior_only - truth) > 0.02  # what leaving the edge out would read
    else:
        assert row.fat_fraction == pytest.approx(interior_only, abs=1e-6)


def test_voxel_offsets_do_not_overflow_the_index_type():
    """A 10 x 60 x 200-voxel block of muscle near the far corner of a 512x512x12 grid, its lower
    five slices fat (−100 HU), the upper five lean (50 HU), in fat. :func:`~.muscles.measure_muscles`
    keeps the voxel indices as int16, and the block's crop has a slice stride of 62 x 202 voxels:
    a slice index times it passes 32767, so the offsets must be computed in a wider type (numpy
    1.x, as in 3D Slicer 5.8, keeps int16 times a NumPy integer in int16 when the integer fits;
    there the guarded voxels were looked up at wrapped offsets and ``lean_hu`` read −25 HU)."""
    labels = np.zeros((12, 512, 512), dtype=np.uint8)
    labels[1:11, 450:510, 300:500] = lv.TOTAL_AUTOCHTHON_LEFT
    ct = np.where(labels > 0, 50, -100).astype(np.int16)
    ct[1:6, 450:510, 300:500] = -100
    m = make_ijk_to_ras((0.8, 0.8, 1.0), (0.0, 0.0, 0.0))
    up, centre = np.array([0.0, 0.0, 1.0]), np.array([320.0, 384.0, 0.0])  # the block's centre line
    slab = sl.LevelSlab("L2", sl.SlabPlane(centre - 1e3 * up, up, ("L2", "L3")),
                        sl.SlabPlane(centre + 1e3 * up, up, ("L1", "L2")))
    row = mu.measure_muscles(ct, labels, m, [], muscles={"autochthon_left": lv.TOTAL_AUTOCHTHON_LEFT},
                             lumbar_total=False, slabs=[slab])[0]
    assert row.voxels == 10 * 60 * 200 and row.mean_hu == 50.0 and row.imat_fraction == 0.5
    assert row.lean_hu == 50.0 and row.fat_reference_hu == -100.0 and row.fat_fraction == pytest.approx(0.5)
    # Guarded lean and pure fat voxels: the interiors of the two halves, three slices each.
    kji = tuple(a.astype(np.int16) for a in np.nonzero(labels))
    values = labels[labels > 0]
    guard, _, pure_fat = mu.voxel_classes(ct, labels, kji, values, values[:1], (1.0, 0.8, 0.8))
    assert np.count_nonzero(guard) == np.count_nonzero(pure_fat) == 3 * 58 * 198


# ------------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------------


def test_levels_partly_outside_the_field_of_view_are_flagged(cut):
    heights = {h.level: h for h in cut.heights}
    assert not heights["T12"].complete
    pairs = cut.pairs()
    outside = [(r, t) for r, t in pairs if t["fov_fraction"] < 0.999]
    assert {r.level for r, _ in outside} >= {"T12", "L1"}  # the cut reaches these slabs
    for r, t in outside:
        assert not r.complete and r.flags, (r.muscle, r.level, t["fov_fraction"])
    for r in cut.rows:
        if r.level == "lumbar":
            assert not r.complete and any(f.startswith("incomplete_level_L1") for f in r.flags)
    # Levels whose slab and neighbours are whole are still measured as complete and right.
    for r, t in pairs:
        if r.level in ("L3", "L4"):
            assert r.complete, (r.muscle, r.level, r.flags)
            assert r.volume_ml == pytest.approx(t["volume_ml"], rel=0.08)


def test_missing_vertebra_flags_its_neighbours(full):
    p = full.phantom
    labels = p.total.copy()
    labels[labels == lv.TOTAL_VERTEBRA_IDS["L3"]] = 0
    heights = measure_heights(labels, p.ijk_to_ras, body_labels=p.vertebrae_body, ct=p.ct)
    rows = mu.measure_muscles(p.ct, labels, p.ijk_to_ras, heights)
    flags = {(r.muscle, r.level): r.flags for r in rows}
    assert "no_vertebra_below" in flags[("autochthon_left", "L2")]
    assert "no_vertebra_above" in flags[("autochthon_left", "L4")]
    assert ("autochthon_left", "L3") not in flags
    lumbar = flags[("autochthon_left", "lumbar")]
    assert "missing_level_L3" in lumbar and "incomplete_level_L2" in lumbar and "incomplete_level_L4" in lumbar
    # ``levels`` restricts the rows, not the neighbours that bound the slabs.
    only = mu.measure_muscles(p.ct, p.total, p.ijk_to_ras, full.heights, levels=("L4",), lumbar_total=False)
    assert {r.level for r in only} == {"L4"} and all(r.complete for r in only)


def test_a_muscle_missing_from_the_segmentation_is_unknown_not_zero(full):
    """A label map without the iliopsoas (a task that does not segment it): its rows say
    ``not_segmented`` with an unknown volume, never 0 ml; the autochthon is measured as before."""
    p = full.phantom
    labels = p.total.copy()
    labels[np.isin(labels, (lv.TOTAL_ILIOPSOAS_LEFT, lv.TOTAL_ILIOPSOAS_RIGHT))] = 0
    rows = mu.measure_muscles(p.ct, labels, p.ijk_to_ras, full.heights)
    before = {(r.muscle, r.level): r for r in full.rows}
    for r in rows:
        if r.muscle.startswith("iliopsoas"):
            assert "not_segmented" in r.flags and not r.complete and np.isnan(r.volume_ml), (r.muscle, r.level)
        else:
            assert "not_segmented" not in r.flags and r.volume_ml == before[(r.muscle, r.level)].volume_ml
    summary = mu.muscle_summary(rows)
    assert np.isnan(summary["lumbar"]["iliopsoas"]["volume_ml"]) and "not_segmented" in summary["lumbar"]["iliopsoas"]["flags"]
    assert summary["lumbar"]["autochthon"]["volume_ml"] > 0


def test_muscle_summary(full):
    summary = mu.muscle_summary(full.rows)
    json.dumps(summary)
    assert summary["levels"] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert summary["incomplete_levels"] == ["T12"]
    lumbar = summary["lumbar"]
    assert set(lumbar) == set(mu.MUSCLE_LABELS) | {"autochthon", "iliopsoas"}
    both = lumbar["iliopsoas"]
    assert both["volume_ml"] == pytest.approx(lumbar["iliopsoas_left"]["volume_ml"]
                                              + lumbar["iliopsoas_right"]["volume_ml"])
    assert both["complete"] and both["lean_hu"] == pytest.approx(50.0, abs=1e-3)
    truth = sum(full.truth[(f"iliopsoas_{side}", "lumbar")]["volume_ml"] for side in ("left", "right"))
    assert both["volume_ml"] == pytest.approx(truth, rel=0.015)


# ------------------------------------------------------------------------------------------------
# real CT
# ------------------------------------------------------------------------------------------------


def test_example_ct_muscles_are_plausible(example_data):
    """TotalSegmentator's example (3 mm): vertebrae and bodies from its spine report's masks,
    muscles from its full ``total`` segmentation of the same CT."""
    ct = read_ct(example_data / "example_ct.nii.gz")
    vertebrae = read_labelmap(example_data / "spine_report" / "totalseg.nii.gz", reference=ct)
    body = read_labelmap(example_data / "spine_report" / "totalseg_vertebrae_body.nii.gz", reference=ct)
    total = read_labelmap(example_data / "example_seg_fast_force_split.nii.gz", reference=ct)
    heights = measure_heights(vertebrae.array, ct.ijk_to_ras, body_labels=body.array, ct=ct.array)
    rows = {(r.muscle, r.level): r for r in mu.measure_muscles(ct.array, total.array, ct.ijk_to_ras, heights)}
    for level in ("L2", "L3", "L4"):
        for muscle in mu.MUSCLE_LABELS:
            r = rows[(muscle, level)]
            assert r.complete, (muscle, level, r.flags)
            assert 5.0 <= r.volume_ml <= 150.0, (muscle, level, r.volume_ml)  # tens of ml per level
            assert 0.0 <= r.mean_hu <= 100.0 and 0.0 <= r.lean_hu <= 100.0, (muscle, level)
            assert 0.0 <= r.imat_fraction <= 0.5
    for muscle in mu.MUSCLE_LABELS:
        assert 50.0 <= rows[(muscle, "lumbar")].volume_ml <= 600.0
