#!/usr/bin/env python
"""Accuracy benchmark of vertebral morphometry (and grading) on synthetic phantoms.

Renders a suite of phantom spines (spacings 1 mm, 0.7x0.7x3 mm, 3 mm; rotations up to 20°;
lordosis / kyphosis / scoliosis; noise; wedge / biconcave / crush fractures of every grade),
measures every vertebra with ``VertebralFractureScreenLib.measure.morphometry.measure_heights`` and with
TotalSegmentator's spine-report height measurement on the same CT and masks, and compares both
with the phantoms' analytic truth. Grades are compared too when
``VertebralFractureScreenLib.measure.grading`` exists.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_morphometry.py --quick
    .venv/bin/python Testing/benchmarks/bench_morphometry.py --jobs 2

See Testing/benchmarks/README.md for what it prints and the goals.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import VertebraHeights, measure_heights  # noqa: E402
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec  # noqa: E402

GROUPS = {(1.0, 1.0, 1.0): "1 mm", (0.7, 0.7, 3.0): "0.7x0.7x3", (3.0, 3.0, 3.0): "3 mm"}
GROUP_ORDER = ("1 mm", "0.7x0.7x3", "3 mm")
HEIGHT_KEYS = ("ha", "hm", "hp")
GOALS = {"median_abs_1mm": 0.3, "median_abs_3mm": 0.6, "exact_grade": 0.97, "rotation_mm": 0.5}
THIN_GROUPS = ("1 mm",)
"""Spacing groups of voxels up to 1 mm, where the rotation goal is the maximum (issue 30)."""

# ------------------------------------------------------------------------------------------------
# The phantom suite
# ------------------------------------------------------------------------------------------------

ISO1, ANISO, ISO3 = (1.0, 1.0, 1.0), (0.7, 0.7, 3.0), (3.0, 3.0, 3.0)


@dataclass(frozen=True)
class Case:
    name: str
    spec: PhantomSpec
    quick: bool = False
    pair: str | None = None  # rotation pairs: same anatomy (same spec and seed), rotation 0° vs 20°

    @property
    def group(self) -> str:
        return GROUPS.get(tuple(float(s) for s in self.spec.spacing), "x".join(f"{s:g}" for s in self.spec.spacing))


OSTEOPOROTIC_HU = {level: 150.0 - 5.0 * n for n, level in enumerate(lv.parse_level_range("T4-L5"))}
"""Trabecular HU from 150 (T4) down to 85 (L5): osteoporotic lumbar bone (L1 105 HU, below the
opportunistic 110 HU threshold), as dense as the discs (90 HU) at L4, where only the cortical
plates show the endplates."""

OSTEO_FRACTURES = ("T7:wedge:0.35", "T12:crush:0.3", "L2:biconcave:0.35")


def _case(name, spacing, seed, *, levels="T10-S1", rot=(0, 0, 0), noise=20.0, fractures=(), quick=False,
          pair=None, **extra) -> Case:
    spec = PhantomSpec(
        levels=lv.parse_level_range(levels), spacing=tuple(float(s) for s in spacing), fov="spine",
        rotation_deg=tuple(float(a) for a in rot), noise_hu=float(noise),
        fractures=tuple(Fracture.parse(f) for f in fractures), seed=seed, **extra)
    return Case(name, spec, quick, pair)


def build_suite() -> list[Case]:
    """The full suite (the ``quick`` cases are a small, fast subset of it).

    Fractions → true Genant grade: 0.22 → 1, 0.30 / 0.35 → 2, 0.45 / 0.55 → 3. Fractured levels
    are never adjacent (the crush reference height comes from the neighbours)."""
    c = _case
    return [
        # ---- quick subset: short spines, every spacing group, a wedge (TS mapping check), a rotation pair
        c("q-1mm-L1S1-wedge", ISO1, 11, levels="L1-S1", noise=20, fractures=["L3:wedge:0.35"], quick=True),
        c("q-aniso-L1S1-crush", ANISO, 12, levels="L1-S1", rot=(10, 0, 15), noise=10,
          fractures=["L2:crush:0.45", "L4:biconcave:0.3"], quick=True),
        c("q-3mm-T12S1-r0", ISO3, 13, levels="T12-S1", noise=30, fractures=["L1:wedge:0.45", "L3:biconcave:0.22"],
          quick=True, pair="q3"),
        c("q-3mm-T12S1-r20", ISO3, 13, levels="T12-S1", rot=(20, 0, 0), noise=30,
          fractures=["L1:wedge:0.45", "L3:biconcave:0.22"], quick=True, pair="q3"),
        # ---- 1 mm
        c("1mm-normal-r0", ISO1, 101, noise=20, pair="p1"),
        c("1mm-normal-r20", ISO1, 101, rot=(20, 0, 0), noise=20, pair="p1"),
        c("1mm-frac-r0", ISO1, 102, noise=10, fractures=["T12:wedge:0.3", "L2:biconcave:0.45", "L4:crush:0.35"],
          pair="p2"),
        c("1mm-frac-axial20", ISO1, 102, rot=(0, 0, 20), noise=10,
          fractures=["T12:wedge:0.3", "L2:biconcave:0.45", "L4:crush:0.35"], pair="p2"),
        c("1mm-rot-10-0-15", ISO1, 103, rot=(10, 0, 15), noise=30, fractures=["L1:wedge:0.55", "L3:crush:0.22"]),
        c("1mm-rot-m15-8-m20", ISO1, 104, rot=(-15, 8, -20), noise=20,
          fractures=["T11:biconcave:0.35", "L2:wedge:0.22", "L4:crush:0.55"]),
        c("1mm-lordosis55", ISO1, 105, rot=(0, -12, 18), noise=20, lordosis_deg=55.0,
          fractures=["L3:wedge:0.45", "L5:biconcave:0.3"]),
        c("1mm-kyphosis45", ISO1, 106, noise=30, kyphosis_deg=45.0,
          fractures=["T11:wedge:0.35", "L1:crush:0.3", "L3:biconcave:0.55"]),
        c("1mm-scoliosis15", ISO1, 107, rot=(0, -12, 18), noise=10, scoliosis_deg=15.0,
          fractures=["T12:crush:0.45", "L2:wedge:0.3"]),
        c("1mm-T4L5", ISO1, 108, levels="T4-L5", noise=20,
          fractures=["T6:wedge:0.35", "T8:biconcave:0.22", "T10:crush:0.3", "L1:wedge:0.45"]),
        # ---- 0.7 x 0.7 x 3 mm
        c("aniso-normal-r0", ANISO, 201, noise=20, pair="p3"),
        c("aniso-normal-r20", ANISO, 201, rot=(20, 0, 0), noise=20, pair="p3"),
        c("aniso-frac", ANISO, 202, noise=10, fractures=["T11:wedge:0.22", "L1:biconcave:0.35", "L3:crush:0.55"]),
        c("aniso-rot-m15-8-m20", ANISO, 203, rot=(-15, 8, -20), noise=30,
          fractures=["T12:biconcave:0.55", "L2:crush:0.3", "L4:wedge:0.45"]),
        c("aniso-rot-0-m12-18", ANISO, 204, rot=(0, -12, 18), noise=20,
          fractures=["L1:wedge:0.3", "L3:biconcave:0.45"]),
        c("aniso-lordosis55", ANISO, 205, noise=20, lordosis_deg=55.0,
          fractures=["T12:crush:0.22", "L4:wedge:0.35"]),
        c("aniso-kyphosis45", ANISO, 206, rot=(10, 0, 15), noise=10, kyphosis_deg=45.0,
          fractures=["T11:crush:0.45", "L2:biconcave:0.22"]),
        c("aniso-scoliosis15", ANISO, 207, noise=30, scoliosis_deg=15.0,
          fractures=["L1:crush:0.35", "L3:wedge:0.55"]),
        # ---- 3 mm
        c("3mm-normal-r0", ISO3, 301, noise=20, pair="p4"),
        c("3mm-normal-r20", ISO3, 301, rot=(20, 0, 0), noise=20, pair="p4"),
        c("3mm-frac", ISO3, 302, noise=10, fractures=["T12:biconcave:0.3", "L2:wedge:0.35", "L4:crush:0.45"]),
        c("3mm-rot-10-0-15", ISO3, 303, rot=(10, 0, 15), noise=20,
          fractures=["T11:crush:0.55", "L1:biconcave:0.22", "L3:wedge:0.3"]),
        c("3mm-rot-m15-8-m20", ISO3, 304, rot=(-15, 8, -20), noise=30,
          fractures=["T12:wedge:0.22", "L3:crush:0.3"]),
        c("3mm-lordosis55", ISO3, 305, rot=(0, -12, 18), noise=20, lordosis_deg=55.0,
          fractures=["L2:crush:0.35", "L4:biconcave:0.55"]),
        c("3mm-kyphosis45", ISO3, 306, noise=20, kyphosis_deg=45.0, fractures=["T11:biconcave:0.45", "L1:wedge:0.55"]),
        c("3mm-scoliosis15", ISO3, 307, rot=(10, 0, 15), noise=30, scoliosis_deg=15.0,
          fractures=["T12:wedge:0.45", "L3:biconcave:0.35"]),
        c("3mm-T4L5", ISO3, 308, levels="T4-L5", noise=20,
          fractures=["T5:crush:0.3", "T7:wedge:0.22", "T9:biconcave:0.45", "L2:wedge:0.3"]),
        # ---- osteoporotic bone (trabecular HU falling to the discs' 90 HU at L4), thin thoracic discs
        c("osteo-aniso-r0", ANISO, 401, levels="T4-L5", noise=20, fractures=OSTEO_FRACTURES,
          trabecular_hu=OSTEOPOROTIC_HU, pair="p5"),
        c("osteo-aniso-r20", ANISO, 401, levels="T4-L5", rot=(20, 0, 0), noise=20, fractures=OSTEO_FRACTURES,
          trabecular_hu=OSTEOPOROTIC_HU, pair="p5"),
        c("osteo-3mm-r0", ISO3, 402, levels="T4-L5", noise=20, fractures=OSTEO_FRACTURES,
          trabecular_hu=OSTEOPOROTIC_HU, pair="p6"),
        c("osteo-3mm-r20", ISO3, 402, levels="T4-L5", rot=(20, 0, 0), noise=20, fractures=OSTEO_FRACTURES,
          trabecular_hu=OSTEOPOROTIC_HU, pair="p6"),
    ]


# ------------------------------------------------------------------------------------------------
# Grading (optional: a colleague's module)
# ------------------------------------------------------------------------------------------------


def load_grading():
    try:
        module = importlib.import_module("VertebralFractureScreenLib.measure.grading")
    except ModuleNotFoundError as error:
        if error.name and error.name.endswith("grading"):
            return None, "module VertebralFractureScreenLib.measure.grading does not exist"
        return None, f"ModuleNotFoundError: {error}"
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    if not hasattr(module, "grade_spine"):
        return None, "VertebralFractureScreenLib.measure.grading has no grade_spine()"
    return module, ""


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def _fmt(value, digits=2, width=6):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—".rjust(width)
    return f"{value:{width}.{digits}f}"


def _abs_stats(errors: list[float]):
    values = np.abs(np.asarray([e for e in errors if math.isfinite(e)], dtype=float))
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    return float(np.median(values)), float(np.percentile(values, 90)), float(values.max())


def _median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _truth_heights(row: dict) -> VertebraHeights:
    """A row of the phantom's ``truth["vertebrae"]`` as the morphometry's record, for grading: its
    heights, height profile, middle minimum and sagittal area (no SDs, depth or endplate depression)."""
    return VertebraHeights(row["level"], row["total_id"], row["complete"], row["ha_mm"], row["hm_mm"], row["hp_mm"],
                           height_profile_mm=tuple(row["height_profile_mm"]), hm_min_mm=row["hm_min_mm"],
                           hm_min_fraction=row["hm_min_fraction"], sagittal_area_mm2=row["sagittal_area_mm2"])


def measure_case(case: Case, phantom: bc.CachedPhantom, grading, ts_module, args) -> tuple[list[dict], dict]:
    """Rows (one per truth-complete vertebra, S1 excluded) and per-case timings."""
    t0 = time.perf_counter()
    ours = measure_heights(phantom.total, phantom.ijk_to_ras, body_labels=phantom.vertebrae_body, ct=phantom.ct)
    ours_s = time.perf_counter() - t0
    ours_by_level = {h.level: h for h in ours}

    grades_by_level, truth_grades_by_level, grading_error = {}, {}, ""
    if grading is not None:
        try:
            grades_by_level = {g.level: g for g in grading.grade_spine(ours)}
            # The phantom's true heights graded the same way isolate grading errors from
            # measurement errors.
            truth_heights = [_truth_heights(row) for row in phantom.truth["vertebrae"]]
            truth_grades_by_level = {g.level: g for g in grading.grade_spine(truth_heights)}
        except Exception as error:  # report, never stop the benchmark
            grading_error = f"{type(error).__name__}: {error}"

    ts_by_level, ts_s, ts_error = {}, float("nan"), ""
    if ts_module is not None:
        try:
            ts_by_level, ts_s, _ = bc.run_ts(ts_module, phantom.ct, phantom.total, phantom.vertebrae_body,
                                             phantom.ijk_to_ras, verbose=args.verbose)
        except Exception as error:
            ts_error = f"{type(error).__name__}: {error}"

    rows = []
    for truth in phantom.truth["vertebrae"]:
        level = truth["level"]
        if level == "S1" or not truth["complete"]:
            continue
        fracture = truth.get("fracture") or {}
        row = {
            "case": case.name, "group": case.group, "pair": case.pair or "",
            "rotation_deg": "/".join(f"{a:g}" for a in case.spec.rotation_deg),
            "noise_hu": case.spec.noise_hu, "level": level,
            "truth_ha": truth["ha_mm"], "truth_hm": truth["hm_mm"], "truth_hp": truth["hp_mm"],
            "truth_fracture_shape": fracture.get("shape", "none"), "truth_fraction": fracture.get("fraction", 0.0),
            "truth_grade": truth["genant_grade"], "truth_shape": truth["shape"], "truth_borderline": truth["borderline"],
        }
        h = ours_by_level.get(level)
        row["ours_present"] = h is not None
        row["ours_complete"] = bool(h is not None and h.complete)
        row["ours_flags"] = ";".join(h.flags) if h is not None else "missing"
        row["ours_method"] = getattr(h, "endplate_method", "") if h is not None else ""
        for key in HEIGHT_KEYS:
            value = float(getattr(h, f"{key}_mm")) if row["ours_complete"] else float("nan")
            row[f"ours_{key}"] = value
            row[f"err_ours_{key}"] = value - truth[f"{key}_mm"] if math.isfinite(value) else float("nan")
            row[f"ours_{key}_sd"] = float(getattr(h, f"{key}_sd_mm")) if row["ours_complete"] else float("nan")
        g = grades_by_level.get(level)
        row["grade"] = None if g is None else getattr(g, "genant_grade", None)
        row["grade_shape"] = "" if g is None else str(getattr(g, "shape", ""))
        row["grade_borderline"] = "" if g is None else getattr(g, "borderline", "")
        row["grade_uncertain"] = g is not None and "grade_uncertain" in getattr(g, "flags", [])
        row["height_loss_sd"] = float("nan") if g is None else float(getattr(g, "height_loss_sd", float("nan")))
        tg = truth_grades_by_level.get(level)
        row["grade_of_true_heights"] = None if tg is None else getattr(tg, "genant_grade", None)
        ts = ts_by_level.get(level)
        row["ts_present"] = ts is not None
        for key in bc.TS_KEYS:
            row[f"ts_{key[:-1]}"] = float("nan") if ts is None else ts[key]
        for key in HEIGHT_KEYS:
            value = row[f"ts_{bc.TS_KEY_FOR[key][:-1]}"]
            row[f"ts_{key}"] = value
            row[f"err_ts_{key}"] = value - truth[f"{key}_mm"] if math.isfinite(value) else float("nan")
        row["ts_flag"] = bc.ts_fracture_flag(ts) if ts is not None else ""
        rows.append(row)
    info = {"ours_s": ours_s, "ts_s": ts_s, "grading_error": grading_error, "ts_error": ts_error,
            "n_ours": len(ours)}
    return rows, info


def ts_mapping_check(rows: list[dict]) -> str:
    """On the wedge fractures (Ha drops, Hp kept), which TS height matches the true Ha best?"""
    wedges = [r for r in rows if r["truth_fracture_shape"] == "wedge" and r["ts_present"]]
    if not wedges:
        return "TS mapping check: no wedge fracture measured by TS in this run"
    parts, best = [], None
    for key in bc.TS_KEYS:
        err_a = _median([abs(r[f"ts_{key[:-1]}"] - r["truth_ha"]) for r in wedges])
        err_p = _median([abs(r[f"ts_{key[:-1]}"] - r["truth_hp"]) for r in wedges])
        parts.append(f"{key}: med|·−Ha| {err_a:.2f} mm, med|·−Hp| {err_p:.2f} mm")
        if best is None or err_a < best[1]:
            best = (key, err_a)
    verdict = "agrees with" if best[0] == bc.TS_KEY_FOR["ha"] else "DISAGREES with"
    return (f"TS mapping check on {len(wedges)} wedge fracture(s): " + "; ".join(parts)
            + f"\n  → TS '{best[0]}' is our Ha (empirical), which {verdict} the mapping used "
              f"(Ha='{bc.TS_KEY_FOR['ha']}', Hm='{bc.TS_KEY_FOR['hm']}', Hp='{bc.TS_KEY_FOR['hp']}').")


def rotation_pairs(rows: list[dict]) -> list[tuple[str, dict, dict]]:
    """``(pair, upright row, rotated row)`` for each vertebra measured in both renderings of a
    rotation pair."""
    by_pair = defaultdict(dict)
    for r in rows:
        if r["pair"]:
            by_pair[(r["pair"], r["level"])]["r0" if r["rotation_deg"] == "0/0/0" else "rot"] = r
    return [(pair, roles["r0"], roles["rot"]) for (pair, _), roles in by_pair.items()
            if "r0" in roles and "rot" in roles]


def rotation_stats(rows: list[dict], prefix: str) -> dict[str, tuple[float, float, int]]:
    """Per group: (max, median, n) over vertebrae of max over Ha/Hm/Hp of |h(0°) − h(rotated)|."""
    out = {}
    per_group = defaultdict(list)
    for _, a, b in rotation_pairs(rows):
        diffs = [abs(a[f"{prefix}_{k}"] - b[f"{prefix}_{k}"]) for k in HEIGHT_KEYS]
        per_group[a["group"]].append(max(diffs) if all(math.isfinite(d) for d in diffs) else float("nan"))
    for group, values in per_group.items():
        finite = [v for v in values if math.isfinite(v)]
        out[group] = (max(finite) if finite else float("nan"), _median(finite), len(finite), len(values) - len(finite))
    return out


def rotation_noise_floor(rows: list[dict], draws: int = 10_000, seed: int = 0) -> dict[str, dict]:
    """Per rotation pair: its observed largest |height difference| and what the CT's noise alone
    would give. Each height difference is drawn as Gaussian with the two renderings' combined
    reported SD (``ha_sd_mm`` …, the least-squares covariance: how far the noise moves the model's
    optimum); over ``draws`` simulated pairs of renderings the pair's largest |difference| has this
    median and 5–95 % range, and stays within the goal with probability ``p_within``. A method
    without any systematic error would meet the goal no more often than that. Heights without an
    SD (from the mask) are left out and counted."""
    pairs: dict[str, dict] = {}
    for pair, a, b in rotation_pairs(rows):
        entry = pairs.setdefault(pair, {"group": a["group"], "case": a["case"], "sds": [], "observed": 0.0,
                                        "without_sd": 0})
        if not (a["ours_complete"] and b["ours_complete"]):
            continue
        for key in HEIGHT_KEYS:
            entry["observed"] = max(entry["observed"], abs(a[f"ours_{key}"] - b[f"ours_{key}"]))
            sd = math.hypot(a[f"ours_{key}_sd"], b[f"ours_{key}_sd"])
            if math.isfinite(sd):
                entry["sds"].append(sd)
            else:
                entry["without_sd"] += 1
    rng = np.random.default_rng(seed)
    for entry in pairs.values():
        sds = entry.pop("sds")
        entry["heights"] = len(sds)
        entry.update(bc.largest_gaussian_error(sds, GOALS["rotation_mm"], draws, rng))
    return pairs


def print_precision(rows: list[dict], groups: list[str]) -> None:
    """How the standard deviations we report with each height (``ha_sd_mm`` …, from the CT's noise)
    compare with the errors: their median, the share of heights within two of them of the truth,
    the vertebrae flagged ``imprecise_heights``, and the rotation pairs' differences in units of
    the two renderings' combined SD."""
    print("\n=== Reported precision: SD per height (noise only), |error| <= 2 SD, flagged imprecise, "
          "rotation difference / combined SD ===")
    pairs = rotation_pairs(rows)
    for group in groups:
        sel = [r for r in rows if r["group"] == group and r["ours_complete"]]
        sds, within = [], []
        for r in sel:
            for key in HEIGHT_KEYS:
                sd, err = r[f"ours_{key}_sd"], r[f"err_ours_{key}"]
                if math.isfinite(sd) and math.isfinite(err):
                    sds.append(sd)
                    within.append(abs(err) <= 2.0 * sd)
        flagged = sum("imprecise_heights" in r["ours_flags"].split(";") for r in sel)
        z = []
        for _, a, b in pairs:
            if a["group"] == group:
                for key in HEIGHT_KEYS:
                    combined = math.hypot(a[f"ours_{key}_sd"], b[f"ours_{key}_sd"])
                    if math.isfinite(combined) and combined > 0:
                        z.append(abs(a[f"ours_{key}"] - b[f"ours_{key}"]) / combined)
        z_text = f"max {max(z):.1f}, median {_median(z):.1f} over {len(z)} heights" if z else "—"
        print(f"{group:<10} SD median {_median(sds):.2f} mm, p90 {np.percentile(sds, 90) if sds else float('nan'):.2f} mm"
              f" | |error| <= 2 SD: {np.mean(within) if within else float('nan'):.0%}"
              f" | imprecise_heights: {flagged}/{len(sel)} vertebrae | rotation |ΔH| / SD: {z_text}")
        graded = [r for r in sel if r.get("grade") is not None]
        wrong = [r for r in graded if int(r["grade"]) != int(r["truth_grade"])]
        uncertain = [r for r in graded if r.get("grade_uncertain")]
        print(f"{'':<10} grade_uncertain: {len(uncertain)}/{len(graded)} graded vertebrae "
              f"({', '.join(sorted({r['case'] + ' ' + r['level'] for r in uncertain})) or 'none'}); graded unlike "
              f"the truth: {len(wrong)}, of them flagged {sum(r['grade_uncertain'] for r in wrong)}"
              f" or borderline {sum(bool(r['grade_borderline']) for r in wrong)}")


def print_tables(rows: list[dict], have_grading: bool, have_ts: bool):
    groups = [g for g in GROUP_ORDER if any(r["group"] == g for r in rows)]
    groups += sorted({r["group"] for r in rows} - set(groups))
    rot_ours, rot_ts = rotation_stats(rows, "ours"), rotation_stats(rows, "ts")

    print("\n=== Height accuracy (|measured − truth| over Ha, Hm, Hp of truth-complete vertebrae, S1 excluded; mm) ===")
    header = (f"{'group':<10} {'n vert':>6} | {'ours med':>8} {'p90':>6} {'max':>6} {'miss':>4} | "
              f"{'TS med':>7} {'p90':>6} {'max':>6} {'miss':>4} | {'exact grade':>11} {'g≥2 normal':>10} | "
              f"{'rot ours max':>12} {'rot TS max':>10}")
    print(header)
    print("-" * len(header))
    for group in groups + ["all"]:
        sel = [r for r in rows if group == "all" or r["group"] == group]
        ours_err = [r[f"err_ours_{k}"] for r in sel for k in HEIGHT_KEYS]
        ts_err = [r[f"err_ts_{k}"] for r in sel for k in HEIGHT_KEYS]
        o_med, o_p90, o_max = _abs_stats(ours_err)
        t_med, t_p90, t_max = _abs_stats(ts_err)
        o_miss = sum(not r["ours_complete"] for r in sel)
        t_miss = sum(not (r["ts_present"] and all(math.isfinite(r[f"ts_{k}"]) for k in HEIGHT_KEYS)) for r in sel)
        if have_grading:
            nb = [r for r in sel if not r["truth_borderline"]]
            exact = sum(r["grade"] is not None and int(r["grade"]) == int(r["truth_grade"]) for r in nb)
            grade_txt = f"{exact}/{len(nb)} {100.0 * exact / len(nb):5.1f}%" if nb else "—"
            fp = sum(r["truth_grade"] == 0 and r["grade"] is not None and int(r["grade"]) >= 2 for r in sel)
            fp_txt = f"{fp}/{sum(r['truth_grade'] == 0 for r in sel)}"
        else:
            grade_txt, fp_txt = "n/a", "n/a"
        if group == "all":
            vals_o = [v for v in rot_ours.values()]
            vals_t = [v for v in rot_ts.values()]
            ro = max((v[0] for v in vals_o if math.isfinite(v[0])), default=float("nan"))
            rt = max((v[0] for v in vals_t if math.isfinite(v[0])), default=float("nan"))
        else:
            ro = rot_ours.get(group, (float("nan"),))[0]
            rt = rot_ts.get(group, (float("nan"),))[0]
        print(f"{group:<10} {len(sel):>6} | {_fmt(o_med, width=8)} {_fmt(o_p90)} {_fmt(o_max)} {o_miss:>4} | "
              f"{_fmt(t_med if have_ts else None, width=7)} {_fmt(t_p90 if have_ts else None)} "
              f"{_fmt(t_max if have_ts else None)} {t_miss if have_ts else '—':>4} | {grade_txt:>11} {fp_txt:>10} | "
              f"{_fmt(ro, width=12)} {_fmt(rt if have_ts else None, width=10)}")
    print("  miss: truth-complete vertebra not measured (ours: absent or complete=False; TS: absent or a height 0).")
    print("  exact grade: our Genant grade == true grade on non-borderline vertebrae; "
          "g≥2 normal: grade ≥ 2 on a truth-normal vertebra / normals.")
    print("  rot: max over vertebrae of max(|ΔHa|,|ΔHm|,|ΔHp|) between the 0° and the rotated rendering "
          "of the same spine.")

    print("\n=== Signed bias (median of measured − truth, mm) by spacing group and height ===")
    print(f"{'group':<10} | {'ours Ha':>7} {'ours Hm':>7} {'ours Hp':>7} | {'TS Ha':>7} {'TS Hm':>7} {'TS Hp':>7}")
    for group in groups:
        sel = [r for r in rows if r["group"] == group]
        o = [_median([r[f"err_ours_{k}"] for r in sel]) for k in HEIGHT_KEYS]
        t = [_median([r[f"err_ts_{k}"] for r in sel]) for k in HEIGHT_KEYS]
        print(f"{group:<10} | " + " ".join(_fmt(v, width=7) for v in o) + " | "
              + " ".join(_fmt(v if have_ts else None, width=7) for v in t))

    print("\n=== Ours by true fracture shape (all groups): n, signed median Ha/Hm/Hp, median |err| (mm) ===")
    for shape in ("none", "wedge", "biconcave", "crush"):
        sel = [r for r in rows if r["truth_fracture_shape"] == shape]
        if not sel:
            continue
        o = [_median([r[f"err_ours_{k}"] for r in sel]) for k in HEIGHT_KEYS]
        med = _abs_stats([r[f"err_ours_{k}"] for r in sel for k in HEIGHT_KEYS])[0]
        print(f"{shape:<10} n={len(sel):>3} | Ha {_fmt(o[0])} Hm {_fmt(o[1])} Hp {_fmt(o[2])} | med|err| {_fmt(med)}")

    print("\n=== Ours by level (all groups): n, signed median Ha/Hm/Hp (mm) ===")
    levels_present = sorted({r["level"] for r in rows}, key=lv.level_position)
    for level in levels_present:
        sel = [r for r in rows if r["level"] == level]
        o = [_median([r[f"err_ours_{k}"] for r in sel]) for k in HEIGHT_KEYS]
        print(f"{level:<4} n={len(sel):>3} | Ha {_fmt(o[0])} Hm {_fmt(o[1])} Hp {_fmt(o[2])}")

    if have_grading:
        print("\n=== Grade confusion (rows: true grade, columns: our grade; all truth-complete vertebrae) ===")
        cols = [0, 1, 2, 3, None]
        print("true\\ours " + " ".join(f"{('none' if c is None else c)!s:>5}" for c in cols) + "   borderline")
        for t in range(4):
            sel = [r for r in rows if r["truth_grade"] == t]
            counts = [sum((r["grade"] is None) if c is None else (r["grade"] is not None and int(r["grade"]) == c)
                          for r in sel) for c in cols]
            print(f"{t:>9} " + " ".join(f"{n:>5}" for n in counts) + f"   {sum(bool(r['truth_borderline']) for r in sel):>5}")
        nb = [r for r in rows if not r["truth_borderline"]]
        exact_t = sum(r["grade_of_true_heights"] is not None and int(r["grade_of_true_heights"]) == int(r["truth_grade"])
                      for r in nb)
        print(f"  grading the phantom's TRUE heights (isolates grading from measurement): exact {exact_t}/{len(nb)} "
              f"on non-borderline vertebrae")
        wrong = [r for r in rows if not r["truth_borderline"]
                 and (r["grade"] is None or int(r["grade"]) != int(r["truth_grade"]))]
        if wrong:
            print("  non-borderline mismatches (case level: true grade/shape → ours grade/shape [grade of the true "
                  "heights], ours Ha/Hm/Hp vs truth):")
            for r in wrong[:40]:
                print(f"    {r['case']:<24} {r['level']:<4} {r['truth_grade']}/{r['truth_shape']:<9} → "
                      f"{r['grade']}/{r['grade_shape']:<9} [{r['grade_of_true_heights']}] "
                      f"ours {_fmt(r['ours_ha'])} {_fmt(r['ours_hm'])} "
                      f"{_fmt(r['ours_hp'])} truth {_fmt(r['truth_ha'])} {_fmt(r['truth_hm'])} {_fmt(r['truth_hp'])}")
            if len(wrong) > 40:
                print(f"    ... {len(wrong) - 40} more in the CSV")

    if have_ts:
        normals = [r for r in rows if r["truth_grade"] == 0 and r["ts_present"]]
        flagged = [r for r in normals if r["ts_flag"] is True]
        print(f"\nTS's own fracture flag (min/max height < 0.8) on truth-normal vertebrae: {len(flagged)}/{len(normals)}"
              + (f" ({', '.join(sorted({r['level'] for r in flagged}, key=lv.level_position))})" if flagged else ""))

    for name, stats in (("ours", rot_ours), ("TS", rot_ts)):
        if stats and (name == "ours" or have_ts):
            print(f"Rotation invariance {name}: " + "; ".join(
                f"{g}: max {_fmt(v[0], width=4)} / median {_fmt(v[1], width=4)} mm over {v[2]} vertebrae"
                + (f" ({v[3]} unmeasured)" if v[3] else "") for g, v in stats.items()))


def check_goals(rows: list[dict], have_grading: bool):
    print("\n=== Goals ===")
    def line(ok, text):
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    for group, goal in (("1 mm", GOALS["median_abs_1mm"]), ("3 mm", GOALS["median_abs_3mm"])):
        sel = [r for r in rows if r["group"] == group]
        if sel:
            med = _abs_stats([r[f"err_ours_{k}"] for r in sel for k in HEIGHT_KEYS])[0]
            line(math.isfinite(med) and med <= goal, f"median |height error| at {group}: {med:.3f} mm (goal ≤ {goal} mm)")
    if have_grading:
        nb = [r for r in rows if not r["truth_borderline"]]
        exact = sum(r["grade"] is not None and int(r["grade"]) == int(r["truth_grade"]) for r in nb)
        rate = exact / len(nb) if nb else float("nan")
        line(rate >= GOALS["exact_grade"], f"exact Genant grade on non-borderline vertebrae: {100 * rate:.1f}% (goal ≥ 97%)")
        fp = sum(r["truth_grade"] == 0 and r["grade"] is not None and int(r["grade"]) >= 2 for r in rows)
        line(fp == 0, f"grade ≥ 2 on a normal vertebra: {fp} (goal 0)")
    else:
        print("  [skip] grading goals: grading not available")
    rot = rotation_stats(rows, "ours")
    floors = rotation_noise_floor(rows)
    # Issue 30 restated the rotation goal: max |difference| <= 0.5 mm at <= 1 mm voxels; at thick slices each
    # pair's largest difference within the 95th percentile its reported SDs give, and the median <= 0.5 mm.
    for group in [g for g in GROUP_ORDER if g in rot] + sorted(set(rot) - set(GROUP_ORDER)):
        worst, median, n, unmeasured = rot[group]
        mine = {pair: f for pair, f in sorted(floors.items()) if f["group"] == group}
        if group in THIN_GROUPS:
            line(math.isfinite(worst) and worst <= GOALS["rotation_mm"] and not unmeasured,
                 f"rotation 0° vs 20° at {group}: max |height difference| {worst:.3f} mm, median {median:.3f} mm "
                 f"over {n} vertebrae{f' ({unmeasured} unmeasured)' if unmeasured else ''} (goal ≤ 0.5 mm)")
        else:
            within = all(f["observed"] <= f["p95"] for f in mine.values())
            line(within and math.isfinite(median) and median <= GOALS["rotation_mm"] and not unmeasured,
                 f"rotation 0° vs 20° at {group}: each pair's max within the 95th percentile its SDs give ("
                 + ", ".join(f"{f['observed']:.2f} vs {f['p95']:.2f} mm" for f in mine.values())
                 + f"); median {median:.3f} mm over {n} vertebrae (goal ≤ 0.5 mm)"
                 + (f"; {unmeasured} unmeasured" if unmeasured else ""))
        for pair, floor in mine.items():
            without = f", {floor['without_sd']} without SD" if floor["without_sd"] else ""
            print(f"         {pair} {floor['case'].removesuffix('-r0'):<16} max {floor['observed']:.2f} mm; noise alone "
                  f"(reported SDs, {floor['heights']} heights{without}): {floor['median']:.2f} mm "
                  f"({floor['p5']:.2f}–{floor['p95']:.2f}), within 0.5 mm in {floor['p_within']:.0%} of draws")


def write_csv(rows: list[dict], path: Path):
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subset of short spines (a few minutes)")
    bc.add_common_arguments(parser)  # the CSV dump goes into --cache too
    parser.add_argument("--jobs", type=int, default=1, help="processes for rendering missing phantoms (default 1)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--noise-draws", type=int, default=0, metavar="N",
                        help="also measure each rotation pair rendered without noise, and with N draws of its "
                             "noise added (renders the noise-free pairs once, several minutes)")
    args = parser.parse_args(argv)

    cases = [c for c in build_suite() if (c.quick or not args.quick) and args.only in c.name]
    if args.list:
        for c in cases:
            s = c.spec
            print(f"{c.name:<26} {c.group:<10} levels {s.levels[0]}-{s.levels[-1]} rot {s.rotation_deg} "
                  f"noise {s.noise_hu:g} lord {s.lordosis_deg:g} kyph {s.kyphosis_deg:g} scol {s.scoliosis_deg:g} "
                  f"seed {s.seed} fractures {[f'{f.level}:{f.shape}:{f.fraction}' for f in s.fractures]}"
                  f"{' pair ' + c.pair if c.pair else ''}{' [quick]' if c.quick else ''}")
        return 0
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    cache = args.cache.expanduser()
    print(f"bench_morphometry ({mode}): {len(cases)} phantom spines, cache {cache}")

    # 1. Render (or load) the suite.
    t0 = time.perf_counter()
    fresh = bc.render_many({c.name: c.spec for c in cases}, cache, jobs=max(1, args.jobs), rerender=args.rerender)
    wall = time.perf_counter() - t0
    if fresh:
        print(f"  rendered {len(fresh)} phantom(s): {sum(fresh.values()):.0f} s of rendering in {wall:.0f} s wall "
              f"({max(1, args.jobs)} process(es))")

    # 2. Measure.
    grading, why = load_grading()
    print("grading: " + ("VertebralFractureScreenLib.measure.grading.grade_spine" if grading else f"grading not available ({why})"))
    ts_module, why = (None, "skipped (--no-ts)") if args.no_ts else bc.load_ts_module()
    print("TS spine report: " + (f"{ts_module.__file__}" if ts_module else f"not available ({why})"))

    rows, total_render = [], 0.0
    print(f"\n{'case':<26} {'group':<10} {'shape kji':<16} {'render s':>8} {'ours s':>7} {'TS s':>7}  notes")
    for case in cases:
        phantom = bc.load_cached(case.spec, cache)
        total_render += phantom.render_s
        case_rows, info = measure_case(case, phantom, grading, ts_module, args)
        rows.extend(case_rows)
        notes = []
        if info["grading_error"]:
            notes.append(f"grading failed: {info['grading_error']}")
        if info["ts_error"]:
            notes.append(f"TS failed: {info['ts_error']}")
        incomplete = [r["level"] for r in case_rows if not r["ours_complete"]]
        if incomplete:
            notes.append(f"ours incomplete: {','.join(incomplete)}")
        print(f"{case.name:<26} {case.group:<10} {str(tuple(phantom.ct.shape)):<16} {phantom.render_s:>8.1f} "
              f"{info['ours_s']:>7.2f} {_fmt(info['ts_s'], width=7)}  {' | '.join(notes)}")
    print(f"total render time of these phantoms (as rendered, one process): {total_render:.0f} s "
          f"= {total_render / 60:.1f} min; ≈ {total_render / 120:.1f} min on 2 cores")

    have_grading = grading is not None and any(r["grade"] is not None for r in rows)
    have_ts = ts_module is not None and any(r["ts_present"] for r in rows)
    if grading is None:
        print("grading not available")
    if have_ts:
        print("\n" + ts_mapping_check(rows))
    print_tables(rows, have_grading, have_ts)
    groups = [g for g in GROUP_ORDER if any(r["group"] == g for r in rows)]
    print_precision(rows, groups)
    check_goals(rows, have_grading)
    csv_path = cache / f"morphometry_{mode}{('_' + args.only) if args.only else ''}.csv"
    write_csv(rows, csv_path)
    print(f"\nper-vertebra CSV: {csv_path}")
    if args.noise_draws:
        print_noise_draws(cases, cache, args.noise_draws, max(1, args.jobs))
    return 0


def _pair_heights(phantom: bc.CachedPhantom, ct: np.ndarray) -> dict[str, np.ndarray]:
    """Our Ha, Hm, Hp (mm) of the truth-complete vertebrae (S1 excluded) by level."""
    truth = {v["level"]: v for v in phantom.truth["vertebrae"]}
    out = {}
    for h in measure_heights(phantom.total, phantom.ijk_to_ras, body_labels=phantom.vertebrae_body, ct=ct):
        if h.complete and truth.get(h.level, {}).get("complete") and h.level != "S1":
            out[h.level] = np.array([h.ha_mm, h.hm_mm, h.hp_mm])
    return out


def print_noise_draws(cases: list[Case], cache: Path, draws: int, jobs: int) -> None:
    """Rotation invariance against the noise draw: each rotation pair rendered without noise, then
    measured without noise and with ``draws`` independent draws of Gaussian noise of the pair's
    level (added to the noise-free CT; seeds 0, 1, ...). Prints the largest height difference
    between the pair's two renderings for each."""
    pairs: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        if case.pair:
            pairs[case.pair].append(case)
    quiet = {f"{c.name} noise-free": dataclasses.replace(c.spec, noise_hu=0.0)
             for members in pairs.values() for c in members}
    bc.render_many(quiet, cache, jobs=jobs)
    print("\n=== Rotation invariance against the noise draw: max |ΔH| (mm) between the pair's renderings ===")
    for pair, members in sorted(pairs.items()):
        if len(members) != 2:
            continue
        phantoms = [bc.load_cached(dataclasses.replace(c.spec, noise_hu=0.0), cache) for c in members]
        sigma = members[0].spec.noise_hu
        differences = []
        for draw in [None] + list(range(draws)):
            heights = []
            for index, phantom in enumerate(phantoms):
                ct = phantom.ct.astype(np.float32)
                if draw is not None:
                    ct = ct + np.random.default_rng(1000 * draw + index).normal(0.0, sigma, ct.shape).astype(np.float32)
                heights.append(_pair_heights(phantom, ct))
            common = set(heights[0]) & set(heights[1])
            differences.append(max(float(np.max(np.abs(heights[0][lv_] - heights[1][lv_]))) for lv_ in common))
        print(f"  {pair:<4} {members[0].group:<10} no noise {differences[0]:.2f};  {sigma:.0f} HU draws: "
              + " ".join(f"{d:.2f}" for d in differences[1:]))


if __name__ == "__main__":
    sys.exit(main())
