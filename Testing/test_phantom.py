"""Tests of the synthetic spine phantom: its truth dictionary against its own voxels.

Every later measurement is tested against ``phantom.truth``, so the truth must be right. These
tests measure the rendered label maps and CT by brute force, in physical space, without the
phantom's internal functions (only the truth's frames and the grid's IJK→RAS matrix are used),
and compare with the analytic truth.

Runtime: the fine (0.5 mm) phantoms are rendered only over a box around the vertebral bodies
(``size_ijk`` chosen from a coarse probe of the same anatomy), and every phantom is shared through
module-scoped fixtures.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.geometry import rotation_matrix
from VertebralFractureScreenLib.io.images import read_ct, read_labelmap
from VertebralFractureScreenLib.phantom.render import (TISSUES, Fracture, Hardware, Lesion, PhantomSpec, genant_grade,
                                                       is_borderline, make_phantom, write_phantom)
from VertebralFractureScreenLib.phantom.anatomy import PHYSIOLOGICAL_HA_HP, level_dimensions

LEVELS3 = ("L1", "L2", "L3")
AP_FRACTIONS = {"ha": 0.15, "hm": 0.50, "hp": 0.85}  # SPEC §4, from the anterior wall
HEIGHT_KEYS = ("ha", "hm", "hp")
TRABECULAR = {"L1": 110.0, "L2": 160.0, "L3": 205.0}
# Anatomy "A": a wedge, a normal body (with L1's physiological wedging above it) and a crush. No
# biconcave here: its heights vary fast with v, which the wide prisms of coarse grids would blur.
BASE = PhantomSpec(levels=LEVELS3, fractures=(Fracture("L1", "wedge", 0.3), Fracture("L3", "crush", 0.3)),
                   trabecular_hu=TRABECULAR, spacing=(1.0, 1.0, 1.0), supersampling=1, noise_hu=0.0,
                   psf_fwhm_mm=0.0,
                   # a generic pose: no vertebra axis parallel to a grid axis (see brute_force_heights)
                   rotation_deg=(6.0, -4.0, 9.0))
MUSCLE_IDS = {"autochthon_left": lv.TOTAL_AUTOCHTHON_LEFT, "autochthon_right": lv.TOTAL_AUTOCHTHON_RIGHT,
              "iliopsoas_left": lv.TOTAL_ILIOPSOAS_LEFT, "iliopsoas_right": lv.TOTAL_ILIOPSOAS_RIGHT}
W_EXTENT_MM = 16.0  # reach of the height measurement along the vertebra's cc axis (these bodies are ≤ 26 mm high)
DENSITY_WINDOW_MM = 12.0  # |w| window over which the prism's voxel density is counted (about a body's height)


# ------------------------------------------------------------------------------------------------
# helpers (independent of the phantom's internals)
# ------------------------------------------------------------------------------------------------


def voxel_centres_ras(ijk_to_ras: np.ndarray, kji: np.ndarray) -> np.ndarray:
    """RAS of voxel centres given as ``(N, 3)`` ``[k, j, i]`` indices."""
    m = np.asarray(ijk_to_ras, dtype=float)
    return kji[:, ::-1].astype(float) @ m[:3, :3].T + m[:3, 3]


def voxel_volume_mm3(ijk_to_ras) -> float:
    return abs(float(np.linalg.det(np.asarray(ijk_to_ras, dtype=float)[:3, :3])))


def spacing_of(ijk_to_ras) -> np.ndarray:
    return np.linalg.norm(np.asarray(ijk_to_ras, dtype=float)[:3, :3], axis=0)


def frame_of(vt: dict):
    axes = vt["axes_ras"]
    return (np.asarray(vt["centre_ras"], dtype=float),
            *(np.asarray(axes[key], dtype=float) for key in ("lr", "ap", "cc")))


def label_at(phantom, array: np.ndarray, ras) -> int:
    """Value of the voxel whose centre is nearest to a RAS point."""
    inv = np.linalg.inv(phantom.ijk_to_ras)
    i, j, k = np.round(inv[:3, :3] @ np.asarray(ras, dtype=float) + inv[:3, 3]).astype(int)
    return int(array[k, j, i])


def measuring_box_corners(vt: dict, half_u: float, half_v: float) -> np.ndarray:
    """RAS corners of the box |u| ≤ half_u, |v| ≤ half_v, |w| ≤ W_EXTENT_MM in a vertebra's frame."""
    c, lr, ap, cc = frame_of(vt)
    return np.array([c + su * half_u * lr + sv * half_v * ap + sw * W_EXTENT_MM * cc
                     for su, sv, sw in itertools.product((-1.0, 1.0), repeat=3)])


def vertebra_box_voxels(phantom, vt: dict, half_u: float, half_v: float):
    """Voxels (``kji``) of the vertebra's (u, v, w) measuring box, which must lie inside the grid,
    and their coordinates ``u, v, w`` (mm) along the truth's lr, ap, cc axes from the body centre."""
    inv = np.linalg.inv(phantom.ijk_to_ras)
    ijk = measuring_box_corners(vt, half_u, half_v) @ inv[:3, :3].T + inv[:3, 3]
    shape_ijk = np.array(phantom.ct.shape[::-1])
    assert np.all(ijk >= -0.5) and np.all(ijk <= shape_ijk - 0.5), f"{vt['level']}: measuring box leaves the grid"
    lo = np.floor(ijk.min(axis=0)).astype(int).clip(0, shape_ijk - 1)
    hi = np.ceil(ijk.max(axis=0)).astype(int).clip(0, shape_ijk - 1)
    kk, jj, ii = np.meshgrid(*(np.arange(lo[a], hi[a] + 1) for a in (2, 1, 0)), indexing="ij")
    kji = np.stack([kk.ravel(), jj.ravel(), ii.ravel()], axis=1)
    c, lr, ap, cc = frame_of(vt)
    d = voxel_centres_ras(phantom.ijk_to_ras, kji) - c
    return kji, d @ lr, d @ ap, d @ cc


def brute_force_heights(phantom, vt: dict, half_u: float = 8.0, half_v: float = 1.0,
                        half_u_mid: float | None = None) -> dict[str, float]:
    """Ha, Hm, Hp (mm) from the ``vertebrae_body`` label map by volume: the body voxels of this
    vertebra in a prism along cc around the measurement line (|u| ≤ half_u, |v − v_f| ≤ half_v),
    divided by the prism's own voxel count per mm of its length (counted over |w| ≤ 12 mm).
    ``half_u_mid`` (default ``half_u``) widens the prism for Hm, where the body is widest.

    Normalising by the prism's own voxel count rather than its nominal cross-section removes the
    error of sampling the cross-section with voxel centres. The remaining error is the sampling
    of the endplates along w; it averages out over the prism unless the grid is aligned with the
    vertebra (then every column of the prism sees the same slice positions). The heights of all
    the phantom's body shapes are constant in u over the central half of the width, so a wide
    prism in u only averages; in v it stays narrow (the biconcave depression curves there)."""
    depth = vt["body_depth_mm"]
    half_u_mid = half_u if half_u_mid is None else half_u_mid
    kji, u, v, w = vertebra_box_voxels(phantom, vt, max(half_u, half_u_mid) + 0.5, 0.35 * depth + half_v + 0.5)
    k, j, i = kji.T
    body = (phantom.vertebrae_body[k, j, i] == lv.BODY_LABEL) & (phantom.total[k, j, i] == vt["total_id"])
    assert not np.any(body & (np.abs(w) >= W_EXTENT_MM - 1.0)), "the body reaches the end of the prism"
    heights = {}
    for key, fraction in AP_FRACTIONS.items():
        v_f = depth / 2 - depth * fraction
        prism = (np.abs(u) <= (half_u_mid if key == "hm" else half_u)) & (np.abs(v - v_f) <= half_v)
        per_mm = np.count_nonzero(prism & (np.abs(w) <= DENSITY_WINDOW_MM)) / (2.0 * DENSITY_WINDOW_MM)
        heights[key] = np.count_nonzero(prism & body) / per_mm
    return heights


