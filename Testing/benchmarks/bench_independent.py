#!/usr/bin/env python
"""Accuracy on independently rendered images (issue 30): heights, grades, trabecular HU and
their reported uncertainty, on spines drawn by ``Testing/benchmarks/independent`` — a renderer
that shares no code or assumption with the Lib's phantom or its endplate fit (scanner PSF and
slice profile, correlated CT-like noise, trabecular texture, 0.5–1.5 mm cortex, concave
endplates with irregular rims, Schmorl's nodes, osteophytes, degenerated discs with vacuum gas,
beam-hardening cupping, segmentation-like label maps).

Measured with the Lib's public API only: ``measure_heights``, ``grade_spine``,
``measure_trabecular``. Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_independent.py --jobs 2            # 36 spines
    .venv/bin/python Testing/benchmarks/bench_independent.py --limit 4 --jobs 2  # the first four
    .venv/bin/python Testing/benchmarks/bench_independent.py --only 1mm --ablate noise,texture

See Testing/benchmarks/README.md for the image model, the suite and what is printed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from independent import PROFILE_FRACTIONS, cache as ic, report  # noqa: E402
from independent.spec import ABLATIONS  # noqa: E402
from independent.suite import Case, build_suite  # noqa: E402
from VertebralFractureScreenLib.measure import morphometry  # noqa: E402
from VertebralFractureScreenLib.measure.attenuation import measure_trabecular  # noqa: E402
from VertebralFractureScreenLib.measure.grading import grade_spine  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import VertebraHeights, measure_heights  # noqa: E402

try:  # the ROI that measure_trabecular averages (public, but not one of the three entry points)
    from VertebralFractureScreenLib.measure.trabecular_roi import trabecular_roi_mask
except ImportError:  # pragma: no cover - a later Lib may move it
    trabecular_roi_mask = None

BENCH_CACHE = Path(os.environ.get("VFSCREEN_BENCH_CACHE", "~/.cache/vfscreen-bench")).expanduser()
DEFAULT_CACHE = BENCH_CACHE / "independent"
KEYS = report.KEYS


def _truth_heights(t: dict) -> VertebraHeights:
    """A truth record as the morphometry's record, for grading the true heights."""
    return VertebraHeights(t["level"], t["total_id"], t["complete"], t["ha_mm"], t["hm_mm"], t["hp_mm"],
                           depth_mm=t["depth_mm"], height_profile_mm=tuple(t["height_profile_mm"]),
                           hm_min_mm=t["hm_min_mm"], hm_min_fraction=t["hm_min_fraction"],
                           sagittal_area_mm2=t["sagittal_area_mm2"])


def _findings(t: dict) -> str:
    found = []
    if t["schmorl"]:
        found.append("schmorl")
    if t["osteophytes"]:
        found.append("osteophyte")
    if t["degenerated_disc_above"] or t["degenerated_disc_below"]:
        found.append("degenerated-disc")
    return "+".join(found)


def _row(case: Case, t: dict, h, g, roi, hu_truth: float, g_truth) -> dict:
    """One scored vertebra: truth, our measurement and the errors."""
    fracture = t["fracture"] or {}
    complete = bool(h is not None and h.complete)
    row = {"case": case.name, "group": case.group, "pair": case.pair, "upright": case.upright,
           "rotation": "/".join(f"{a:g}" for a in case.spec.rotation_deg), "noise_hu": case.spec.noise_hu,
           "kernel": case.spec.kernel, "level": t["level"], "findings": _findings(t),
           "fracture_shape": fracture.get("shape", ""), "fracture_fraction": fracture.get("fraction", 0.0),
           "truth_loss": t["height_loss"], "truth_grade": t["genant_grade"], "truth_borderline": t["borderline"],
           "truth_shape": t["shape"], "complete": complete,
           "flags": ";".join(h.flags) if h is not None else "missing",
           "method": getattr(h, "endplate_method", "") if h is not None else ""}
    for k in KEYS:
        value = float(getattr(h, f"{k}_mm")) if complete else float("nan")
        row.update({f"truth_{k}": t[f"{k}_mm"], f"band_{k}": t[f"band_{k}_mm"], k: value,
                    f"{k}_sd": float(getattr(h, f"{k}_sd_mm")) if complete else float("nan"),
                    f"err_{k}": value - t[f"{k}_mm"], f"err_band_{k}": value - t[f"band_{k}_mm"]})
    row.update({"grade": None if g is None else g.genant_grade, "quantitative_grade": None if g is None else
                g.quantitative_grade, "grade_shape": "" if g is None else g.shape,
                "grade_uncertain": bool(g is not None and "grade_uncertain" in g.flags),
                "grade_of_truth": None if g_truth is None else g_truth.genant_grade})
    row.update({"hu": roi.mean_hu if roi else float("nan"), "hu_truth": hu_truth,
                "hu_se": roi.mean_hu_se if roi else float("nan"), "roi_voxels": roi.voxels if roi else 0,
                "hu_usable": bool(roi is not None and roi.usable),
                "err_hu": roi.mean_hu - hu_truth if roi else float("nan"),
                "hu_flags": ";".join(roi.flags) if roi else "", "trabecular_hu_drawn": t["trabecular_hu"]})
    return row


