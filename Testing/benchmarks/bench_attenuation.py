#!/usr/bin/env python
"""Accuracy and speed of bone attenuation, contrast and paraspinal muscle metrics on phantoms.

Suite: a T4–S1 phantom spine (fractures T7 wedge 0.35, T12 crush 0.30, L2 biconcave 0.35;
trabecular HU from 150 at T4 down to 85 at L5) rendered at 1 mm, 0.7 x 0.7 x 3 mm and 3 mm voxels,
upright and rotated 20° about the left-right axis, noise-free (cached in the phantom cache); each
rendering is measured with Gaussian noise of 0, 10, 20 and 30 HU added (seeded), and a 3 mm
contrast-enhanced rendering checks the aorta. Every exam runs the whole chain: morphometry (CT and
``vertebrae_body`` map), grading, trabecular ROIs, bone summary, contrast, muscles.

Truth comes from the phantom: ``trabecular_hu`` per vertebra, the muscle rows per level slab
(``volume_ml``, ``lean_hu``, ``imat_fraction``, ``fov_fraction``, ``slab_planes_ras``) and the
aorta. Noise-free exams are measured a second time in the phantom's own slab planes
(``measure_muscles(..., slabs=...)``): what error is left there is the label maps'
discretisation, the rest the slab planes'. Whether an ROI voxel touches cortex is decided on the
phantom's geometry itself: every ROI voxel's centre and 27 sub-voxel points are painted with the
phantom's tissues, and the distance from the voxel's corners to the body's true surface (elliptic
wall, analytic endplates) is computed. Under the single-vertebra trabecular goal, what the noise
alone would give: each ROI's mean drawn with its standard error (noise / sqrt(voxels)), the
largest error of the rendering's ROIs over 10,000 draws (median, 5-95 %) and the share of draws
within the goal.

Speed: whole-exam attenuation + contrast + muscle metrics on the 17-vertebra 512 x 512 x 500
exam of ``bench_morphometry_speed.py`` (same cached phantom), best of ``--repeat``, beside the
morphometry it needs (measured there, repeated here for reference).

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_attenuation.py --jobs 2

The first run renders 7 phantoms (about 30 minutes on 2 cores); later runs take a few minutes.
"""

from __future__ import annotations

import gc
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

from VertebralFractureScreenLib.measure import attenuation as at  # noqa: E402
from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.measure import muscles as mu  # noqa: E402
from VertebralFractureScreenLib.phantom import render as ph  # noqa: E402
from VertebralFractureScreenLib.measure.grading import grade_spine  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import measure_heights  # noqa: E402

LEVELS = "T4-S1"
FRACTURES = ("T7:wedge:0.35", "T12:crush:0.3", "L2:biconcave:0.35")
TRABECULAR_HU = {"T4": 150.0, "T5": 145.0, "T6": 140.0, "T7": 135.0, "T8": 130.0, "T9": 125.0, "T10": 120.0,
                 "T11": 115.0, "T12": 110.0, "L1": 105.0, "L2": 100.0, "L3": 95.0, "L4": 90.0, "L5": 85.0,
                 "S1": 150.0}
SPACINGS = {"1 mm": (1.0, 1.0, 1.0), "0.7x0.7x3": (0.7, 0.7, 3.0), "3 mm": (3.0, 3.0, 3.0)}
ROTATIONS = {"0°": (0.0, 0.0, 0.0), "20°": (20.0, 0.0, 0.0)}
NOISES = (0.0, 10.0, 20.0, 30.0)

GOAL_TRABECULAR_HU = 2.0  # |error| at noise 20 HU
GOAL_VOLUME_PCT = 3.0
GOAL_MUSCLE_HU = 2.0
GOAL_FAT_FRACTION = 0.02
GOAL_SECONDS = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    rotation: str
    spec: ph.PhantomSpec


def make_spec(spacing, rotation, contrast=False) -> ph.PhantomSpec:
    return ph.PhantomSpec(levels=lv.parse_level_range(LEVELS), spacing=spacing, rotation_deg=rotation,
                          fractures=tuple(ph.Fracture.parse(f) for f in FRACTURES), trabecular_hu=TRABECULAR_HU,
                          contrast=contrast, noise_hu=0.0, seed=11)