def cropped_spec(spec: PhantomSpec, probe, half_u: float) -> PhantomSpec:
    """``spec`` with ``size_ijk`` reduced to a box around the vertebral bodies' measuring boxes.

    ``probe`` is a phantom of the same anatomy (levels, fractures, centre) and grid orientation,
    at any spacing and in any pose. The grid is centred on the field of view's box whatever its
    size, and that box turns with the anatomy about ``centre_ras``, so the probe's grid centre
    and vertebra frames, turned into ``spec``'s pose, place the crop. (If this ever goes wrong,
    ``vertebra_box_voxels`` fails loudly.)"""
    probe_spec = probe.truth["spec"]
    assert probe_spec["grid_orientation"] == spec.grid_orientation
    assert tuple(probe_spec["levels"]) == spec.levels
    assert probe_spec["fractures"] == [f"{f.level}:{f.shape}:{f.fraction}" for f in spec.fractures]
    pivot = np.asarray(spec.centre_ras, dtype=float)
    assert np.allclose(probe_spec["centre_ras"], pivot)
    turn = rotation_matrix(*spec.rotation_deg) @ rotation_matrix(*probe_spec["rotation_deg"]).T
    m = np.asarray(probe.ijk_to_ras, dtype=float)
    centre = turn @ (m[:3, :3] @ ((np.array(probe.ct.shape[::-1]) - 1) / 2.0) + m[:3, 3] - pivot) + pivot
    directions = m[:3, :3] / spacing_of(m)
    need = np.zeros(3)
    for vt in probe.truth["vertebrae"]:
        turned = dict(vt, centre_ras=turn @ (np.asarray(vt["centre_ras"]) - pivot) + pivot,
                      axes_ras={key: turn @ np.asarray(axis) for key, axis in vt["axes_ras"].items()})
        corners = measuring_box_corners(turned, half_u + 2.0, 0.35 * vt["body_depth_mm"] + 4.0)
        need = np.maximum(need, np.abs((corners - centre) @ directions).max(axis=0))
    size = 2 * np.ceil(need / np.asarray(spec.spacing, dtype=float) + 1.0).astype(int) + 1
    return replace(spec, size_ijk=tuple(int(n) for n in size))


def probe_of(spec: PhantomSpec):
    """A coarse rendering of the same anatomy (only its grid centre, axes and truth are used)."""
    return make_phantom(replace(spec, spacing=(4.0, 4.0, 4.0), size_ijk=None, supersampling=1))


def vertebra(truth: dict, level: str) -> dict:
    matches = [vt for vt in truth["vertebrae"] if vt["level"] == level]
    assert len(matches) == 1, f"{level} missing from the truth"
    return matches[0]


def in_slab(points: np.ndarray, planes: dict) -> np.ndarray:
    below, above = planes["below"], planes["above"]
    return (((points - below["point"]) @ np.asarray(below["normal"]) >= 0.0)
            & ((points - above["point"]) @ np.asarray(above["normal"]) < 0.0))


# ------------------------------------------------------------------------------------------------
# shared phantoms
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm1():
    """Anatomy A at 1 mm on the RAS grid, in BASE's generic pose, noise-free, no supersampling."""
    return make_phantom(BASE)


@pytest.fixture(scope="module")
def mm3():
    """Anatomy A at 3 mm, otherwise as ``mm1``."""
    return make_phantom(replace(BASE, spacing=(3.0, 3.0, 3.0)))


FINE = replace(BASE, spacing=(0.5, 0.5, 0.5))
# Anatomy B (two levels: a wedge and a biconcave body) on an oblique grid, in four poses; none is
# aligned with the voxel axes.
ANATOMY_B = replace(FINE, levels=("L1", "L2"), fractures=(Fracture("L1", "wedge", 0.3), Fracture("L2", "biconcave", 0.35)),
                    grid_orientation="oblique")
POSES = {"0": (0.0, 0.0, 0.0), "20 about AP": (0.0, 20.0, 0.0), "20 about LR": (20.0, 0.0, 0.0),
         "12/-8/15": (12.0, -8.0, 15.0)}
FINE_SPECS = {
    # Anatomy A upright on the RAS grid: every vertebra's lr axis is the grid's i axis (and L3's
    # cc axis, at the lordosis apex, is k), so every column of the measuring prism sees the same
    # grid and the sampling error of the endplates does not average out: one voxel allowed.
    "A upright, RAS grid": (replace(FINE, rotation_deg=(0.0, 0.0, 0.0)), 1.0),
    # Generic sampling: half a voxel.
    **{f"B {name}, oblique grid": (replace(ANATOMY_B, rotation_deg=rotation), 0.5) for name, rotation in POSES.items()},
}
FINE_HALF_U = 6.0


@pytest.fixture(scope="module")
def fine(mm1):
    """0.5 mm phantoms rendered around the vertebral bodies: name → (phantom, tolerance in voxels)."""
    probe_b = probe_of(ANATOMY_B)
    out = {}
    for name, (spec, tolerance_voxels) in FINE_SPECS.items():
        probe = probe_b if spec.fractures == ANATOMY_B.fractures else mm1
        out[name] = (make_phantom(cropped_spec(spec, probe, half_u=FINE_HALF_U)), tolerance_voxels)
    return out


# ------------------------------------------------------------------------------------------------
# 1. heights by brute force
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FINE_SPECS))
def test_heights_match_label_map(fine, name):
    """Ha, Hm, Hp of every vertebra (normal, wedge, biconcave, crush) measured by volume in the
    0.5 mm label map, against the truth: within half a voxel (one on the aligned grid)."""
    phantom, tolerance_voxels = fine[name]
    tolerance = tolerance_voxels * float(spacing_of(phantom.ijk_to_ras).max())
    vertebrae = phantom.truth["vertebrae"]
    assert [vt["level"] for vt in vertebrae] == list(FINE_SPECS[name][0].levels)
    for vt in vertebrae:
        measured = brute_force_heights(phantom, vt, half_u=FINE_HALF_U)
        for key in HEIGHT_KEYS:
            assert abs(measured[key] - vt[f"{key}_mm"]) <= tolerance, (
                f"{name} {vt['level']} {key}: label map {measured[key]:.3f} mm, truth {vt[f'{key}_mm']:.3f} mm")


@pytest.mark.parametrize("name", list(FINE_SPECS))
def test_height_points_lie_on_body_surface(fine, name):
    """Each endpoint of the Ha/Hm/Hp lines: one voxel inside along cc is body of this vertebra,
    one voxel outside is not body (one voxel: the voxel centre nearest to a point may lie √3/2
    voxel away from it on an oblique grid)."""
    phantom, _ = fine[name]
    step = float(spacing_of(phantom.ijk_to_ras).max())
    for vt in phantom.truth["vertebrae"]:
        _, _, _, cc = frame_of(vt)
        for key in HEIGHT_KEYS:
            top, bottom = (np.asarray(p, dtype=float) for p in vt["height_points_ras"][key])
            # the line runs along cc and is as long as the height
            assert np.linalg.norm(top - bottom) == pytest.approx(vt[f"{key}_mm"], abs=1e-6)
            assert (top - bottom) @ cc == pytest.approx(vt[f"{key}_mm"], abs=1e-6)
            for point, inward in ((top, -cc), (bottom, cc)):
                inside, outside = point + step * inward, point - step * inward
                what = (name, vt["level"], key)
                assert label_at(phantom, phantom.vertebrae_body, inside) == lv.BODY_LABEL, what
                assert label_at(phantom, phantom.total, inside) == vt["total_id"], what
                assert label_at(phantom, phantom.vertebrae_body, outside) != lv.BODY_LABEL, what


