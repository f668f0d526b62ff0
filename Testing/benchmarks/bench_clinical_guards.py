#!/usr/bin/env python
"""The clinical guards of issue 28 on a suite of phantom spines: the level check, consecutive
fractures, the Cobb angle, and (when ``measure/lesions.py`` is there) lesions and hardware kept out
of the osteoporotic count.

Each phantom is a T8–S1 spine with 12 rib pairs and the sacrum in the field of view, at 1 mm,
0.7x0.7x3 mm or 3 mm voxels (the renderer's default supersampling: with one sample per voxel a
thick-slice image no longer matches its truth), with noise 10–30 HU, rotation and scoliosis; half carry a run of two or
three consecutive fractures (crush, wedge, biconcave, grades 1–3). For each phantom:

* the level check on the true labels (an alarm is a false one) and on three mislabellings: every
  label one level up, every label one level down (the S1 segment merged into the sacrum), and two
  adjacent thoracolumbar labels swapped (each must be caught);
* every vertebra's reader-like grade against the truth, on the non-borderline ones (a loss not
  within 3 points of a boundary);
* the coronal Cobb angle measured on the label map against the one of the phantom's own vertebra
  axes.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_clinical_guards.py --jobs 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.measure.frames import VertebraFrame  # noqa: E402
from VertebralFractureScreenLib.measure.grading import grade_spine  # noqa: E402
from VertebralFractureScreenLib.measure.level_check import check_levels  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import measure_heights  # noqa: E402
from VertebralFractureScreenLib.measure.spine_shape import spine_curvature  # noqa: E402
from VertebralFractureScreenLib.phantom import mislabel  # noqa: E402
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, make_phantom  # noqa: E402

LEVELS = lv.parse_level_range("T8-S1")
SPACINGS = {"1 mm": (1.0, 1.0, 1.0), "0.7x0.7x3": (0.7, 0.7, 3.0), "3 mm": (3.0, 3.0, 3.0)}
RUNS = [(), ("T12:crush:0.3", "L1:crush:0.3"), ("T12:crush:0.3", "L1:crush:0.3", "L2:crush:0.3"),
        ("L1:wedge:0.3", "L2:wedge:0.3"), ("T11:wedge:0.45", "T12:wedge:0.45", "L1:wedge:0.45"),
        ("L2:biconcave:0.3", "L3:biconcave:0.3"), ("L1:crush:0.22", "L2:crush:0.22", "L3:crush:0.22"),
        ("T12:wedge:0.3", "L1:crush:0.45", "L2:biconcave:0.3"), ()]
BORDERLINE = 0.03
BOUNDARIES = (0.20, 0.25, 0.40)


def suite() -> list[tuple[str, PhantomSpec]]:
    """45 phantoms: each fracture run (and normal spines) at each voxel size, with varied noise,
    rotation and scoliosis."""
    cases = []
    for s, (name, spacing) in enumerate(SPACINGS.items()):
        for r, run in enumerate(RUNS * 2 if name != "3 mm" else RUNS + RUNS[:6]):
            seed = 100 * s + r
            rng = np.random.default_rng(seed)
            spec = PhantomSpec(levels=LEVELS, spacing=spacing, rib_pairs=12,
                               noise_hu=float(rng.choice([10.0, 20.0, 30.0])), seed=seed,
                               scoliosis_deg=float(rng.choice([0.0, 15.0, 30.0])),
                               rotation_deg=tuple(float(x) for x in rng.uniform(-8, 8, 3)),
                               fractures=tuple(Fracture.parse(f) for f in run))
            cases.append((f"{name} #{r} {'+'.join(run) or 'normal'}", spec))
    return cases[:45]


def _drawn_curvature(phantom):
    drawn = [SimpleNamespace(level=v["level"], flags=[], frame=VertebraFrame(
        np.asarray(v["centre_ras"]), *(np.asarray(v["axes_ras"][a]) for a in ("lr", "ap", "cc"))))
        for v in phantom.truth["vertebrae"]]
    return spine_curvature(drawn)


def run_case(case) -> dict:
    name, spec = case
    started = time.perf_counter()
    phantom = make_phantom(spec, workers=1)
    rendered = time.perf_counter() - started
    total, m = phantom.total, phantom.ijk_to_ras
    merged = total.copy()
    merged[total == lv.TOTAL_VERTEBRA_IDS["S1"]] = lv.TOTAL_SACRUM
    checks = {"true": check_levels(total, m), "up": check_levels(mislabel.shift_levels(merged, -1), m),
              "down": check_levels(mislabel.shift_levels(merged, 1), m),
              "swap": check_levels(mislabel.swap_levels(total, "T12", "L1"), m)}
    started = time.perf_counter()
    heights = measure_heights(total, m, body_labels=phantom.vertebrae_body, ct=phantom.ct)
    grades = {g.level: g for g in grade_spine(heights)}
    measured = time.perf_counter() - started
    graded = []
    for truth in phantom.truth["vertebrae"]:
        level = truth["level"]
        if level == "S1" or grades[level].genant_grade is None:
            continue
        borderline = any(abs(truth["height_loss"] - b) < BORDERLINE for b in BOUNDARIES)
        graded.append((truth["genant_grade"], grades[level].genant_grade, borderline, bool(truth["genant_grade"])))
    cobb = spine_curvature(heights).coronal_cobb_deg
    return {"name": name, "spacing": name.split(" #")[0], "checks": {k: c.doubtful for k, c in checks.items()},
            "shifts": {k: c.shift for k, c in checks.items()},
            "findings": {k: list(c.disagreements) for k, c in checks.items()}, "graded": graded,
            "cobb": cobb, "cobb_drawn": _drawn_curvature(phantom).coronal_cobb_deg, "render_s": rendered,
            "measure_s": measured}


def report(results: list[dict]) -> None:
    print(f"{len(results)} phantoms (T8–S1, 12 rib pairs, sacrum in view)\n")
    print("| voxels | phantoms | false level alarms | shift up caught | shift down caught | swap caught "
          "| exact grade, non-borderline (consecutive runs) | max abs Cobb error |")
    print("|---|---|---|---|---|---|---|---|")
    for spacing in [*SPACINGS, "all"]:
        rows = [r for r in results if spacing in ("all", r["spacing"])]
        run_rows = [g for r in rows for g in r["graded"] if not g[2]]
        exact = sum(t == m for t, m, _, _ in run_rows)
        errors = [abs(r["cobb"] - r["cobb_drawn"]) for r in rows if math.isfinite(r["cobb"])]
        print(f"| {spacing} | {len(rows)} | {sum(r['checks']['true'] for r in rows)} "
              f"| {sum(r['checks']['up'] for r in rows)}/{len(rows)} | {sum(r['checks']['down'] for r in rows)}/{len(rows)} "
              f"| {sum(r['checks']['swap'] for r in rows)}/{len(rows)} "
              f"| {exact}/{len(run_rows)} ({100.0 * exact / max(1, len(run_rows)):.1f} %) "
              f"| {max(errors, default=math.nan):.1f}° |")
    print("\nAgreed level shift (ribs and sacrum; what --relabel-levels would apply): 'up' should give +1, "
          "every other case 0")
    for case in ("true", "up", "down", "swap"):
        tally = {}
        for r in results:
            tally[r["shifts"][case]] = tally.get(r["shifts"][case], 0) + 1
        print(f"  {case:<5} " + ", ".join(f"shift {k:+d}: {n}" for k, n in sorted(tally.items())))
    wrong = [(r["name"], t, m) for r in results for t, m, b, _ in r["graded"] if not b and t != m]
    if wrong:
        print("\nwrong grades (truth → measured):", "; ".join(f"{n}: {t}→{m}" for n, t, m in wrong))
    alarms = [(r["name"], r["findings"]["true"]) for r in results if r["checks"]["true"]]
    if alarms:
        print("\nfalse level alarms:", alarms)
    print(f"\nmedian morphometry + grading per spine: {np.median([r['measure_s'] for r in results]):.2f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N phantoms")
    args = parser.parse_args(argv)
    cases = suite()[: args.limit]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_case, cases))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