def hu_truths(r: ic.Rendered, heights, rois) -> list[float]:
    """The drawn trabecular HU (texture, sclerosis and cupping in; noise and blur out) averaged
    over each ROI's voxels; NaN where the ROI left voxels out as a focal lesion (it then differs
    from the mask) or reaches beyond 3 mm from the body (where nothing was drawn)."""
    truth_image = np.where(np.isfinite(r.trabecular_truth_hu), r.trabecular_truth_hu, np.nan).astype(np.float32)
    if trabecular_roi_mask is None:
        other = measure_trabecular(np.nan_to_num(truth_image, nan=-1000.0), r.total, r.ijk_to_ras, heights,
                                   body_labels=r.body)
        return [b.mean_hu if b.voxels == a.voxels else float("nan") for a, b in zip(rois, other)]
    out = []
    for h, roi in zip(heights, rois):
        slices, mask, _ = trabecular_roi_mask(h, r.total, r.ijk_to_ras, body_labels=r.body)
        if mask is None or roi.voxels == 0 or int(mask.sum()) != roi.voxels:
            out.append(float("nan"))
            continue
        out.append(float(np.mean(truth_image[slices][mask], dtype=np.float64)))
    return out


def measure_case(case: Case, r: ic.Rendered) -> tuple[list[dict], float]:
    """Rows of the scored vertebrae of one rendered spine, and the seconds of the morphometry."""
    t0 = time.perf_counter()
    heights = measure_heights(r.total, r.ijk_to_ras, body_labels=r.body, ct=r.ct)
    seconds = time.perf_counter() - t0
    grades = grade_spine(heights)
    rois = measure_trabecular(r.ct, r.total, r.ijk_to_ras, heights, body_labels=r.body, grades=grades)
    scored = [t for t in r.truth if t["complete"]]
    graded_truth = {g.level: g for g in grade_spine([_truth_heights(t) for t in scored])}
    by = {h.level: (h, g, a, b) for h, g, a, b in zip(heights, grades, rois, hu_truths(r, heights, rois))}
    rows = []
    for t in scored:
        h, g, roi, hu_truth = by.get(t["level"], (None, None, None, float("nan")))
        rows.append(_row(case, t, h, g, roi, hu_truth, graded_truth.get(t["level"])))
    return rows, seconds