def test_truth_heights_follow_fracture_definitions(mm1, fine):
    """Heights relative to the normal shape, loss, grade, shape and frames, for every shape."""
    seen = set()
    for phantom in (mm1, fine["B 12/-8/15, oblique grid"][0]):
        for vt in phantom.truth["vertebrae"]:
            dims = level_dimensions(vt["level"])
            n = {key: vt[f"normal_{key}_mm"] for key in HEIGHT_KEYS}
            assert (n["ha"] + n["hp"]) / 2 == pytest.approx(dims.height_mm)
            assert n["ha"] / n["hp"] == pytest.approx(PHYSIOLOGICAL_HA_HP.get(vt["level"], 1.0))
            assert n["hm"] == pytest.approx((n["ha"] + n["hp"]) / 2)
            assert vt["body_width_mm"] == pytest.approx(dims.width_mm)
            assert vt["body_depth_mm"] == pytest.approx(dims.depth_mm)
            shape = (vt["fracture"] or {}).get("shape", "normal")
            f = (vt["fracture"] or {}).get("fraction", 0.0)
            seen.add(shape)
            expected = {
                "normal": (n["ha"], n["hm"], n["hp"]),
                "wedge": (n["ha"] * (1 - f), n["hm"] * (1 - f / 2), n["hp"]),
                "biconcave": (n["ha"], n["hm"] * (1 - f), n["hp"]),
                "crush": (n["ha"] * (1 - f), n["hm"] * (1 - f), n["hp"] * (1 - f)),
            }[shape]
            assert [vt[f"{key}_mm"] for key in HEIGHT_KEYS] == pytest.approx(list(expected), abs=1e-9)
            assert vt["ha_hp"] == pytest.approx(vt["ha_mm"] / vt["hp_mm"])
            assert vt["hm_hp"] == pytest.approx(vt["hm_mm"] / vt["hp_mm"])
            assert vt["height_loss"] == f
            assert vt["genant_grade"] == genant_grade(f) == (2 if f else 0)
            assert vt["shape"] == shape
            assert vt["borderline"] is is_borderline(f)
            _, lr, ap, cc = frame_of(vt)
            assert np.array([lr, ap, cc]) @ np.array([lr, ap, cc]).T == pytest.approx(np.eye(3), abs=1e-9)
            assert np.cross(ap, cc) == pytest.approx(lr, abs=1e-9)  # e_lr = e_ap × e_cc
    assert seen == {"normal", "wedge", "biconcave", "crush"}


# ------------------------------------------------------------------------------------------------
# 2. label conventions
# ------------------------------------------------------------------------------------------------


def test_label_conventions_agree(mm1):
    total, body, verse = mm1.total, mm1.vertebrae_body, mm1.verse
    drawn = {lv.TOTAL_VERTEBRA_IDS[name]: lv.VERSE_VERTEBRA_IDS[name] for name in LEVELS3}
    # every body voxel belongs to a drawn vertebra in `total` and to the same one in `verse`
    body_total = total[body == lv.BODY_LABEL]
    assert body_total.size and set(np.unique(body_total).tolist()) == set(drawn)
    # vertebra voxels (bodies and posterior elements) carry the matching VerSe id, nothing else does
    expected_verse = np.zeros(256, dtype=np.uint8)
    for total_id, verse_id in drawn.items():
        expected_verse[total_id] = verse_id
    np.testing.assert_array_equal(verse, expected_verse[total])
    # discs: 2 in vertebrae_body, 0 in total and verse
    disc = body == lv.DISC_LABEL
    assert disc.any()
    assert not total[disc].any() and not verse[disc].any()
    assert set(np.unique(body).tolist()) == {0, lv.BODY_LABEL, lv.DISC_LABEL}
    # posterior elements: vertebra id in total, not body, for every level
    for name in LEVELS3:
        posterior = (total == lv.TOTAL_VERTEBRA_IDS[name]) & (body == 0)
        assert np.count_nonzero(posterior) * voxel_volume_mm3(mm1.ijk_to_ras) > 5000.0, name
        assert np.all(mm1.tissue[posterior] == TISSUES["posterior_bone"])
    # tissue codes agree with vertebrae_body
    assert np.all(np.isin(mm1.tissue[body == lv.BODY_LABEL], [TISSUES["cortical_bone"], TISSUES["trabecular_bone"]]))
    assert np.all(mm1.tissue[disc] == TISSUES["disc"])
    # only known ids in total
    known = set(drawn) | {0, lv.TOTAL_AORTA, lv.TOTAL_SPINAL_CORD, *MUSCLE_IDS.values()}
    assert set(np.unique(total).tolist()) <= known


def test_spinal_cord_ends_at_l1_l2_disc(mm1):
    row = next(r for r in mm1.truth["muscles"] if r["level"] == "L1")
    plane = row["slab_planes_ras"]["below"]  # mid-plane of the L1/L2 disc
    # the plane is the disc's mid-plane: it passes through the disc on the spine's centre line
    assert label_at(mm1, mm1.vertebrae_body, plane["point"]) == lv.DISC_LABEL
    centres = {vt["level"]: np.asarray(vt["centre_ras"]) for vt in mm1.truth["vertebrae"]}
    normal = np.asarray(plane["normal"])
    assert (centres["L1"] - plane["point"]) @ normal > 5.0
    assert (centres["L2"] - plane["point"]) @ normal < -5.0
    cord = voxel_centres_ras(mm1.ijk_to_ras, np.argwhere(mm1.total == lv.TOTAL_SPINAL_CORD))
    assert len(cord) > 1000
    height = (cord - plane["point"]) @ normal
    assert height.min() >= -1e-3  # nothing below the L1/L2 disc
    assert height.min() <= 1.0  # and it reaches down to it
    assert np.all(mm1.tissue[mm1.total == lv.TOTAL_SPINAL_CORD] == TISSUES["spinal_cord"])


# ------------------------------------------------------------------------------------------------
# 3. body volume
# ------------------------------------------------------------------------------------------------


def test_body_volume(mm1):
    voxel_ml = voxel_volume_mm3(mm1.ijk_to_ras) / 1000.0
    for vt in mm1.truth["vertebrae"]:
        count = np.count_nonzero((mm1.vertebrae_body == lv.BODY_LABEL) & (mm1.total == vt["total_id"]))
        assert count * voxel_ml == pytest.approx(vt["body_volume_ml"], rel=0.02), vt["level"]
    # a normal body's height is linear across its elliptic section: volume = area × Hm; a
    # fracture takes volume away
    for vt in mm1.truth["vertebrae"]:
        normal_volume = np.pi * vt["body_width_mm"] * vt["body_depth_mm"] / 4 * vt["normal_hm_mm"] / 1000.0
        if vt["fracture"] is None:
            assert vt["body_volume_ml"] == pytest.approx(normal_volume, rel=2e-3), vt["level"]
        else:
            assert vt["body_volume_ml"] < 0.95 * normal_volume, vt["level"]


# ------------------------------------------------------------------------------------------------
# 4. muscles
# ------------------------------------------------------------------------------------------------