def build_suite() -> list[Case]:
    cases = [Case(f"{group} {rot}", group, rot, make_spec(spacing, rotation))
             for group, spacing in SPACINGS.items() for rot, rotation in ROTATIONS.items()]
    cases.append(Case("3 mm 0° contrast", "3 mm", "0°", make_spec(SPACINGS["3 mm"], ROTATIONS["0°"], contrast=True)))
    return cases


def with_noise(ct: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The noise-free rendering plus Gaussian noise, rounded to whole HU as the phantom does."""
    if sigma <= 0:
        return ct
    rng = np.random.default_rng(seed)
    noisy = ct.astype(np.float32) + rng.normal(0.0, sigma, size=ct.shape).astype(np.float32)
    return np.clip(np.round(noisy), -1024, 3071).astype(np.int16)


# ------------------------------------------------------------------------------------------------
# Geometry truth of the ROIs
# ------------------------------------------------------------------------------------------------

_ANGLES = np.linspace(0.0, 2.0 * np.pi, 1441)
_CORNERS = np.array(list(itertools.product((-0.5, 0.0, 0.5), repeat=3)))
_SUBSAMPLES = np.array(list(itertools.product((-1 / 3, 0.0, 1 / 3), repeat=3)))


def roi_truth_check(case: Case, phantom: bc.CachedPhantom, heights) -> dict[str, dict]:
    """Per vertebra: ROI voxels whose centre is not trabecular bone, voxels any of whose 27
    sub-voxel points is not trabecular bone, and the smallest distance (mm) from a voxel's corners
    and centre to the body's true outer surface (elliptic wall or endplate)."""
    scene = ph.SpineScene(case.spec)
    scene.prepare_bounds()
    ijk_to_anatomy = np.linalg.inv(np.asarray(phantom.truth["anatomy_to_ras"])) @ phantom.ijk_to_ras
    trabecular = ph.TISSUES["trabecular_bone"]
    out = {}
    for h in heights:
        slices, roi, _ = at.trabecular_roi_mask(h, phantom.total, phantom.ijk_to_ras,
                                                body_labels=phantom.vertebrae_body)
        if roi is None or not roi.any():
            out[h.level] = {"centres": 0, "touching": 0, "min_distance": float("nan")}
            continue
        index = np.nonzero(roi)
        ijk = np.stack([index[2] + slices[2].start, index[1] + slices[1].start, index[0] + slices[0].start],
                       axis=1).astype(float)

        def anatomy(points):
            return points @ ijk_to_anatomy[:3, :3].T + ijk_to_anatomy[:3, 3]

        centres = int(np.count_nonzero(scene.paint(anatomy(ijk))["tissue"] != trabecular))
        sub = scene.paint(anatomy((ijk[:, None, :] + _SUBSAMPLES[None]).reshape(-1, 3)))["tissue"]
        touching = int(np.count_nonzero((sub.reshape(len(ijk), -1) != trabecular).any(axis=1)))
        model = scene.models[h.level]
        u, v, w = model.local(anatomy((ijk[:, None, :] + _CORNERS[None]).reshape(-1, 3)))
        a, b = model.half_width, model.half_depth
        wall = np.sqrt(np.min((u[:, None] - a * np.cos(_ANGLES)[None]) ** 2
                              + (v[:, None] - b * np.sin(_ANGLES)[None]) ** 2, axis=1))
        wall = np.where((u / a) ** 2 + (v / b) ** 2 <= 1.0, wall, -wall)
        top, bottom = model.endplates(u, v)
        distance = np.minimum(wall, np.minimum(top - w, w - bottom))
        out[h.level] = {"centres": centres, "touching": touching, "min_distance": float(distance.min())}
    return out


# ------------------------------------------------------------------------------------------------
# Measuring one exam
# ------------------------------------------------------------------------------------------------


def _plane_errors(slabs, truth_rows, truth_vertebrae) -> list[dict]:
    """Distance (mm) between our slab planes and the phantom's: at the plane's point on the spine,
    55 mm behind it (autochthon) and 40 mm to either side (iliopsoas); and the angle (degrees)."""
    by_level = {r["level"]: r for r in truth_rows if r["muscle"] == "autochthon_left"}
    out = []
    for slab in slabs:
        row = by_level.get(slab.level)
        if row is None:
            continue
        for side in ("below", "above"):
            plane = getattr(slab, side)
            if not plane.measured:
                continue
            true = row["slab_planes_ras"][side]
            point, normal = np.asarray(true["point"]), np.asarray(true["normal"])
            ap = np.asarray(truth_vertebrae[slab.level]["axes_ras"]["ap"])
            ap = ap - (ap @ normal) * normal
            ap /= np.linalg.norm(ap)
            lr = np.cross(ap, normal)
            probes = [point, point - 55.0 * ap, point + 40.0 * lr, point - 40.0 * lr]
            offsets = [abs(float((q - plane.point) @ plane.normal)) for q in probes]
            angle = float(np.degrees(np.arccos(np.clip(plane.normal @ normal, -1.0, 1.0))))
            out.append({"at_spine": offsets[0], "anywhere": max(offsets), "angle": angle})
    return out


def _true_plane(truth_m: dict, level: str, side: str, measured: "mu.SlabPlane") -> "mu.SlabPlane":
    """The phantom's slab plane of ``level`` (``below`` / ``above``), or ``measured`` when the
    phantom has no row for the level."""
    row = truth_m.get(("autochthon_left", level))
    if row is None:
        return measured
    plane = row["slab_planes_ras"][side]
    return mu.SlabPlane(np.asarray(plane["point"], dtype=float), np.asarray(plane["normal"], dtype=float),
                        measured.between, measured.measured)


def measure_exam(case: Case, phantom: bc.CachedPhantom, noise: float) -> dict:
    ct = with_noise(phantom.ct, noise, seed=1000 + int(noise))
    heights = measure_heights(phantom.total, phantom.ijk_to_ras, body_labels=phantom.vertebrae_body, ct=ct)
    grades = grade_spine(heights)
    rois = at.measure_trabecular(ct, phantom.total, phantom.ijk_to_ras, heights,
                                 body_labels=phantom.vertebrae_body, grades=grades)
    contrast = at.measure_contrast(ct, phantom.total, phantom.ijk_to_ras)
    summary = at.bone_summary(rois, contrast)
    slabs = mu.level_slabs(heights)
    rows = mu.measure_muscles(ct, phantom.total, phantom.ijk_to_ras, heights, slabs=slabs)
    truth_v = {v["level"]: v for v in phantom.truth["vertebrae"]}
    truth_m = {(r["muscle"], r["level"]): r for r in phantom.truth["muscles"]}
    vertebrae = []
    for roi in rois:
        t = truth_v[roi.level]
        vertebrae.append({"level": roi.level, "error": roi.mean_hu - t["trabecular_hu"],
                          "median_error": roi.median_hu - t["trabecular_hu"], "voxels": roi.voxels,
                          "se": roi.mean_hu_se,
                          "usable": roi.usable, "complete": roi.complete, "flags": roi.flags})
    muscles = []
    for row in rows:
        t = truth_m.get((row.muscle, row.level))
        if t is None:
            continue
        muscles.append({
            "muscle": row.muscle, "level": row.level, "complete": row.complete, "flags": row.flags,
            "fov_fraction": t["fov_fraction"], "volume_pct": 100.0 * (row.volume_ml / t["volume_ml"] - 1.0),
            "mean_hu": row.mean_hu - t["lean_hu"], "lean_hu": row.lean_hu - t["lean_hu"],
            "imat": row.imat_fraction - t["imat_fraction"], "fat": row.fat_fraction - t["imat_fraction"],
            "volume_ml": row.volume_ml, "lean_se": row.lean_hu_se})
    true_l1 = truth_v["L1"]["trabecular_hu"]
    volume_with_true_planes = []
    if noise == 0.0:
        # The same muscle volumes in the phantom's own slabs: what is left is the label map's
        # discretisation; the difference to the rows above is the slab planes' share of the error.
        true_slabs = [mu.LevelSlab(s.level, _true_plane(truth_m, s.level, "below", s.below),
                                   _true_plane(truth_m, s.level, "above", s.above), s.complete, list(s.flags))
                      for s in slabs]
        for row in mu.measure_muscles(ct, phantom.total, phantom.ijk_to_ras, heights, slabs=true_slabs):
            t = truth_m.get((row.muscle, row.level))
            if t is not None and row.complete and row.level != "lumbar":
                volume_with_true_planes.append(100.0 * (row.volume_ml / t["volume_ml"] - 1.0))
    return {
        "volume_with_true_planes": volume_with_true_planes,
        "case": case, "noise": noise, "vertebrae": vertebrae, "muscles": muscles,
        "planes": _plane_errors(slabs, phantom.truth["muscles"], truth_v),
        "aorta_error": (contrast.aorta_hu - phantom.truth["aorta"]["hu"]) if contrast.aorta_hu is not None else None,
        "aorta_plain_error": float(ct[phantom.total == lv.TOTAL_AORTA].mean()) - phantom.truth["aorta"]["hu"],
        "contrast_ok": contrast.contrast_enhanced == phantom.truth["aorta"]["contrast_enhanced"],
        "category_ok": summary.l1_level == "L1" and summary.category == at.opportunistic_category(true_l1),
        "category_uncertain": summary.category_uncertain, "l1_hu_se": summary.l1_hu_se,
        "heights": heights,
    }


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def _stats(values) -> tuple[float, float, float]:
    a = np.abs(np.asarray([v for v in values if np.isfinite(v)], dtype=float))
    if not len(a):
        return float("nan"), float("nan"), float("nan")
    return float(np.median(a)), float(np.percentile(a, 90)), float(a.max())


def _fmt(triple, digits=2) -> str:
    return " / ".join(f"{x:.{digits}f}" for x in triple)


def print_trabecular(results: list[dict]):
    print("\n=== Trabecular ROI: |mean HU - truth| over complete vertebrae with a usable ROI "
          "(median / p90 / max), bias, reported standard error (median / max) and the share of ROIs within "
          "two of it, ROI voxels ===")
    print(f"{'group':<12}{'rot':<5}{'noise':>6}  {'|error| HU':<22}{'bias':>7}  {'SE HU':<12}{'<=2 SE':>7}  "
          f"{'voxels (median, min)':<22}{'small/empty ROIs'}")
    for r in results:
        if "contrast" in r["case"].name:
            continue
        usable = [v for v in r["vertebrae"] if v["usable"]]
        errors = [v["error"] for v in usable]
        voxels = [v["voxels"] for v in usable]
        small = [v["level"] for v in r["vertebrae"] if "roi_small" in v["flags"] or "roi_empty" in v["flags"]]
        ses = np.array([v["se"] for v in usable])
        within = np.mean(np.abs(errors) <= 2.0 * ses + 1e-9)
        print(f"{r['case'].group:<12}{r['case'].rotation:<5}{r['noise']:>6.0f}  {_fmt(_stats(errors)):<22}"
              f"{np.mean(errors):>+7.2f}  {np.median(ses):4.2f} / {np.max(ses):4.2f} {100 * within:>6.0f}%  "
              f"{int(np.median(voxels)):>6}, {min(voxels):<13}{', '.join(small) or '-'}")


def print_muscles(results: list[dict]):
    print("\n=== Muscles: complete per-level rows (median / max of |error|); lumbar totals (max |error|) ===")
    print("  volume in %; mean_hu = SPEC mean over -29..150 HU, lean_hu = partial-volume-guarded; HU against the "
          "phantom's lean HU;\n  imat = SPEC share of voxels in -190..-30 HU, fat = unmixed fat fraction; both "
          "against the true fat volume fraction")
    head = (f"{'group':<12}{'rot':<5}{'noise':>6}  {'volume %':<13}{'mean_hu':<13}{'lean_hu':<13}{'imat':<15}"
            f"{'fat':<15}| lumbar: {'vol %':<7}{'mean_hu':<9}{'lean_hu':<9}{'imat':<7}{'fat':<7}")
    print(head)
    for r in results:
        if "contrast" in r["case"].name:
            continue
        rows = [m for m in r["muscles"] if m["complete"] and m["level"] != "lumbar"]
        lumbar = [m for m in r["muscles"] if m["level"] == "lumbar"]

        def cell(key, digits):
            s = _stats([m[key] for m in rows])
            return f"{s[0]:.{digits}f} / {s[2]:.{digits}f}"

        def lum(key, digits):
            return f"{_stats([m[key] for m in lumbar])[2]:.{digits}f}"

        print(f"{r['case'].group:<12}{r['case'].rotation:<5}{r['noise']:>6.0f}  {cell('volume_pct', 1):<13}"
              f"{cell('mean_hu', 1):<13}{cell('lean_hu', 1):<13}{cell('imat', 3):<15}{cell('fat', 3):<15}|         "
              f"{lum('volume_pct', 1):<7}{lum('mean_hu', 1):<9}{lum('lean_hu', 1):<9}{lum('imat', 3):<7}"
              f"{lum('fat', 3):<7}")


def print_fov_and_planes(results: list[dict]):
    print("\n=== Slab planes against the phantom's (noise 0): |distance| mm at the spine, largest of spine / "
          "55 mm behind / 40 mm beside (median / max), angle ° (median / max); muscle volume error per level "
          "(median / max %) in our slabs and in the phantom's ===")
    for r in results:
        if r["noise"] != 0 or "contrast" in r["case"].name:
            continue
        p = r["planes"]
        def cell(key):
            return _fmt(_stats([x[key] for x in p])[::2])

        own = _stats(r["volume_with_true_planes"])
        ours = _stats([m["volume_pct"] for m in r["muscles"] if m["complete"] and m["level"] != "lumbar"])
        print(f"{r['case'].group:<12}{r['case'].rotation:<5} at spine {cell('at_spine')}   anywhere {cell('anywhere')}"
              f"   angle {cell('angle')}   | volume % per level, our / the phantom's planes: "
              f"{ours[0]:.1f} / {ours[2]:.1f}   {own[0]:.1f} / {own[2]:.1f}")
    print("\n=== Field of view: rows the phantom has partly outside the image (fov_fraction < 1) and our flags ===")
    for r in results:
        if r["noise"] != 0 or "contrast" in r["case"].name:
            continue
        partial = [m for m in r["muscles"] if m["fov_fraction"] < 0.999]
        missed = [f"{m['muscle']} {m['level']}" for m in partial if m["complete"]]
        flagged = [m for m in r["muscles"] if not m["complete"]]
        print(f"{r['case'].group:<12}{r['case'].rotation:<5} partly outside: {len(partial)}, of them not flagged: "
              f"{len(missed)}{' (' + ', '.join(missed) + ')' if missed else ''}; flagged rows: {len(flagged)} "
              f"({', '.join(sorted({f for m in flagged for f in m['flags']}))})")


def print_rotation(results: list[dict]):
    print("\n=== Rotation: measured value at 20° minus at 0°, same spacing and noise (largest |difference|) ===")
    by_key = {(r["case"].group, r["case"].rotation, r["noise"]): r for r in results if "contrast" not in r["case"].name}
    for group in SPACINGS:
        for noise in NOISES:
            a, b = by_key.get((group, "0°", noise)), by_key.get((group, "20°", noise))
            if a is None or b is None:
                continue
            va = {v["level"]: v for v in a["vertebrae"] if v["usable"]}
            vb = {v["level"]: v for v in b["vertebrae"] if v["usable"]}
            hu = [abs(va[k]["error"] - vb[k]["error"]) for k in va.keys() & vb.keys()]
            ma = {(m["muscle"], m["level"]): m for m in a["muscles"] if m["complete"]}
            mb = {(m["muscle"], m["level"]): m for m in b["muscles"] if m["complete"]}
            common = ma.keys() & mb.keys()
            vol = [abs(ma[k]["volume_pct"] - mb[k]["volume_pct"]) for k in common]
            lean = [abs(ma[k]["lean_hu"] - mb[k]["lean_hu"]) for k in common]
            fat = [abs(ma[k]["fat"] - mb[k]["fat"]) for k in common]
            print(f"{group:<12}noise {noise:>3.0f}: trabecular HU {max(hu):5.2f}   muscle volume {max(vol):5.1f} %   "
                  f"lean HU {max(lean):4.1f}   fat fraction {max(fat):.3f}")


def check_goals(results: list[dict], checks: dict[str, dict]):
    print("\n=== Goals ===")

    def line(ok, text):
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")

    rows = [r for r in results if "contrast" not in r["case"].name]
    by_group: dict[str, list] = {}
    for r in rows:
        by_group.setdefault(f"{r['case'].group} {r['case'].rotation}", []).append(r)
    at20 = {g: [r for r in rs if r["noise"] == 20.0] for g, rs in by_group.items()}
    worst = {g: _stats([v["error"] for r in rs for v in r["vertebrae"] if v["usable"]]) for g, rs in at20.items()}
    bias = {g: abs(np.mean([v["error"] for r in rs for v in r["vertebrae"] if v["usable"]])) for g, rs in at20.items()}
    line(all(w[0] <= GOAL_TRABECULAR_HU and bias[g] <= GOAL_TRABECULAR_HU for g, w in worst.items()),
         f"trabecular HU error <= {GOAL_TRABECULAR_HU:g} HU at noise 20 HU (median |error| and |bias| in every "
         "spacing and rotation): " + "; ".join(f"{g} {w[0]:.2f}/{bias[g]:.2f}" for g, w in worst.items()))
    line(all(w[2] <= GOAL_TRABECULAR_HU for w in worst.values()),
         "  ... and every single vertebra (max |error|): " + "; ".join(f"{g} {w[2]:.2f}" for g, w in worst.items()))
    print("         noise alone (each ROI's mean off by 20 HU / sqrt(voxels), Gaussian; 10,000 draws): largest "
          "|error| median (5-95 %), share of draws within the goal: "
          + "; ".join(f"{g} {f['median']:.2f} ({f['p5']:.2f}-{f['p95']:.2f}) {f['p_within']:.0%}"
                      for g, f in ((g, bc.largest_gaussian_error(
                          20.0 / np.sqrt([v["voxels"] for r in rs for v in r["vertebrae"] if v["usable"]]),
                          GOAL_TRABECULAR_HU)) for g, rs in at20.items())))
    centres = sum(c["centres"] for ch in checks.values() for c in ch.values())
    touching = sum(c["touching"] for ch in checks.values() for c in ch.values())
    closest = min(c["min_distance"] for ch in checks.values() for c in ch.values() if np.isfinite(c["min_distance"]))
    line(centres == 0, f"zero cortical voxels in any ROI (noise-free, phantom tissue at the voxel centre): {centres}")
    line(touching == 0 and closest >= 3.0,
         f"  ... no ROI voxel touches non-trabecular tissue (27 sub-voxel points): {touching}; closest voxel corner "
         f"to the true surface {closest:.2f} mm (>= 3 mm)")

    def muscle_goal(key, bound, label, unit="", goal=True):
        """Issue 30's restatement: the per-level median and the L1-L5 totals at every spacing, the
        per-level maximum at <= 1 mm; ``goal=False``: reported, no goal (the SPEC's threshold
        quantities, reported as defined)."""
        def errors(rs, lumbar):
            return [abs(m[key]) for r in rs for m in r["muscles"]
                    if (m["level"] == "lumbar") == lumbar and (lumbar or m["complete"])]
        median = {g: float(np.median(errors(rs, False))) for g, rs in by_group.items()}
        largest = {g: max(errors(rs, False)) for g, rs in by_group.items()}
        lumbar = {g: max(errors(rs, True)) for g, rs in by_group.items()}
        thin = {g: v for g, v in largest.items() if g.split()[0] == "1"}
        digits = 3 if bound < 1 else 2  # 2 HU and 3 % goals: 1.97 must not print as 2.0
        show = line if goal else (lambda ok, text: print(f"  [info] {text}"))
        show(all(v <= bound for v in median.values()), f"{label} <= {bound:g}{unit}, per-level median, all noises: "
             + "; ".join(f"{g} {v:.{digits}f}" for g, v in median.items()))
        show(all(v <= bound for v in lumbar.values()),
             "  ... lumbar L1-L5 totals (max): " + "; ".join(f"{g} {v:.{digits}f}" for g, v in lumbar.items()))
        show(all(v <= bound for v in thin.values()),
             "  ... per-level max at <= 1 mm: " + "; ".join(f"{g} {v:.{digits}f}" for g, v in thin.items())
             + " (thick slices, no goal: " + "; ".join(f"{g} {v:.{digits}f}" for g, v in largest.items()
                                                      if g not in thin) + ")")

    muscle_goal("volume_pct", GOAL_VOLUME_PCT, "muscle volume error", " %")
    muscle_goal("lean_hu", GOAL_MUSCLE_HU, "muscle HU error, partial-volume-guarded lean_hu", " HU")
    print("         lean_hu's standard error (lean_hu_se) at noise 20 / 30 HU, level rows: median / max; rows within "
          "2 SE of the truth; noise alone (each row's lean_hu off by its SE, Gaussian; 10,000 draws): largest |error| "
          "median (5-95 %), share of draws within the goal")
    for g, rs in by_group.items():
        cells = []
        for noise in (20.0, 30.0):
            level_rows = [m for r in rs if r["noise"] == noise for m in r["muscles"]
                          if m["complete"] and m["level"] != "lumbar" and np.isfinite(m["lean_se"])]
            se = np.array([m["lean_se"] for m in level_rows])
            within = np.mean([abs(m["lean_hu"]) <= 2.0 * m["lean_se"] for m in level_rows])
            floor = bc.largest_gaussian_error(se, GOAL_MUSCLE_HU)
            cells.append(f"{noise:.0f} HU: SE {np.median(se):.2f} / {se.max():.2f}, {within:.0%} within 2 SE, "
                         f"noise alone {floor['median']:.2f} ({floor['p5']:.2f}-{floor['p95']:.2f}) "
                         f"{floor['p_within']:.0%}")
        print(f"           {g:<14}" + "; ".join(cells))
    muscle_goal("fat", GOAL_FAT_FRACTION, "fat fraction error, unmixed fat_fraction")
    muscle_goal("mean_hu", GOAL_MUSCLE_HU, "muscle HU error, SPEC mean_hu (threshold mean)", " HU", goal=False)
    muscle_goal("imat", GOAL_FAT_FRACTION, "fat fraction error, SPEC imat_fraction (threshold share)", goal=False)
    fov_missed = sum(1 for r in rows for m in r["muscles"] if m["fov_fraction"] < 0.999 and m["complete"])
    line(fov_missed == 0, f"muscle rows partly outside the field of view are flagged: {fov_missed} not flagged")
    contrast = [r for r in results if "contrast" in r["case"].name] + [r for r in rows]
    aorta = _stats([r["aorta_error"] for r in contrast])
    plain = _stats([r["aorta_plain_error"] for r in contrast])
    line(all(r["contrast_ok"] for r in contrast) and aorta[2] <= 2.0,
         f"contrast flag right in every exam ({sum(r['contrast_ok'] for r in contrast)}/{len(contrast)}); aorta HU "
         f"error max {aorta[2]:.2f} HU (whole mask: {plain[2]:.2f} HU)")
    line(all(r["category_ok"] for r in rows),
         f"opportunistic category from L1 as the truth gives it: {sum(r['category_ok'] for r in rows)}/{len(rows)} "
         "exams")
    uncertain = [f"{r['case'].name} noise {r['noise']:.0f}" for r in rows if r["category_uncertain"]]
    print(f"         L1 {TRABECULAR_HU['L1']:g} HU, {at.CATEGORY_THRESHOLDS_HU[0]:g} HU threshold: category_uncertain "
          f"in {len(uncertain)} of {len(rows)} exams{(': ' + ', '.join(uncertain)) if uncertain else ''}")


# ------------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------------


def speed(cache: Path, repeat: int, rerender: bool):
    import bench_morphometry_speed as speed_bench

    slice_mm, _ = speed_bench.slice_spacing_that_fits()
    spec = speed_bench.make_spec(slice_mm)
    bc.render_many({"speed-T1L5-512x512x500": spec}, cache, jobs=1, rerender=rerender)
    phantom = bc.load_cached(spec, cache)
    ct, total, body, m = phantom.ct, phantom.total, phantom.vertebrae_body, phantom.ijk_to_ras

    def best(function):
        times, result = [], None
        for _ in range(repeat):
            gc.collect()
            t0 = time.perf_counter()
            result = function()
            times.append(time.perf_counter() - t0)
        return min(times), result

    t_morph, heights = best(lambda: measure_heights(total, m, body_labels=body, ct=ct))
    grades = grade_spine(heights)

    def exam():
        rois = at.measure_trabecular(ct, total, m, heights, body_labels=body, grades=grades)
        contrast = at.measure_contrast(ct, total, m)
        at.bone_summary(rois, contrast)
        mu.muscle_summary(mu.measure_muscles(ct, total, m, heights))

    parts = {
        "trabecular ROIs": lambda: at.measure_trabecular(ct, total, m, heights, body_labels=body, grades=grades),
        "contrast": lambda: at.measure_contrast(ct, total, m),
        "muscles": lambda: mu.measure_muscles(ct, total, m, heights),
    }
    print(f"\n=== Speed: {len(heights)} vertebrae on {ct.shape[2]}x{ct.shape[1]}x{ct.shape[0]} voxels, "
          f"best of {repeat} ===")
    for name, function in parts.items():
        print(f"  {name:<40}{best(function)[0]:7.3f} s")
    t_exam, _ = best(exam)
    print(f"  {'attenuation + contrast + muscles + summaries':<40}{t_exam:7.3f} s   "
          f"[{'PASS' if t_exam < GOAL_SECONDS else 'FAIL'}] goal < {GOAL_SECONDS:g} s")
    print(f"  {'morphometry (measured elsewhere)':<40}{t_morph:7.3f} s")
    print(f"  {'together':<40}{t_exam + t_morph:7.3f} s")


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = bc.bench_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the speed measurement; the best counts")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    parser.add_argument("--speed-only", action="store_true", help="only the speed measurement")
    args = parser.parse_args(argv)
    cache = args.cache.expanduser()
    cases = [] if args.speed_only else [c for c in build_suite() if args.only in c.name]
    noises = ", ".join(f"{n:g}" for n in NOISES)
    print(f"bench_attenuation: {len(cases)} phantoms x {len(NOISES)} noise levels ({noises} HU)")
    bc.render_many({c.name: c.spec for c in cases}, cache, jobs=args.jobs, rerender=args.rerender)
    results, checks = [], {}
    for case in cases:
        phantom = bc.load_cached(case.spec, cache)
        for noise in NOISES if "contrast" not in case.name else (0.0, 20.0):
            t0 = time.perf_counter()
            result = measure_exam(case, phantom, noise)
            results.append(result)
            print(f"  measured  {case.name:<22} noise {noise:>3.0f} HU in {time.perf_counter() - t0:5.1f} s")
            if noise == 0.0 and "contrast" not in case.name:
                checks[case.name] = roi_truth_check(case, phantom, result["heights"])
    if results:
        print_trabecular(results)
        print_muscles(results)
        print_fov_and_planes(results)
        print_rotation(results)
        check_goals(results, checks)
    if not args.no_speed:
        speed(cache, args.repeat, args.rerender)
    return 0


if __name__ == "__main__":
    sys.exit(main())