def _flt(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def phantom_figures(path: Path) -> dict:
    """Today's phantom suite (``bench_morphometry.py``'s per-vertebra CSV), as the goal lines'
    figures: median |error|, exact grade, normals graded ≥ 2, within 2 SDs, rotation."""
    if not path.exists():
        return {}
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for group in sorted({r["group"] for r in rows}) + ["all"]:
        sel = [r for r in rows if group == "all" or r["group"] == group]
        errs = [_flt(r[f"err_ours_{k}"]) for r in sel for k in KEYS]
        sds = [_flt(r[f"ours_{k}_sd"]) for r in sel for k in KEYS]
        nb = [r for r in sel if r["truth_borderline"] != "True"]
        exact = sum(r["grade"] != "" and int(float(r["grade"])) == int(r["truth_grade"]) for r in nb)
        normals = [r for r in sel if int(r["truth_grade"]) == 0]
        bad = sum(r["grade"] != "" and int(float(r["grade"])) >= 2 for r in normals)
        out[("median", group)] = f"{report.stats(errs)[0]:.3f} mm"
        out[("exact", group)] = f"{exact}/{len(nb)}"
        out[("normals", group)] = f"{bad}/{len(normals)}"
        out[("within", group)] = f"{report.within(errs, sds)[0]:.0%}"
        pairs = {}
        for r in sel:
            if r["pair"]:
                pairs.setdefault((r["pair"], r["level"]), {})[r["rotation_deg"] == "0/0/0"] = r
        diffs = [abs(_flt(p[True][f"ours_{k}"]) - _flt(p[False][f"ours_{k}"])) for p in pairs.values()
                 if len(p) == 2 for k in KEYS]
        if diffs:
            out[("rotation", group)] = f"max {np.nanmax(diffs):.2f} mm, median {np.nanmedian(diffs):.2f} mm"
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def select_cases(args) -> list[Case]:
    wanted = [w for w in args.only.split(",") if w] or [""]
    cases = [c for c in build_suite() if any(w in c.name for w in wanted)]
    if args.limit:
        cases = cases[:args.limit]
    if args.ablate:
        ablate = tuple(sorted(a for a in args.ablate.split(",") if a))
        unknown = sorted(set(ablate) - set(ABLATIONS))
        if unknown:
            raise SystemExit(f"unknown effect(s) to ablate: {', '.join(unknown)} (known: {', '.join(ABLATIONS)})")
        cases = [Case(f"{c.name}[-{','.join(ablate)}]", dataclasses.replace(c.spec, ablate=ablate), c.pair)
                 for c in cases]
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="processes rendering missing spines (default 1)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N cases")
    parser.add_argument("--only", default="",
                        help="only the cases whose name contains this text (or one of several, comma-separated)")
    parser.add_argument("--ablate", default="", help=f"switch effects off, comma-separated: {','.join(ABLATIONS)}")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"render cache (default {DEFAULT_CACHE})")
    parser.add_argument("--rerender", action="store_true", help="render again even when cached")
    parser.add_argument("--phantom-csv", type=Path, default=BENCH_CACHE / "morphometry_full.csv",
                        help="bench_morphometry.py's per-vertebra CSV, for today's suite beside the goals")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    cases = select_cases(args)
    if args.list or not cases:
        for c in cases:
            s = c.spec
            print(f"{c.name:<26} {c.group:<10} {s.levels[0]}-{s.levels[-1]} rot {s.rotation_deg} noise {s.noise_hu:g} "
                  f"{s.kernel:<8} fractures {[f'{f.level}:{f.shape}:{f.fraction}' for f in s.fractures]} "
                  f"nodes {len(s.schmorl)} spurs {len(s.osteophytes)} degenerated {list(s.degenerated_discs)}"
                  f"{' pair ' + c.pair if c.pair else ''}")
        return 0 if cases else 2
    if tuple(PROFILE_FRACTIONS) != tuple(float(f) for f in morphometry.PROFILE_FRACTIONS):
        print("warning: the truth's profile fractions differ from the morphometry's; grading the truth uses ours")
    cache = args.cache.expanduser()
    print(f"bench_independent: {len(cases)} spines, cache {cache}")
    t0 = time.perf_counter()
    fresh = ic.render_many({c.name: c.spec for c in cases}, cache, jobs=max(1, args.jobs), rerender=args.rerender)
    wall = time.perf_counter() - t0
    rows, render_s, measure_s = [], 0.0, []
    print(f"\n{'case':<30} {'group':<10} {'shape kji':<16} {'render s':>8} {'ours s':>7}  notes")
    for case in cases:
        rendered = ic.load(case.spec, cache)
        render_s += rendered.render_s
        case_rows, seconds = measure_case(case, rendered)
        measure_s.append(seconds)
        rows.extend(case_rows)
        missing = [r["level"] for r in case_rows if not r["complete"]]
        print(f"{case.name:<30} {case.group:<10} {str(tuple(rendered.ct.shape)):<16} {rendered.render_s:8.1f} "
              f"{seconds:7.2f}  {'not measured: ' + ','.join(missing) if missing else ''}")
    print(f"rendering: {render_s:.0f} s in all (one process each)"
          + (f"; this run rendered {len(fresh)} in {wall:.0f} s wall with {max(1, args.jobs)} process(es)"
             if fresh else "")
          + f"; morphometry {np.sum(measure_s):.1f} s, median {np.median(measure_s):.2f} s a spine")
    report.print_accuracy(rows)
    report.print_breakdown(rows)
    report.print_grades(rows)
    report.print_hu(rows)
    report.print_precision(rows)
    phantom = phantom_figures(args.phantom_csv)
    if phantom:
        print(f"\n(phantom suite figures from {args.phantom_csv}, written "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(args.phantom_csv.stat().st_mtime))})")
    report.check_goals(rows, phantom)
    suffix = (f"_{args.only}" if args.only else "") + (f"_limit{args.limit}" if args.limit else "") + \
        (f"_ablate-{args.ablate.replace(',', '-')}" if args.ablate else "")
    path = cache / f"independent{suffix}.csv"
    write_csv(rows, path)
    print(f"\nper-vertebra CSV: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
