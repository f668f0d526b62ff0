#!/usr/bin/env python
"""Speed benchmark of vertebral morphometry on a full-size exam.

A 17-vertebra phantom (T1–L5, a few fractures) on a 512 x 512 x 500 grid (0.8 x 0.8 mm in plane,
whole-body field of view, no partial-volume supersampling so the render stays manageable; cached)
is measured with ``VertebralFractureScreenLib.measure.morphometry.measure_heights``, best of ``--repeat``
runs, in three variants (CT + vertebrae_body map; vertebrae_body map without CT; vertebra labels
only), and once with TotalSegmentator's spine-report ``VertebraeProcessor.process_vertebrae()`` on
the same CT and masks. Prints the times and the speed ratio.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_morphometry_speed.py

The first run renders the phantom (several minutes, ~2 GB of memory) and caches it; TotalSegmentator's
measurement keeps full-volume masks per vertebra and needs roughly 10 GB of memory on this grid.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.phantom import render as ph  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import measure_heights  # noqa: E402

SIZE_IJK = (512, 512, 500)
IN_PLANE_MM = 0.8
PREFERRED_SLICE_MM = 1.0
LEVELS = "T1-L5"
FRACTURES = ("T7:wedge:0.35", "T12:crush:0.3", "L2:biconcave:0.45", "L4:wedge:0.22")
GOAL_SECONDS = 1.0
GOAL_RATIO = 10.0


def slice_spacing_that_fits() -> tuple[float, float]:
    """Slice spacing (mm) so that the T1–L5 field of view (with its margins) fits in 500 slices:
    1.0 mm when it fits, else the next 0.05 mm step up. Returns (spacing, cranio-caudal extent)."""
    probe = ph.PhantomSpec(levels=lv.parse_level_range(LEVELS), spacing=(IN_PLANE_MM, IN_PLANE_MM, PREFERRED_SLICE_MM),
                           size_ijk=SIZE_IJK, fov="body", supersampling=1)
    scene = ph.SpineScene(probe)
    scene.prepare_bounds()
    lo, hi = scene.spine_box  # anatomy frame; no rotation, so its S extent is the k extent
    extent = float(hi[2] - lo[2])
    available = (SIZE_IJK[2] - 1) * PREFERRED_SLICE_MM
    if extent <= available:
        return PREFERRED_SLICE_MM, extent
    return math.ceil(extent / (SIZE_IJK[2] - 1) / 0.05) * 0.05, extent


def make_spec(slice_mm: float) -> ph.PhantomSpec:
    return ph.PhantomSpec(
        levels=lv.parse_level_range(LEVELS), spacing=(IN_PLANE_MM, IN_PLANE_MM, slice_mm), size_ijk=SIZE_IJK,
        fov="body", supersampling=1, noise_hu=20.0, fractures=tuple(ph.Fracture.parse(f) for f in FRACTURES),
        seed=500)


def best_of(n: int, function) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(n):
        gc.collect()
        t0 = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - t0)
    return best, result


def accuracy_line(name: str, truth: dict, measured: dict[str, tuple[float, float, float]]) -> str:
    errors, missing = [], 0
    for v in truth["vertebrae"]:
        if v["level"] == "S1" or not v["complete"]:
            continue
        heights = measured.get(v["level"])
        if heights is None or not all(np.isfinite(heights)):
            missing += 1
            continue
        errors += [abs(m - v[f"{k}_mm"]) for m, k in zip(heights, ("ha", "hm", "hp"))]
    if not errors:
        return f"  {name}: no vertebra measured"
    e = np.asarray(errors)
    return (f"  {name:<22} |error| median {np.median(e):.2f} mm, p90 {np.percentile(e, 90):.2f} mm, "
            f"max {e.max():.2f} mm over {len(e) // 3} vertebrae ({missing} missing)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_common_arguments(parser)
    parser.add_argument("--repeat", type=int, default=3, help="runs of our morphometry; the best counts (default 3)")
    args = parser.parse_args(argv)
    cache = args.cache.expanduser()

    slice_mm, extent = slice_spacing_that_fits()
    fit = ("fits" if slice_mm == PREFERRED_SLICE_MM
           else f"does NOT fit in {SIZE_IJK[2]} slices at {PREFERRED_SLICE_MM} mm; slice spacing raised to {slice_mm} mm")
    print(f"bench_morphometry_speed: {LEVELS} (17 vertebrae) on a {SIZE_IJK[0]}x{SIZE_IJK[1]}x{SIZE_IJK[2]} grid, "
          f"spacing {IN_PLANE_MM} x {IN_PLANE_MM} x {slice_mm} mm, fov 'body', supersampling 1")
    print(f"  cranio-caudal extent of the T1–L5 field of view: {extent:.1f} mm → {fit}")
    spec = make_spec(slice_mm)
    bc.render_many({"speed-T1L5-512x512x500": spec}, cache, jobs=1, rerender=args.rerender)
    t0 = time.perf_counter()
    phantom = bc.load_cached(spec, cache)
    print(f"  loaded from cache in {time.perf_counter() - t0:.1f} s; arrays [k, j, i] {phantom.ct.shape}, "
          f"ct {phantom.ct.dtype}, labels {phantom.total.dtype}")
    truth_levels = [v for v in phantom.truth["vertebrae"] if v["level"] != "S1"]
    incomplete = [v["level"] for v in truth_levels if not v["complete"]]
    print(f"  truth: {len(truth_levels)} vertebrae, {len(truth_levels) - len(incomplete)} complete"
          + (f" (incomplete: {', '.join(incomplete)})" if incomplete else ""))

    variants = {
        "CT + body labels": dict(body_labels=phantom.vertebrae_body, ct=phantom.ct),
        "body labels, no CT": dict(body_labels=phantom.vertebrae_body),
        "labels only (mask)": dict(),
    }
    print(f"\nour measure_heights, best of {args.repeat}:")
    ours_times, ours_results = {}, {}
    for name, kwargs in variants.items():
        seconds, result = best_of(args.repeat, lambda: measure_heights(phantom.total, phantom.ijk_to_ras, **kwargs))
        ours_times[name], ours_results[name] = seconds, result
        n_complete = sum(h.complete for h in result)
        print(f"  {name:<22} {seconds:8.3f} s   ({len(result)} vertebrae, {n_complete} complete)")

    ts_total = ts_process = float("nan")
    ts_heights = {}
    if args.no_ts:
        print("\nTS spine report: skipped (--no-ts)")
    else:
        module, why = bc.load_ts_module()
        if module is None:
            print(f"\nTS spine report: not available ({why})")
        else:
            import contextlib
            import io

            images = bc.ts_images(phantom.ct, phantom.total, phantom.vertebrae_body, phantom.ijk_to_ras)
            gc.collect()
            buffer = io.StringIO()
            with contextlib.redirect_stdout(sys.stdout if args.verbose else buffer), bc.quiet_warnings(args.verbose):
                t0 = time.perf_counter()
                processor = module.VertebraeProcessor(*images, horizontal_mask_type="raw")
                t1 = time.perf_counter()
                info = processor.process_vertebrae()
                t2 = time.perf_counter()
            ts_total, ts_process = t2 - t0, t2 - t1
            print(f"\nTS VertebraeProcessor (horizontal_mask_type='raw', as the spine report), once:")
            print(f"  constructor (get_fdata, masks) {t1 - t0:8.2f} s")
            print(f"  process_vertebrae()            {ts_process:8.2f} s")
            print(f"  total                          {ts_total:8.2f} s   ({len(info)} vertebrae measured; "
                  f"peak RSS of this process {bc.peak_rss_mb() / 1024:.1f} GB)")
            for name, record in info.items():
                m = record.get("height_measurements") or {}
                values = [float((m.get(bc.TS_KEY_FOR[k]) or {}).get("height_mm", 0) or 0) for k in ("ha", "hm", "hp")]
                ts_heights[name.replace("vertebrae_", "")] = tuple(v if v > 0 else float("nan") for v in values)
            del processor, info, images
            gc.collect()

    ours_best = ours_times["CT + body labels"]
    print("\n=== Speed ===")
    print(f"  ours (CT + body labels, best of {args.repeat}): {ours_best:.3f} s   "
          f"[{'PASS' if ours_best < GOAL_SECONDS else 'FAIL'}] goal < {GOAL_SECONDS:g} s")
    print(f"  ours (labels only, best of {args.repeat}):      {ours_times['labels only (mask)']:.3f} s")
    if math.isfinite(ts_total):
        ratio = ts_total / ours_best
        print(f"  TS spine report (constructor + process_vertebrae): {ts_total:.2f} s; process_vertebrae alone "
              f"{ts_process:.2f} s")
        print(f"  ratio TS / ours: {ratio:.1f}x (process_vertebrae alone {ts_process / ours_best:.1f}x)   "
              f"[{'PASS' if ratio >= GOAL_RATIO else 'FAIL'}] goal ≥ {GOAL_RATIO:g}x")

    print("\n=== Accuracy on this exam (no partial volume: supersampling 1) ===")
    for name, result in ours_results.items():
        measured = {h.level: (h.ha_mm, h.hm_mm, h.hp_mm) for h in result if h.complete}
        print(accuracy_line(f"ours, {name}", phantom.truth, measured))
    if ts_heights:
        print(accuracy_line("TS spine report", phantom.truth, ts_heights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