def test_muscle_slab_volume_and_fat_fraction(mm1):
    voxel_ml = voxel_volume_mm3(mm1.ijk_to_ras) / 1000.0
    rows = [r for r in mm1.truth["muscles"] if r["level"] in LEVELS3]
    assert {(r["muscle"], r["level"]) for r in rows} == set(itertools.product(MUSCLE_IDS, LEVELS3))
    assert not [r for r in mm1.truth["muscles"] if r["level"] == "lumbar"]  # L4, L5 not drawn
    checked = 0
    for row in rows:
        kji = np.argwhere(mm1.total == MUSCLE_IDS[row["muscle"]])
        inside = in_slab(voxel_centres_ras(mm1.ijk_to_ras, kji), row["slab_planes_ras"])
        kji = kji[inside]
        if row["fov_fraction"] < 0.999:
            continue
        checked += 1
        what = f"{row['muscle']} {row['level']}"
        assert len(kji) * voxel_ml == pytest.approx(row["volume_ml"], rel=0.03), what
        tissue = mm1.tissue[tuple(kji.T)]
        assert np.all(np.isin(tissue, [TISSUES["muscle"], TISSUES["intramuscular_fat"]])), what
        fat = np.count_nonzero(tissue == TISSUES["intramuscular_fat"]) / len(kji)
        assert fat == pytest.approx(row["imat_fraction"], abs=0.02), what
    assert checked >= 8
    # adjacent slabs share their mid-disc plane
    by_level = {r["level"]: r["slab_planes_ras"] for r in rows if r["muscle"] == "autochthon_left"}
    for upper, lower in zip(LEVELS3[:-1], LEVELS3[1:]):
        for key in ("point", "normal"):
            assert by_level[upper]["below"][key] == pytest.approx(by_level[lower]["above"][key], abs=1e-9)


# ------------------------------------------------------------------------------------------------
# 5. HU
# ------------------------------------------------------------------------------------------------


