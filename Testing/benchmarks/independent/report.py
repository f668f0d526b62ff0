"""Statistics and printed tables of ``bench_independent.py`` (pure: rows in, text out).

A row is one scored vertebra of one spine (see ``bench_independent.measure_case``): truth,
our heights with their reported SDs, grades, trabecular HU with its standard error. Height
errors are measured − truth (mm) against the mid-sagittal truth (``err_*``) and against the
central band's median (``err_band_*``).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .suite import GROUP_ORDER

KEYS = ("ha", "hm", "hp")
GOALS = {"median_mm": {"1 mm": 0.25, "0.7x0.7x3": 0.5, "3 mm": 0.5}, "exact_grade": 0.97, "hu_median": 1.0,
         "hu_p95": 3.0, "within_2sd": (0.90, 0.97), "rotation_mm": 0.5, "hu_noise": 20.0}


def finite(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)], float)
    return a


def median(values) -> float:
    """Median of the finite values (NaN when none)."""
    a = finite(values)
    return float(np.median(a)) if a.size else float("nan")


def stats(values) -> tuple[float, float, float, float, int]:
    """(median, p90, p95, max, n) of |values|."""
    a = np.abs(finite(values))
    if a.size == 0:
        return (float("nan"),) * 4 + (0,)
    return float(np.median(a)), float(np.percentile(a, 90)), float(np.percentile(a, 95)), float(a.max()), int(a.size)


def errors(rows, prefix: str = "err") -> list[float]:
    return [r[f"{prefix}_{k}"] for r in rows for k in KEYS]


def groups_of(rows) -> list[str]:
    present = {r["group"] for r in rows}
    return [g for g in GROUP_ORDER if g in present] + sorted(present - set(GROUP_ORDER))


def within(errs, sds, factor: float = 2.0) -> tuple[float, int, float]:
    """Share of |error| ≤ factor·SD over pairs with both finite, their count, and the factor
    by which the SDs would have to grow for 95 % of the errors to lie within two of them."""
    pairs = [(e, s) for e, s in zip(errs, sds) if math.isfinite(e) and math.isfinite(s) and s > 0]
    if not pairs:
        return float("nan"), 0, float("nan")
    z = np.abs([e / s for e, s in pairs])
    return float(np.mean(z <= factor)), len(pairs), float(np.percentile(z, 95) / factor)


def floor_for(errs, sds, target: float = 0.95) -> float:
    """The SD (mm) that, added in quadrature to every reported SD, puts ``target`` of the errors
    within two SDs (bisection; 0 when the reported SDs already do)."""
    pairs = np.array([(abs(e), s) for e, s in zip(errs, sds) if math.isfinite(e) and math.isfinite(s)])
    if pairs.size == 0:
        return float("nan")

    def share(floor):
        return np.mean(pairs[:, 0] <= 2.0 * np.sqrt(pairs[:, 1] ** 2 + floor ** 2))

    lo, hi = 0.0, 10.0
    if share(lo) >= target:
        return 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if share(mid) >= target else (mid, hi)
    return hi


def print_accuracy(rows) -> None:
    print("\n=== Height accuracy (|measured − truth| over Ha, Hm, Hp, mm; truth in the mid-sagittal plane; "
          "band: against the central band's median) ===")
    print(f"{'group':<10} {'vert':>4} {'miss':>4} | {'median':>6} {'p90':>6} {'p95':>6} {'max':>6} | "
          f"{'band med':>8} {'p90':>6} | {'bias Ha':>7} {'Hm':>6} {'Hp':>6}")
    for group in groups_of(rows) + ["all"]:
        sel = [r for r in rows if group == "all" or r["group"] == group]
        med, p90, p95, mx, _ = stats(errors(sel))
        bmed, bp90, *_ = stats(errors(sel, "err_band"))
        bias = [median(r[f"err_{k}"] for r in sel) for k in KEYS]
        miss = sum(not r["complete"] for r in sel)
        print(f"{group:<10} {len(sel):>4} {miss:>4} | {med:6.2f} {p90:6.2f} {p95:6.2f} {mx:6.2f} | {bmed:8.2f} {bp90:6.2f} | "
              + " ".join(f"{b:+6.2f}" for b in bias))


def _category_line(label: str, sel: list) -> str:
    med = stats(errors(sel))[0]
    bias = [median(r[f"err_{k}"] for r in sel) for k in KEYS]
    return (f"  {label:<34} n={len(sel):>3} med|err| {med:5.2f} | signed median Ha {bias[0]:+5.2f} "
            f"Hm {bias[1]:+5.2f} Hp {bias[2]:+5.2f}")


def print_breakdown(rows) -> None:
    """Median |error| and signed biases by what the vertebra is and how it was scanned."""
    print("\n=== Heights by vertebra and scan (per spacing group) ===")
    for group in groups_of(rows):
        sel = [r for r in rows if r["group"] == group]
        print(f"{group}:")
        buckets = defaultdict(list)
        for r in sel:
            buckets[f"true shape {r['fracture_shape'] or 'none'}"].append(r)
            for finding in r["findings"].split("+"):
                if finding:
                    buckets[f"finding {finding}"].append(r)
            if not r["findings"] and not r["fracture_shape"]:
                buckets["normal without findings"].append(r)
            buckets[f"kernel {r['kernel']}"].append(r)
            buckets[f"noise {r['noise_hu']:g} HU"].append(r)
            buckets["upright" if r["upright"] else "rotated"].append(r)
        for label in sorted(buckets):
            print(_category_line(label, buckets[label]))
        worst = sorted(sel, key=lambda r: -max(abs(r[f"err_{k}"]) if math.isfinite(r[f"err_{k}"]) else 0 for k in KEYS))
        print("  largest errors: " + "; ".join(
            f"{r['case']} {r['level']} " + "/".join(f"{r[f'err_{k}']:+.2f}" for k in KEYS) for r in worst[:4]))


def print_grades(rows) -> None:
    print("\n=== Grades (genant_grade; rows: true grade, columns: ours) ===")
    cols = [0, 1, 2, 3, None]
    print("true\\ours " + " ".join(f"{('none' if c is None else c)!s:>5}" for c in cols) + "  borderline")
    for t in range(4):
        sel = [r for r in rows if r["truth_grade"] == t]
        counts = [sum((r["grade"] is None) if c is None else (r["grade"] == c) for r in sel) for c in cols]
        print(f"{t:>9} " + " ".join(f"{n:>5}" for n in counts) + f"  {sum(r['truth_borderline'] for r in sel):>5}")
    nb = [r for r in rows if not r["truth_borderline"]]
    exact_truth = sum(r["grade_of_truth"] == r["truth_grade"] for r in nb)
    print(f"  the truth's own heights graded by grade_spine: exact {exact_truth}/{len(nb)} non-borderline")
    wrong = [r for r in nb if r["grade"] != r["truth_grade"]]
    for r in wrong[:30]:
        print(f"    {r['case']:<22} {r['level']:<4} true {r['truth_grade']}/{r['truth_shape']:<9} loss {r['truth_loss']:.3f}"
              f" → ours {r['grade']}/{r['grade_shape']:<9} [truth heights {r['grade_of_truth']}]"
              f"{' uncertain' if r['grade_uncertain'] else ''} err " + "/".join(f"{r[f'err_{k}']:+.2f}" for k in KEYS)
              + (f" findings {r['findings']}" if r["findings"] else ""))


def print_hu(rows) -> None:
    print("\n=== Trabecular HU (our ROI's mean − the drawn trabecular HU over the same ROI voxels; HU); "
          "usable ROIs (TrabecularROI.usable: complete, not fractured, not roi_small) and all ===")
    print(f"{'group':<10} {'noise':>5} {'n':>4} | {'median':>6} {'p95':>6} {'max':>6} {'bias':>6} | "
          f"{'|err|<=2SE':>10} {'SE x':>5} | {'SE med':>6} {'ROI vox':>7} || {'all n':>5} {'median':>6} {'p95':>6} {'max':>6}")
    for group in groups_of(rows):
        for noise in sorted({r["noise_hu"] for r in rows if r["group"] == group}):
            every = [r for r in rows if r["group"] == group and r["noise_hu"] == noise and math.isfinite(r["err_hu"])]
            sel = [r for r in every if r["hu_usable"]]
            med, _, p95, mx, n = stats([r["err_hu"] for r in sel])
            share, _, grow = within([r["err_hu"] for r in sel], [r["hu_se"] for r in sel])
            bias = median(r["err_hu"] for r in sel)
            amed, _, ap95, amx, an = stats([r["err_hu"] for r in every])
            print(f"{group:<10} {noise:5.0f} {n:>4} | {med:6.2f} {p95:6.2f} {mx:6.2f} {bias:+6.2f} | {share:10.0%} "
                  f"{grow:5.1f} | {median(r['hu_se'] for r in sel):6.2f} "
                  f"{median(r['roi_voxels'] for r in sel):7.0f} || {an:>5} {amed:6.2f} {ap95:6.2f} {amx:6.2f}")
    print("  SE x: the factor the reported SEs would need for 95 % of the errors to lie within two of them.")


def print_precision(rows) -> None:
    print("\n=== Reported precision: height SDs (ha_sd_mm ...) against the errors ===")
    for group in groups_of(rows):
        sel = [r for r in rows if r["group"] == group]
        sds = [r[f"{k}_sd"] for r in sel for k in KEYS]
        share, n, grow = within(errors(sel), sds)
        share_b, _, grow_b = within(errors(sel, "err_band"), sds)
        floor = floor_for(errors(sel), sds)
        uncertain = [r for r in sel if r["grade_uncertain"]]
        wrong = [r for r in sel if r["grade"] != r["truth_grade"]]
        print(f"{group:<10} SD median {median(sds):.3f} mm p90 {stats(sds)[1]:.3f} | "
              f"|err| <= 2 SD: {share:.0%} of {n} (band truth {share_b:.0%}); SDs x{grow:.1f} (band x{grow_b:.1f}) "
              f"or a floor of {floor:.2f} mm in quadrature would hold 95 % | imprecise_heights "
              f"{sum('imprecise_heights' in r['flags'] for r in sel)}/{len(sel)} | "
              f"grade_uncertain {len(uncertain)}, graded unlike the truth {len(wrong)} (flagged "
              f"{sum(r['grade_uncertain'] for r in wrong)}, borderline {sum(r['truth_borderline'] for r in wrong)})")


def largest_gaussian_p95(sds, draws: int = 10_000, seed: int = 0) -> float:
    """95th percentile of the largest |difference| among independent Gaussians of SDs ``sds``."""
    sds = finite(sds)
    if sds.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.percentile(np.abs(rng.standard_normal((draws, sds.size)) * sds).max(axis=1), 95))


def rotation_pairs(rows) -> dict[str, dict]:
    """Per rotation pair: group, height differences (0° − rotated) and their combined SDs."""
    by = defaultdict(dict)
    for r in rows:
        if r["pair"]:
            by[(r["pair"], r["level"])]["up" if r["upright"] else "rot"] = r
    pairs: dict[str, dict] = {}
    for (pair, _), roles in sorted(by.items()):
        if set(roles) != {"up", "rot"}:
            continue
        a, b = roles["up"], roles["rot"]
        entry = pairs.setdefault(pair, {"group": a["group"], "diffs": [], "sds": [], "unmeasured": 0})
        if not (a["complete"] and b["complete"]):
            entry["unmeasured"] += 1
            continue
        for k in KEYS:
            entry["diffs"].append(abs(a[k] - b[k]))
            entry["sds"].append(math.hypot(a[f"{k}_sd"], b[f"{k}_sd"]))
    for entry in pairs.values():
        entry["max"] = max(entry["diffs"], default=float("nan"))
        entry["median"] = median(entry["diffs"])
        entry["noise_p95"] = largest_gaussian_p95(entry["sds"])
    return pairs


def _line(ok: bool, text: str, phantom: str = "") -> None:
    print(f"  [{'PASS' if ok else 'FAIL'}] {text}" + (f"   | phantom suite: {phantom}" if phantom else ""))


def _grade_goals(sel, group: str, phantom: dict) -> None:
    nb = [r for r in sel if not r["truth_borderline"]]
    exact = sum(r["grade"] == r["truth_grade"] for r in nb)
    ungraded = sum(r["grade"] is None for r in nb)
    rate = exact / len(nb) if nb else float("nan")
    _line(rate >= GOALS["exact_grade"], f"{group}: exact Genant grade on non-borderline vertebrae {exact}/{len(nb)} = "
          f"{rate:.1%} (goal ≥ 97 %; {ungraded} not graded, exact on {exact}/{len(nb) - ungraded} graded)",
          phantom.get(("exact", group), ""))
    normals = [r for r in sel if r["truth_grade"] == 0]
    bad = [r for r in normals if r["grade"] is not None and r["grade"] >= 2]
    _line(not bad, f"{group}: grade ≥ 2 on a normal vertebra: {len(bad)}/{len(normals)} (goal 0; "
          f"{sum(bool(r['findings']) for r in normals)} normals with Schmorl's nodes, osteophytes or degenerated "
          f"discs)" + (": " + ", ".join(f"{r['case']} {r['level']} ({r['findings'] or 'no finding'})" for r in bad)
                       if bad else ""), phantom.get(("normals", group), ""))


def _calibration_goals(sel, group: str, phantom: dict) -> None:
    lo, hi = GOALS["within_2sd"]
    share, n, grow = within(errors(sel), [r[f"{k}_sd"] for r in sel for k in KEYS])
    _line(lo <= share <= hi, f"{group}: heights within 2 reported SDs {share:.1%} of {n} (goal 90–97 %; "
          f"SDs x{grow:.1f} would hold 95 %)", phantom.get(("within", group), ""))
    hu = [r for r in sel if math.isfinite(r["err_hu"]) and r["hu_usable"]]
    share, n, grow = within([r["err_hu"] for r in hu], [r["hu_se"] for r in hu])
    _line(lo <= share <= hi, f"{group}: trabecular HU within 2 reported SEs {share:.1%} of {n} usable ROIs (goal "
          f"90–97 %; SEs x{grow:.1f} would hold 95 %)")
    wrong = [r for r in sel if r["grade"] is not None and r["grade"] != r["truth_grade"] and not r["truth_borderline"]]
    flagged = sum(r["grade_uncertain"] for r in wrong)
    _line(flagged == len(wrong), f"{group}: grade_uncertain on every non-borderline vertebra graded unlike the truth: "
          f"{flagged}/{len(wrong)}")


def _rotation_goals(pairs: dict, group: str, phantom: dict) -> None:
    mine = {p: e for p, e in pairs.items() if e["group"] == group}
    if not mine:
        return
    if group == "1 mm":
        worst = max(e["max"] for e in mine.values())
        _line(worst <= GOALS["rotation_mm"] and not any(e["unmeasured"] for e in mine.values()),
              f"{group}: rotation 0° vs 20°, largest height difference {worst:.2f} mm over {len(mine)} pairs "
              f"(goal ≤ 0.5 mm)", phantom.get(("rotation", group), ""))
    else:
        middle = median(d for e in mine.values() for d in e["diffs"])
        ok = all(e["max"] <= e["noise_p95"] for e in mine.values()) and middle <= GOALS["rotation_mm"]
        text = "; ".join(f"{p} max {e['max']:.2f} vs noise p95 {e['noise_p95']:.2f}" for p, e in mine.items())
        _line(ok, f"{group}: rotation 0° vs 20°, {text}; median {middle:.2f} mm (goal: each max within its SDs' "
              f"95th percentile, median ≤ 0.5 mm)", phantom.get(("rotation", group), ""))
    for pair, e in mine.items():
        if e["unmeasured"]:
            print(f"         {pair}: {e['unmeasured']} vertebra(e) not measured in one of the two renderings")


def check_goals(rows, phantom: dict) -> None:
    """The issue's goals, each a PASS/FAIL line per spacing group with its figure (and today's
    phantom suite beside it where known)."""
    print("\n=== Goals (issue 30) ===")
    pairs = rotation_pairs(rows)
    for group in groups_of(rows):
        sel = [r for r in rows if r["group"] == group]
        med = stats(errors(sel))[0]
        goal = GOALS["median_mm"].get(group, 0.5)
        _line(med <= goal, f"{group}: median |height error| {med:.3f} mm (goal ≤ {goal} mm; against the band's "
              f"median {stats(errors(sel, 'err_band'))[0]:.3f} mm)", phantom.get(("median", group), ""))
        _grade_goals(sel, group, phantom)
        at20 = [r for r in sel if r["noise_hu"] == GOALS["hu_noise"]]
        hmed, _, hp95, _, n = stats([r["err_hu"] for r in at20 if r["hu_usable"]])
        amed, _, ap95, _, an = stats([r["err_hu"] for r in at20])
        _line(hmed <= GOALS["hu_median"] and hp95 <= GOALS["hu_p95"],
              f"{group}: trabecular HU error at 20 HU correlated noise with texture: median {hmed:.2f} HU, p95 "
              f"{hp95:.2f} HU over {n} usable ROIs (goal ≤ 1 and ≤ 3 HU; all {an} ROIs: {amed:.2f} / {ap95:.2f} HU)")
        _calibration_goals(sel, group, phantom)
        _rotation_goals(pairs, group, phantom)
    _grade_goals(rows, "all", phantom)