def interior(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` whose 26 neighbours are all in ``mask``."""
    return ndimage.binary_erosion(mask, structure=np.ones((3, 3, 3), dtype=bool))


def test_every_voxel_has_its_tissue_hu_without_supersampling(mm1):
    spec = BASE
    hu_of = {TISSUES["air"]: -1000, TISSUES["subcutaneous_fat"]: spec.fat_hu, TISSUES["soft_tissue"]: spec.soft_tissue_hu,
             TISSUES["muscle"]: spec.muscle_hu, TISSUES["intramuscular_fat"]: spec.fat_hu,
             TISSUES["blood"]: spec.aorta_hu_value, TISSUES["csf"]: spec.csf_hu, TISSUES["spinal_cord"]: spec.cord_hu,
             TISSUES["disc"]: spec.disc_hu, TISSUES["posterior_bone"]: spec.posterior_hu,
             TISSUES["cortical_bone"]: spec.cortical_hu, TISSUES["sacrum"]: spec.sacrum_hu}
    expected = np.zeros(256, dtype=np.float64)
    for code, hu in hu_of.items():
        expected[code] = hu
    ct_expected = expected[mm1.tissue]
    for name in LEVELS3:
        trabecular = (mm1.tissue == TISSUES["trabecular_bone"]) & (mm1.total == lv.TOTAL_VERTEBRA_IDS[name])
        ct_expected[trabecular] = TRABECULAR[name]
    assert not np.any((mm1.tissue == TISSUES["trabecular_bone"]) & (mm1.vertebrae_body != lv.BODY_LABEL))
    np.testing.assert_array_equal(mm1.ct, ct_expected.astype(np.int16))


def test_trabecular_and_aorta_hu_noise_free(mm1):
    for vt in mm1.truth["vertebrae"]:
        deep = interior(mm1.tissue == TISSUES["trabecular_bone"]) & (mm1.total == vt["total_id"])
        assert np.count_nonzero(deep) > 1000
        assert vt["trabecular_hu"] == TRABECULAR[vt["level"]]
        assert np.all(mm1.ct[deep] == vt["trabecular_hu"]), vt["level"]
    aorta = mm1.truth["aorta"]
    assert aorta == {"hu": 40.0, "contrast_enhanced": False, "present": True}
    deep = interior(mm1.total == lv.TOTAL_AORTA)
    assert np.count_nonzero(deep) > 500
    assert np.all(mm1.ct[deep] == aorta["hu"])


@pytest.fixture(scope="module")
def supersampled(fine):
    """Anatomy B with supersampling 3 (partial volume), noise-free, around the bodies only."""
    spec = replace(ANATOMY_B, spacing=(2.0, 2.0, 2.0), supersampling=3)
    return make_phantom(cropped_spec(spec, fine["B 0, oblique grid"][0], half_u=6.0))


def test_contrast_aorta():
    phantom = make_phantom(replace(BASE, levels=("L2",), fractures=(), spacing=(3.0, 3.0, 3.0), contrast=True))
    aorta = phantom.truth["aorta"]
    assert aorta == {"hu": 250.0, "contrast_enhanced": True, "present": True}
    deep = interior(phantom.total == lv.TOTAL_AORTA)
    assert np.count_nonzero(deep) > 50
    assert np.all(phantom.ct[deep] == 250)
    assert np.all(phantom.ct[phantom.tissue == TISSUES["blood"]] == 250)


def test_partial_volume_at_body_disc_boundary(supersampled):
    spec = BASE
    body = supersampled.vertebrae_body == lv.BODY_LABEL
    disc = supersampled.vertebrae_body == lv.DISC_LABEL
    cube = np.ones((3, 3, 3), dtype=bool)
    boundary = (body & ndimage.binary_dilation(disc, structure=cube)) | (disc & ndimage.binary_dilation(body, structure=cube))
    assert np.count_nonzero(boundary) > 200
    ct = supersampled.ct[boundary].astype(float)
    between = (ct > spec.disc_hu) & (ct < spec.cortical_hu)
    assert np.count_nonzero(between) > 0.5 * len(ct)
    pure = {spec.disc_hu, spec.cortical_hu, *TRABECULAR.values(), spec.soft_tissue_hu}
    assert np.count_nonzero(between & ~np.isin(ct, list(pure))) > 0.25 * len(ct)  # mixtures, not pure tissues
    # deep inside the trabecular bone the CT is untouched by the sub-sampling
    for vt in supersampled.truth["vertebrae"]:
        deep = interior(supersampled.tissue == TISSUES["trabecular_bone"]) & (supersampled.total == vt["total_id"])
        assert np.count_nonzero(deep) > 100 and np.all(supersampled.ct[deep] == vt["trabecular_hu"])


def test_noise_sd():
    spec = replace(BASE, levels=("L3",), fractures=(), spacing=(2.0, 2.0, 2.0), noise_hu=20.0, seed=7)
    phantom = make_phantom(spec)
    deep = interior(phantom.tissue == TISSUES["trabecular_bone"])
    values = phantom.ct[deep].astype(float)
    assert len(values) > 1000
    assert np.std(values, ddof=1) == pytest.approx(20.0, abs=2.0)
    assert np.mean(values) == pytest.approx(TRABECULAR["L3"], abs=2.0)
    assert phantom.truth["vertebrae"][0]["trabecular_hu"] == TRABECULAR["L3"]


# ------------------------------------------------------------------------------------------------
# 6. invariance to the anatomy's pose
# ------------------------------------------------------------------------------------------------


def test_heights_invariant_to_rotation(fine):
    """Anatomy B turned by 20° about AP, 20° about LR and by 12°/−8°/15°: the same truth heights,
    frames and height points turned with the anatomy, and the same heights in the label maps
    (each pose is also checked against the truth by test_heights_match_label_map)."""
    reference = fine["B 0, oblique grid"][0]
    measured_reference = {vt["level"]: brute_force_heights(reference, vt, half_u=FINE_HALF_U)
                          for vt in reference.truth["vertebrae"]}
    centre = np.asarray(ANATOMY_B.centre_ras)
    for name in ("20 about AP", "20 about LR", "12/-8/15"):
        phantom = fine[f"B {name}, oblique grid"][0]
        turn = rotation_matrix(*POSES[name])
        assert [vt["level"] for vt in phantom.truth["vertebrae"]] == ["L1", "L2"]
        for vt, vt0 in zip(phantom.truth["vertebrae"], reference.truth["vertebrae"]):
            for key in HEIGHT_KEYS:
                assert vt[f"{key}_mm"] == pytest.approx(vt0[f"{key}_mm"], abs=1e-9)
            # the truth's frame turns with the anatomy, about the phantom's centre
            assert np.asarray(vt["centre_ras"]) == pytest.approx(turn @ (np.asarray(vt0["centre_ras"]) - centre) + centre,
                                                                 abs=1e-9)
            for axis in ("lr", "ap", "cc"):
                assert np.asarray(vt["axes_ras"][axis]) == pytest.approx(turn @ np.asarray(vt0["axes_ras"][axis]), abs=1e-9)
            for key in HEIGHT_KEYS:
                start, end = (np.asarray(p) for p in vt["height_points_ras"][key])
                start0, end0 = (np.asarray(p) for p in vt0["height_points_ras"][key])
                assert start == pytest.approx(turn @ (start0 - centre) + centre, abs=1e-9)
                assert end == pytest.approx(turn @ (end0 - centre) + centre, abs=1e-9)
            measured = brute_force_heights(phantom, vt, half_u=FINE_HALF_U)
            for key in HEIGHT_KEYS:
                what = (name, vt["level"], key, measured[key], measured_reference[vt["level"]][key])
                assert abs(measured[key] - measured_reference[vt["level"]][key]) <= 0.3, what


# ------------------------------------------------------------------------------------------------
# 7. completeness
# ------------------------------------------------------------------------------------------------


def touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())


def test_cut_vertebra_is_incomplete(mm3):
    full = mm3
    spec = replace(BASE, spacing=(3.0, 3.0, 3.0))
    assert [vt["complete"] for vt in full.truth["vertebrae"]] == [True, True, True]
    # The grid stays centred when it shrinks, so cutting slices off the top cuts as many off the
    # bottom: cut until L1 (top) touches the edge; L2 must stay clear of it.
    nk, nj, ni = full.ct.shape
    kk = np.arange(nk)
    top_slice = kk[(full.total == lv.TOTAL_VERTEBRA_IDS["L1"]).any(axis=(1, 2))].max()
    assert full.ijk_to_ras[2, 2] > 0  # k runs superior on the RAS grid
    cut = nk - 1 - top_slice + 2  # two slices of L1 fall outside
    l2_slices = kk[(full.total == lv.TOTAL_VERTEBRA_IDS["L2"]).any(axis=(1, 2))]
    assert l2_slices.max() < nk - 1 - cut and l2_slices.min() > cut
    smaller = make_phantom(replace(spec, size_ijk=(ni, nj, nk - 2 * cut)))
    np.testing.assert_array_equal(smaller.total, full.total[cut:nk - cut])  # the same anatomy, cut
    complete = {vt["level"]: vt["complete"] for vt in smaller.truth["vertebrae"]}
    assert complete["L1"] is False and complete["L2"] is True
    for vt in smaller.truth["vertebrae"]:
        assert vt["complete"] is not touches_border(smaller.total == vt["total_id"])
        # heights are the anatomy's, whatever the field of view
        assert vt["hp_mm"] == vertebra(full.truth, vt["level"])["hp_mm"]


# ------------------------------------------------------------------------------------------------
# 8. fracture parsing, validation, grades
# ------------------------------------------------------------------------------------------------


def test_fracture_parse():
    assert Fracture.parse("l1:WEDGE:0.3") == Fracture("L1", "wedge", 0.3)
    assert Fracture.parse("T12:crush:0.45") == Fracture("T12", "crush", 0.45)


@pytest.mark.parametrize("text", ["L1:squash:0.3", "L1:wedge:0.7", "L1:wedge:0", "L1:wedge:-0.2", "L1:wedge:abc",
                                  "X9:wedge:0.3", "L6:wedge:0.3", "L1:wedge", "L1:wedge:0.3:1", ""])
def test_fracture_parse_rejects(text):
    with pytest.raises(ValueError):
        Fracture.parse(text)


@pytest.mark.parametrize("kwargs", [{"supersampling": 2}, {"supersampling": 4}, {"supersampling": 0},
                                    {"levels": ()}, {"levels": ("L1", "Q2")}, {"spacing": (1.0, 0.0, 1.0)},
                                    {"grid_orientation": "XYZ"}, {"fov": "head"},
                                    {"fractures": (Fracture("L1", "wedge", 0.3), Fracture("L1", "crush", 0.3))},
                                    {"autochthon_fat_fraction": 0.6}])
def test_phantom_spec_rejects(kwargs):
    with pytest.raises(ValueError):
        PhantomSpec(**kwargs)


@pytest.mark.parametrize("loss, grade", [(0.0, 0), (0.19, 0), (0.2, 1), (0.249, 1), (0.25, 2), (0.40, 2), (0.41, 3)])
def test_genant_grade(loss, grade):
    assert genant_grade(loss) == grade


@pytest.mark.parametrize("loss, borderline", [(0.0, False), (0.16, False), (0.18, True), (0.22, True), (0.3, False),
                                              (0.38, True), (0.42, True), (0.44, False)])
def test_is_borderline(loss, borderline):
    assert is_borderline(loss) is borderline


# ------------------------------------------------------------------------------------------------
# 9. writing
# ------------------------------------------------------------------------------------------------


def test_write_phantom_round_trip(tmp_path):
    spec = replace(BASE, levels=("L3",), fractures=(Fracture("L3", "wedge", 0.25),), spacing=(3.0, 3.0, 3.0),
                   grid_orientation="oblique", noise_hu=10.0)
    paths = write_phantom(spec, tmp_path)
    names = {"ct", "total", "vertebrae_body", "verse", "tissue"}
    for name in names:
        assert (tmp_path / f"{name}.nii.gz").is_file()
        assert paths[name] == tmp_path / f"{name}.nii.gz"
    assert paths["truth"] == tmp_path / "truth.json"
    phantom = make_phantom(spec)  # deterministic: the same seed gives the same noise
    ct = read_ct(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(ct.array, phantom.ct)
    assert np.abs(ct.ijk_to_ras - phantom.ijk_to_ras).max() <= 1e-4
    for name in names - {"ct"}:
        labels = read_labelmap(tmp_path / f"{name}.nii.gz")
        np.testing.assert_array_equal(labels.array, getattr(phantom, name), err_msg=name)
        assert np.abs(labels.ijk_to_ras - phantom.ijk_to_ras).max() <= 1e-4
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["grid"]["shape_kji"] == list(phantom.ct.shape)
    assert np.asarray(truth["grid"]["ijk_to_ras"]) == pytest.approx(phantom.ijk_to_ras, abs=1e-9)
    assert truth["files"] == {name: f"{name}.nii.gz" for name in names}
    assert truth["vertebrae"] == json.loads(json.dumps(phantom.truth["vertebrae"]))
    assert vertebra(truth, "L3")["fracture"] == {"shape": "wedge", "fraction": 0.25}


# ------------------------------------------------------------------------------------------------
# 10. spacing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.7, 3.0), (3.0, 3.0, 3.0)])
def test_heights_across_spacings(mm1, spacing, request):
    """The same anatomy at any spacing has the same truth, and its label map shows the truth's
    heights to within half a slice. (A wide prism: at 3 mm there are few voxel centres per mm²;
    anatomy A has no biconcave body, whose heights would vary across the prism's v range.)"""
    slice_mm = spacing[2]
    half_u, half_u_mid, half_v = 8.0, 13.0, slice_mm
    spec = replace(BASE, spacing=spacing)
    if spacing == BASE.spacing:
        phantom = mm1
    elif spacing == (3.0, 3.0, 3.0):
        phantom = request.getfixturevalue("mm3")
    else:
        phantom = make_phantom(cropped_spec(spec, mm1, half_u=half_u_mid))
    assert [vt["level"] for vt in phantom.truth["vertebrae"]] == list(LEVELS3)
    for vt, vt1 in zip(phantom.truth["vertebrae"], mm1.truth["vertebrae"]):
        for key in (*(f"{k}_mm" for k in HEIGHT_KEYS), "body_volume_ml"):
            assert vt[key] == pytest.approx(vt1[key], abs=1e-9)
        assert vt["centre_ras"] == pytest.approx(vt1["centre_ras"], abs=1e-9)
        measured = brute_force_heights(phantom, vt, half_u=half_u, half_v=half_v, half_u_mid=half_u_mid)
        for key in HEIGHT_KEYS:
            assert abs(measured[key] - vt[f"{key}_mm"]) <= slice_mm / 2, (spacing, vt["level"], key, measured[key])


@pytest.mark.parametrize("spacing, expected", [
    ((1.0, 1.0, 1.0), (3, 3, 3)),
    ((3.0, 3.0, 3.0), (9, 9, 9)),  # 7 would draw a 1 mm plate 0.86 mm thick
    ((0.7, 0.7, 3.0), (3, 3, 9)),  # in-plane no odd count up to 5 is exact: the fewest stay
    ((1.5, 1.5, 1.5), (3, 3, 3)),
    ((2.0, 2.0, 2.0), (5, 5, 5)),
])
def test_default_supersampling_draws_the_cortex_whole(spacing, expected):
    spec = PhantomSpec(spacing=spacing)
    counts = spec.subsamples_per_axis()
    assert counts == expected
    for step, n in zip(spacing, counts):
        assert step / n <= 0.5 + 1e-9 and n % 2 == 1
        assert (spec.cortex_mm * n / step) % 1 < 1e-6 or step in (0.7, 2.0)  # whole cortex where possible


def test_endplates_are_drawn_when_bone_is_as_dense_as_the_disc():
    """An osteoporotic body (trabecular bone as dense as the disc) at 3 mm slices parallel to its
    endplates: a 1 mm plate can lie between two slice centres, and only its partial volume shows
    it. Every column through the middle of both bodies must carry, summed over the slices from one
    body's middle to the other's, the excess HU of the two plates facing the disc:
    2 × (cortical − disc HU) × cortex thickness."""
    spec = PhantomSpec(levels=("L3", "L4"), spacing=(3.0, 3.0, 3.0), trabecular_hu=90.0, disc_hu=90.0,
                       physiological_wedging=False, noise_hu=0.0, psf_fwhm_mm=0.0)
    phantom = make_phantom(spec)
    expected = 2.0 * (spec.cortical_hu - spec.disc_hu) * spec.cortex_mm  # HU·mm per column
    body = phantom.vertebrae_body == lv.BODY_LABEL
    upper, lower = (body & (phantom.total == vertebra(phantom.truth, level)["total_id"]) for level in ("L3", "L4"))
    spans = [mask.sum(axis=0) for mask in (upper, lower)]
    footprint = (spans[0] >= spans[0].max() - 1) & (spans[1] >= spans[1].max() - 1)
    columns = np.argwhere(ndimage.binary_erosion(footprint, iterations=2))  # clear of the walls' cortex
    assert len(columns) >= 20
    sums = []
    for j, i in columns:
        middles = [int(np.flatnonzero(mask[:, j, i]).mean()) for mask in (upper, lower)]
        k0, k1 = sorted(middles)
        sums.append((phantom.ct[k0:k1 + 1, j, i].astype(float) - spec.disc_hu).sum() * spec.spacing[2])
    # (a missing plate would leave half; a 3 mm column near the walls may catch a little of their cortex)
    assert np.allclose(sums, expected, rtol=0.05), (min(sums), max(sums), expected)


# ------------------------------------------------------------------------------------------------
# 11. rendering: coarse-to-fine sub-samples against every sub-sample; threads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing, size", [((3.0, 3.0, 3.0), (16, 16, 12)),  # 9 sub-samples per axis
                                           ((2.0, 2.0, 2.0), (22, 22, 16)),  # 5
                                           ((1.5, 1.5, 1.5), (30, 30, 22))])  # 3
def test_coarse_to_fine_sub_samples_match_every_sub_sample(monkeypatch, spacing, size):
    """The renderer paints a voxel's sub-samples coarse to fine and fills those between agreeing
    coarser ones unpainted. Against painting every sub-sample (one level holding all indices),
    on a box around L1's posterior wall, canal, posterior elements and back muscles (fat
    spheres) in a generic pose on an oblique grid, the CT may differ only where a sliver thinner
    than the coarse spacing hides between coarse samples (edges and corners of the posterior
    elements' boxes): in few voxels, by little."""
    import VertebralFractureScreenLib.phantom.raster as phantom_module

    spec = PhantomSpec(levels=("L1", "L2"), spacing=spacing, size_ijk=size, grid_orientation="oblique",
                       rotation_deg=(7.0, -5.0, 11.0), fractures=(Fracture("L1", "biconcave", 0.35),),
                       noise_hu=0.0, psf_fwhm_mm=0.0)
    adaptive = make_phantom(spec)
    monkeypatch.setattr(phantom_module, "_subsample_levels", lambda n: [list(range(n))])
    every = make_phantom(spec)
    for name in ("total", "vertebrae_body", "verse", "tissue"):
        np.testing.assert_array_equal(getattr(adaptive, name), getattr(every, name), err_msg=name)
    assert len(np.unique(every.tissue)) >= 8  # bone, disc, canal, muscle, fat, soft tissue …
    mixed = ~np.isin(every.ct, [-1000, spec.fat_hu, spec.soft_tissue_hu, spec.muscle_hu, spec.csf_hu, spec.cord_hu,
                                spec.disc_hu, spec.posterior_hu, spec.cortical_hu, 160.0])
    assert np.count_nonzero(mixed) > 0.1 * every.ct.size  # partial volume is being compared
    difference = np.abs(adaptive.ct.astype(int) - every.ct.astype(int))
    assert np.count_nonzero(difference) <= 0.01 * difference.size, np.count_nonzero(difference)
    assert difference.max() <= 30  # one sample of cortex in 27 is 26 HU
    assert difference.mean() <= 0.02


def test_threads_do_not_change_the_image():
    spec = PhantomSpec(levels=("L4", "L5"), spacing=(2.0, 2.0, 3.0), rotation_deg=(4.0, 3.0, -6.0),
                       fractures=(Fracture("L4", "wedge", 0.3),), noise_hu=10.0, seed=3)
    one = make_phantom(spec, workers=1)
    three = make_phantom(spec, workers=3, chunk_voxels=20_000)
    for name in ("ct", "total", "vertebrae_body", "verse", "tissue"):
        np.testing.assert_array_equal(getattr(one, name), getattr(three, name), err_msg=name)
    assert one.truth == three.truth


# ------------------------------------------------------------------------------------------------
# 10. optional cases: ribs, lesions, hardware, lumbosacral transition, mislabelled segmentations
# ------------------------------------------------------------------------------------------------

COARSE = {"spacing": (3.0, 3.0, 3.0), "supersampling": 1}


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 26-connected components of a mask, as masks."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return [labels == n for n in range(1, count + 1)]


def touched_vertebrae(phantom, mask: np.ndarray) -> set[str]:
    """Levels (truth names) of the vertebrae whose voxels touch ``mask`` (26-neighbours)."""
    around = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3))) & ~mask
    labels = set(np.unique(phantom.total[around]).tolist())
    return {vt["level"] for vt in phantom.truth["vertebrae"] if vt["total_id"] in labels}


@pytest.mark.parametrize("pairs, ribs", [(11, {"T11": 11}), (12, {"T11": 11, "T12": 12}),
                                         (13, {"T11": 11, "T12": 12, "L1": 13})])
def test_ribs_on_their_levels(pairs, ribs):
    phantom = make_phantom(PhantomSpec(levels=("T11", "T12", "L1"), rib_pairs=pairs, **COARSE))
    assert phantom.truth["ribs"] == ribs
    rib_ids = set(lv.TOTAL_RIB_IDS.values())
    present = {label for label in np.unique(phantom.total).tolist() if label in rib_ids}
    assert present == {lv.TOTAL_RIB_IDS[(side, min(n, 12))] for n in ribs.values() for side in ("left", "right")}
    for side in ("left", "right"):
        for number in sorted(set(min(n, 12) for n in ribs.values())):
            parts = components(phantom.total == lv.TOTAL_RIB_IDS[(side, number)])
            bearing = {level for level, n in ribs.items() if min(n, 12) == number}  # the 13th takes rib 12's id
            assert len(parts) == len(bearing)
            touched = [touched_vertebrae(phantom, part) for part in parts]
            assert set().union(*touched) == bearing and all(len(t) == 1 for t in touched)  # each touches its own
            for part, (level,) in zip(parts, touched):
                centre, lr, _, _ = frame_of(vertebra(phantom.truth, level))
                offset = (voxel_centres_ras(phantom.ijk_to_ras, np.argwhere(part)) - centre) @ lr
                assert np.all(offset * (1 if side == "right" else -1) > 5.0)  # on its own side
                assert np.abs(offset).max() > 50.0  # its medial part is in the field of view
                tissue = phantom.tissue[part]
                assert set(np.unique(tissue).tolist()) == {TISSUES["cortical_bone"], TISSUES["rib_marrow"]}
                assert np.all(phantom.ct[part & (phantom.tissue == TISSUES["rib_marrow"])] == 160)
    assert not np.isin(phantom.verse, list(rib_ids)).any()  # VerSe: ribs unlabelled
    assert "identity" in vertebra(phantom.truth, "L1")
    if pairs == 13:  # the rib-bearing vertebra below T12 is a T13, labelled L1 in `total`
        l1 = vertebra(phantom.truth, "L1")
        assert (l1["identity"], l1["total_id"], l1["verse_id"]) == ("T13", 31, 28)
        assert phantom.truth["anatomy"]["thoracic_vertebrae"] == 13
        assert phantom.truth["anatomy"]["lumbar_vertebrae"] == 4
        assert np.any(phantom.verse == 28)


@pytest.fixture(scope="module")
def cases():
    """Lesions and hardware on T12–L4 at 2 mm, noise-free, sampled at voxel centres."""
    spec = PhantomSpec(levels=lv.parse_level_range("T12-L4"), spacing=(2.0, 2.0, 2.0), supersampling=1,
                       lesions=(Lesion.parse("T12:sclerotic:diffuse:600"), Lesion.parse("L2:sclerotic:12:900"),
                                Lesion.parse("L3:lytic:10:20")),
                       hardware=(Hardware.parse("L1:cement"), Hardware.parse("L4:screws")))
    return make_phantom(spec)


@pytest.mark.parametrize("level, kind, diameter, hu", [("L2", "sclerotic", 12.0, 900.0), ("L3", "lytic", 10.0, 20.0)])
def test_lesion_hu_and_surrounding_bone(cases, level, kind, diameter, hu):
    vt = vertebra(cases.truth, level)
    assert vt["lesion"] == {"kind": kind, "diameter_mm": diameter, "hu": hu, "diffuse": False,
                            "centre_ras": vt["lesion"]["centre_ras"]}
    centre = np.asarray(vt["lesion"]["centre_ras"])
    assert label_at(cases, cases.ct, centre) == hu
    mine = cases.total == vt["total_id"]
    lesion = mine & (cases.tissue == TISSUES["lesion"])
    assert np.all(cases.ct[lesion] == hu)
    volume = np.count_nonzero(lesion) * voxel_volume_mm3(cases.ijk_to_ras)
    assert volume == pytest.approx(np.pi / 6.0 * diameter ** 3, rel=0.35)
    distance = np.linalg.norm(voxel_centres_ras(cases.ijk_to_ras, np.argwhere(lesion)) - centre, axis=1)
    assert distance.max() <= diameter / 2
    trabecular = mine & (cases.tissue == TISSUES["trabecular_bone"])
    assert np.count_nonzero(trabecular) > 5 * np.count_nonzero(lesion)  # the rest of the core keeps its bone
    assert np.all(cases.ct[trabecular] == vt["trabecular_hu"])
    assert vt["hardware"] is None and vertebra(cases.truth, "L4")["lesion"] is None


def test_diffuse_lesion_fills_the_trabecular_bone(cases):
    vt = vertebra(cases.truth, "T12")
    assert vt["lesion"]["diffuse"] and vt["lesion"]["diameter_mm"] is None
    mine = cases.total == vt["total_id"]
    assert not np.any(mine & (cases.tissue == TISSUES["trabecular_bone"]))
    core = mine & (cases.tissue == TISSUES["lesion"])
    assert np.count_nonzero(core) * voxel_volume_mm3(cases.ijk_to_ras) > 0.5 * vt["body_volume_ml"] * 1000.0
    assert np.all(cases.ct[core] == 600)


def test_cement_fills_part_of_the_body(cases):
    vt = vertebra(cases.truth, "L1")
    assert vt["hardware"] == "cement" and 0.2 <= vt["cement_fraction"] <= 0.4
    mine = (cases.total == vt["total_id"]) & (cases.vertebrae_body == lv.BODY_LABEL)
    cement = mine & (cases.ct > 2000)
    assert np.all(cases.tissue[cement] == TISSUES["cement"])
    drawn = np.count_nonzero(cement) / np.count_nonzero(mine & np.isin(cases.tissue, [TISSUES["cement"],
                                                                                     TISSUES["trabecular_bone"]]))
    assert drawn == pytest.approx(vt["cement_fraction"], abs=0.08)


def test_pedicle_screws_are_metal_in_and_behind_the_body(cases):
    vt = vertebra(cases.truth, "L4")
    assert vt["hardware"] == "screws" and vt["cement_fraction"] is None
    metal = cases.tissue == TISSUES["metal"]
    assert np.all(cases.ct[metal] == 3071)  # titanium, clipped as scanners do
    in_body = metal & (cases.total == vt["total_id"]) & (cases.vertebrae_body == lv.BODY_LABEL)
    assert np.count_nonzero(in_body) > 10
    centre, lr, ap, _ = frame_of(vt)
    points = voxel_centres_ras(cases.ijk_to_ras, np.argwhere(metal)) - centre
    assert np.count_nonzero(points @ lr > 5) > 20 and np.count_nonzero(points @ lr < -5) > 20  # two screws
    assert (points @ ap).min() < -40.0  # the heads stand behind the laminae
    assert np.any(metal & (cases.total == 0))  # ... unlabelled outside the bone


def test_lesion_and_hardware_parse_and_validation():
    assert Lesion.parse("l2:Sclerotic:12:900") == Lesion("L2", "sclerotic", 12.0, 900.0)
    assert Lesion.parse("T12:sclerotic:diffuse:600") == Lesion("T12", "sclerotic", 0.0, 600.0, diffuse=True)
    assert Lesion.parse(Lesion("L3", "lytic", 8.0, 20.0).text) == Lesion("L3", "lytic", 8.0, 20.0)
    assert Hardware.parse("L4:SCREWS") == Hardware("L4", "screws")
    for text in ("L2:blastic:12:900", "L2:lytic:0:20", "L2:lytic:x:20", "L2:lytic:8", "L6:lytic:8:20",
                 "L2:lytic:8:5000"):
        with pytest.raises(ValueError):
            Lesion.parse(text)
    for text in ("L1:plate", "L1", "L1:cement:1"):
        with pytest.raises(ValueError):
            Hardware.parse(text)
    for kwargs in ({"rib_pairs": 10}, {"lumbar_vertebrae": 7},
                   {"lesions": (Lesion("L1", "lytic", 8.0, 20.0), Lesion("L1", "sclerotic", 8.0, 900.0))},
                   {"hardware": (Hardware("L1", "cement"), Hardware("L1", "screws"))}):
        with pytest.raises(ValueError):
            PhantomSpec(**kwargs)
    json_keys = set(PhantomSpec().to_json())
    assert not json_keys & {"rib_pairs", "lesions", "hardware", "lumbar_vertebrae"}  # old truth files unchanged
    assert PhantomSpec(hardware=(Hardware("L1", "cement"),)).to_json()["hardware"] == ["L1:cement"]


def test_six_lumbar_vertebrae():
    phantom = make_phantom(PhantomSpec(levels=("L4", "L5", "S1"), lumbar_vertebrae=6, **COARSE))
    rows = [(vt["level"], vt["identity"], vt["total_id"], vt["verse_id"]) for vt in phantom.truth["vertebrae"]]
    assert rows == [("L4", "L4", 28, 23), ("L5", "L5", 27, 24), ("L6", "L6", 27, 25), ("S1", "S1", 26, 26)]
    assert phantom.truth["anatomy"]["lumbar_vertebrae"] == 6
    assert len(components(phantom.total == 27)) == 2  # L5 and L6 both come out as L5 in `total`
    assert set(np.unique(phantom.verse).tolist()) == {0, 23, 24, 25, 26}
    with pytest.raises(ValueError, match="share"):  # L5 and L6 share a `total` label, hence their HU
        make_phantom(PhantomSpec(levels=("L5",), lumbar_vertebrae=6, trabecular_hu={"L5": 100.0, "L6": 150.0},
                                 **COARSE))


def test_four_lumbar_vertebrae():
    phantom = make_phantom(PhantomSpec(levels=lv.parse_level_range("L3-S1"), lumbar_vertebrae=4, **COARSE))
    assert [vt["level"] for vt in phantom.truth["vertebrae"]] == ["L3", "L4", "S1"]
    assert phantom.truth["anatomy"]["lumbar_vertebrae"] == 4
    assert not np.any(phantom.total == lv.TOTAL_VERTEBRA_IDS["L5"])
    # the sacrum lies directly below L4: one disc between them
    l4, s1 = vertebra(phantom.truth, "L4"), vertebra(phantom.truth, "S1")
    gap = np.linalg.norm(np.subtract(l4["centre_ras"], s1["centre_ras"]))
    assert gap < 0.5 * (l4["hp_mm"] + s1["hp_mm"]) + 15.0


def test_mislabel_helpers():
    from VertebralFractureScreenLib.phantom.mislabel import shift_levels, swap_levels

    ids = lv.TOTAL_VERTEBRA_IDS
    total = np.array([[ids["T12"], ids["L1"], ids["L2"], 0], [lv.TOTAL_SACRUM, lv.TOTAL_RIB_IDS[("left", 12)],
                                                                 ids["L5"], lv.TOTAL_AUTOCHTHON_LEFT]], dtype=np.uint8)
    before = total.copy()
    shifted = shift_levels(total, 1)
    np.testing.assert_array_equal(total, before)  # input untouched
    assert shifted.dtype == total.dtype
    np.testing.assert_array_equal(shifted, [[ids["L1"], ids["L2"], ids["L3"], 0],
                                            [lv.TOTAL_SACRUM, lv.TOTAL_RIB_IDS[("left", 12)], ids["S1"],
                                             lv.TOTAL_AUTOCHTHON_LEFT]])
    np.testing.assert_array_equal(shift_levels(shifted, -1), total)
    swapped = swap_levels(total, "L1", "l5")
    assert swapped[0, 1] == ids["L5"] and swapped[1, 2] == ids["L1"] and swapped[0, 0] == ids["T12"]
    np.testing.assert_array_equal(swap_levels(swapped, "L5", "L1"), total)
    with pytest.raises(ValueError):
        shift_levels(np.array([ids["S1"]]), 1)


# ------------------------------------------------------------------------------------------------
# Contrast phase: vessels and kidneys
# ------------------------------------------------------------------------------------------------

PHASE_LABELS = {"aorta": lv.TOTAL_AORTA, "inferior_vena_cava": lv.TOTAL_INFERIOR_VENA_CAVA,
                "portal_vein_and_splenic_vein": lv.TOTAL_PORTAL_SPLENIC_VEIN}


def test_a_phantom_without_a_phase_draws_no_vessels_or_kidneys():
    spec = replace(BASE, levels=("L1", "L2"), fractures=(), spacing=(3.0, 3.0, 3.0))
    phantom = make_phantom(spec)
    absent = (lv.TOTAL_KIDNEY_RIGHT, lv.TOTAL_KIDNEY_LEFT, lv.TOTAL_INFERIOR_VENA_CAVA, lv.TOTAL_PORTAL_SPLENIC_VEIN)
    assert not np.isin(phantom.total, absent).any() and "phase" not in phantom.truth
    assert not {"phase", "phase_hu", "bone_enhancement_hu"} & set(spec.to_json())
    assert "trabecular_hu_native" not in phantom.truth["vertebrae"][0]


@pytest.mark.parametrize("phase", ["native", "arterial", "portal_venous", "delayed"])
def test_phase_structures_have_their_phase_s_hu(phase):
    spec = PhantomSpec(levels=("T12", "L1", "L2"), spacing=(2.5, 2.5, 2.5), supersampling=1, phase=phase,
                       trabecular_hu={"T12": 150.0, "L1": 120.0, "L2": 150.0})
    phantom = make_phantom(spec)
    truth = phantom.truth["phase"]
    assert truth["phase"] == phase and all(truth["present"].values())
    hu = truth["hu"]
    for name, label in PHASE_LABELS.items():  # noise-free, one sample a voxel: exact HU
        assert np.all(phantom.ct[phantom.total == label] == hu[name]), name
    for label in (lv.TOTAL_KIDNEY_RIGHT, lv.TOTAL_KIDNEY_LEFT):
        kidney = phantom.total == label
        cortex, medulla = kidney & (phantom.tissue == TISSUES["renal_cortex"]), kidney & (phantom.tissue == TISSUES["renal_medulla"])
        assert np.all(cortex | medulla == kidney) and cortex.sum() > 100 and medulla.sum() > 100
        assert np.all(phantom.ct[cortex] == hu["kidney_cortex"]) and np.all(phantom.ct[medulla] == hu["kidney_medulla"])
        depth = ndimage.distance_transform_edt(kidney, sampling=2.5)  # mm to the nearest voxel outside
        assert depth[cortex].max() <= 7.0 + 2.5 * np.sqrt(3) and depth[medulla].min() >= 7.0 - 2.5 * np.sqrt(3)
    enhancement = {"native": 0.0, "arterial": 14.0, "portal_venous": 18.0, "delayed": 18.0}[phase]
    assert truth["trabecular_enhancement_hu"] == enhancement
    l1 = next(v for v in phantom.truth["vertebrae"] if v["level"] == "L1")
    assert (l1["trabecular_hu_native"], l1["trabecular_hu"]) == (120.0, 120.0 + enhancement)
    assert l1["category_native"] == "low-bone-density-possible"
    trabecular = (phantom.total == lv.TOTAL_VERTEBRA_IDS["L1"]) & (phantom.tissue == TISSUES["trabecular_bone"])
    assert np.all(phantom.ct[trabecular] == 120.0 + enhancement)
    assert phantom.truth["aorta"]["hu"] == hu["aorta"]


def test_phase_overrides_and_validation():
    spec = PhantomSpec(levels=("L1",), phase="arterial", phase_hu={"aorta": 240.0}, bone_enhancement_hu=5.0)
    assert spec.aorta_hu_value == 240.0 and spec.phase_structure_hu("kidney_cortex") == 210.0
    assert spec.trabecular_enhancement_hu == 5.0 and spec.to_json()["phase_hu"] == {"aorta": 240.0}
    for kwargs in ({"phase": "venous"}, {"phase": "arterial", "contrast": True}, {"phase_hu": {"aorta": 1.0}},
                   {"phase": "native", "phase_hu": {"liver": 1.0}}, {"bone_enhancement_hu": 3.0}):
        with pytest.raises(ValueError):
            PhantomSpec(**kwargs)
