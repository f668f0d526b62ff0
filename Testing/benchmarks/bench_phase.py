#!/usr/bin/env python
"""Contrast phase and the bone category for the phase on phantoms (issue 31).

Suite: 48 phantom spines T12–L3 with a contrast phase (``PhantomSpec.phase``): 4 phases (native,
arterial, portal venous, delayed) x 4 voxel sizes (3 mm, 2 mm, 0.8 x 0.8 x 2 mm, 0.8 x 0.8 x 5 mm)
x 3 noise levels (10, 20, 30 HU), partial volume rendered (default supersampling). Each phantom
varies like patients do: the contrast dose scales every enhancement (vessels, kidneys and
trabecular bone) by a factor drawn in 0.85–1.15, each vessel's HU moves by up to ±10 HU more and
the kidneys' (cortex and medulla together) too, and L1's unenhanced trabecular HU is drawn in
60–200 HU (L2 and L3 near it). Four more phantoms
lie between the arterial and the portal venous phase (aorta 240 HU, portal vein 175 HU, renal
cortex 40 HU above the medulla); the estimate must not call them confidently.

Per phantom:

* the phase with every label (``estimate_phase``), against the truth;
* the phase with each of the 31 combinations of missing labels (aorta, vena cava, portal vein,
  right and left kidney removed from the ``total`` map): how often a phase is confident and wrong
  (the goal: never), how often it stays exact, and how often it is coarser (``enhanced``,
  ``uncertain``);
* the morphometry, trabecular ROIs and bone summary, and the category for the phase
  (``bone_for_phase``) against the truth's category of the unenhanced L1 HU; beside it the
  unenhanced thresholds' category of the same exam;
* the run time of ``estimate_phase`` (label boxes given, as screening does), beside
  ``measure_contrast`` and the morphometry + trabecular ROIs of the same exam.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_phase.py --jobs 2

The first run renders 52 phantoms (about 3 minutes on 2 cores); later runs take about 2 minutes.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.geometry import find_label_boxes  # noqa: E402
from VertebralFractureScreenLib.measure import attenuation as at  # noqa: E402
from VertebralFractureScreenLib.measure import phase as phase_module  # noqa: E402
from VertebralFractureScreenLib.measure.contrast import measure_contrast  # noqa: E402
from VertebralFractureScreenLib.measure.grading import grade_spine  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import measure_heights  # noqa: E402
from VertebralFractureScreenLib.phantom import render as ph  # noqa: E402
from VertebralFractureScreenLib.phantom.spec import PHASE_HU, PHASE_STRUCTURES  # noqa: E402

SPACINGS = {"3 mm": (3.0, 3.0, 3.0), "2 mm": (2.0, 2.0, 2.0), "0.8x0.8x2": (0.8, 0.8, 2.0),
            "0.8x0.8x5": (0.8, 0.8, 5.0)}
NOISES = (10.0, 20.0, 30.0)
LABELS = {"aorta": lv.TOTAL_AORTA, "inferior_vena_cava": lv.TOTAL_INFERIOR_VENA_CAVA,
          "portal_vein_and_splenic_vein": lv.TOTAL_PORTAL_SPLENIC_VEIN, "kidney_right": lv.TOTAL_KIDNEY_RIGHT,
          "kidney_left": lv.TOTAL_KIDNEY_LEFT}
BETWEEN = {"aorta": 240.0, "portal_vein_and_splenic_vein": 175.0, "inferior_vena_cava": 120.0,
           "kidney_cortex": 200.0, "kidney_medulla": 160.0}
NATIVE_BLOOD_HU = 40.0


@dataclass(frozen=True)
class Case:
    name: str
    spacing: str
    phase: str  # the truth; "between" for the ambiguous phantoms
    spec: ph.PhantomSpec


def _varied_spec(phase: str, spacing, noise: float, seed: int) -> ph.PhantomSpec:
    """A phantom of ``phase`` whose enhancement, structure HU and L1 vary as the docstring says."""
    rng = np.random.default_rng(1000 + seed)
    dose = float(rng.uniform(0.85, 1.15))
    base = dict(zip(PHASE_STRUCTURES, PHASE_HU[phase]))
    native = dict(zip(PHASE_STRUCTURES, PHASE_HU["native"]))
    shift = {name: float(rng.uniform(-10.0, 10.0)) for name in ("aorta", "inferior_vena_cava",
                                                                  "portal_vein_and_splenic_vein", "kidney")}
    hu = {name: round(native[name] + dose * (value - native[name]) + shift.get(name, shift["kidney"]), 1)
          for name, value in base.items()}
    l1 = round(float(rng.uniform(60.0, 200.0)), 1)
    trabecular = {"T12": l1 + 10.0, "L1": l1, "L2": l1 - 5.0, "L3": l1 - 10.0}
    return ph.PhantomSpec(levels=lv.parse_level_range("T12-L3"), spacing=spacing, noise_hu=noise, phase=phase,
                          phase_hu=hu, bone_enhancement_hu=round(dose * at.PHASE_BONE_OFFSETS_HU[phase], 2),
                          trabecular_hu=trabecular, autochthon_fat_fraction=0.1, iliopsoas_fat_fraction=0.05,
                          seed=seed)


def build_suite() -> list[Case]:
    cases = []
    seed = 0
    for (label, spacing), phase, noise in itertools.product(SPACINGS.items(), phase_module.PHASES, NOISES):
        seed += 1
        cases.append(Case(f"{phase}-{label}-n{noise:g}", label, phase, _varied_spec(phase, spacing, noise, seed)))
    for label, spacing in SPACINGS.items():
        seed += 1
        spec = ph.PhantomSpec(levels=lv.parse_level_range("T12-L3"), spacing=spacing, noise_hu=20.0,
                              phase="portal_venous", phase_hu=BETWEEN, trabecular_hu=120.0, seed=seed)
        cases.append(Case(f"between-{label}", label, "between", spec))
    return cases


def measure(case: Case, phantom) -> dict:
    """Every estimate and category of one phantom (see the module docstring)."""
    ct, total, m = phantom.ct, phantom.total, phantom.ijk_to_ras
    boxes = find_label_boxes(total)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        full = phase_module.estimate_phase(ct, total, m, label_boxes=boxes)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    measure_contrast(ct, total, m, label_boxes=boxes)
    t_contrast = time.perf_counter() - t0
    missing = []
    for count in range(1, len(LABELS) + 1):
        for names in itertools.combinations(LABELS, count):
            reduced = total.copy()
            reduced[np.isin(reduced, [LABELS[name] for name in names])] = 0
            missing.append(phase_module.estimate_phase(ct, reduced, m))
    t0 = time.perf_counter()
    heights = measure_heights(total, m, body_labels=phantom.vertebrae_body, ct=ct)
    rois = at.measure_trabecular(ct, total, m, heights, body_labels=phantom.vertebrae_body, grades=grade_spine(heights))
    t_bone = time.perf_counter() - t0
    summary = at.bone_summary(rois)
    bone = at.bone_for_phase(summary, full)
    truth_vertebra = {v["level"]: v for v in phantom.truth["vertebrae"]}.get(summary.l1_level or "", {})
    return {"case": case, "full": full, "missing": missing, "summary": summary, "bone": bone,
            "truth_category": truth_vertebra.get("category_native"), "t_phase": min(times), "t_contrast": t_contrast,
            "t_bone": t_bone, "shape": ct.shape}


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100.0 * part / whole:.0f} %)" if whole else "–"


def print_table(results: list[dict]) -> None:
    print("\n=== Contrast phase on phantoms ===")
    print("| voxels | phantoms | phase exact, all labels | missing labels: confident wrong | exact | coarser |"
          " category for phase = truth | unenhanced thresholds = truth | category uncertain | phase estimate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    groups = [(label, [r for r in results if r["case"].spacing == label]) for label in SPACINGS]
    for label, rows in groups + [("all", results)]:
        rows = [r for r in rows if r["case"].phase != "between"]
        exact = sum(r["full"].phase == r["case"].phase and r["full"].confident for r in rows)
        estimates = [(r["case"].phase, e) for r in rows for e in r["missing"]]
        wrong = sum(e.confident and e.phase != truth for truth, e in estimates)
        kept = sum(e.phase == truth for truth, e in estimates)
        agree = sum(r["bone"]["category_for_phase"] == r["truth_category"] for r in rows)
        plain = sum(r["summary"].category == r["truth_category"] for r in rows)
        uncertain = sum(bool(r["bone"]["category_for_phase_uncertain"]) for r in rows)
        t = [1000.0 * r["t_phase"] for r in rows]
        print(f"| {label} | {len(rows)} | {_share(exact, len(rows))} | {wrong}/{len(estimates)} | "
              f"{_share(kept, len(estimates))} | {_share(len(estimates) - kept - wrong, len(estimates))} | "
              f"{_share(agree, len(rows))} | {_share(plain, len(rows))} | {uncertain} | "
              f"{statistics.median(t):.0f} ms (max {max(t):.0f}) |")


def print_details(results: list[dict]) -> None:
    normal = [r for r in results if r["case"].phase != "between"]
    misses = [r for r in normal if not (r["full"].phase == r["case"].phase and r["full"].confident)]
    print(f"\nPhase not exact with every label: {len(misses)}")
    for r in misses:
        print(f"  {r['case'].name:<26} -> {r['full'].phase} {r['full'].candidates}  {'; '.join(r['full'].warnings)}")
    print("\nBy phase (all voxel sizes), missing-label estimates: exact / enhanced / uncertain / confident wrong")
    for phase in phase_module.PHASES:
        estimates = [e for r in normal if r["case"].phase == phase for e in r["missing"]]
        counts = [sum(e.phase == phase for e in estimates), sum(e.phase == phase_module.ENHANCED for e in estimates),
                  sum(e.phase == phase_module.UNCERTAIN for e in estimates),
                  sum(e.confident and e.phase != phase for e in estimates)]
        print(f"  {phase:<14} " + " / ".join(str(c) for c in counts) + f" of {len(estimates)}")
    disagree = [r for r in normal if r["bone"]["category_for_phase"] != r["truth_category"]]
    print(f"\nCategory for the phase differs from the truth: {len(disagree)}")
    for r in disagree:
        native = r["case"].spec.trabecular_hu_of("L1")
        print(f"  {r['case'].name:<26} L1 unenhanced {native:.1f} HU, measured {r['summary'].l1_hu:.1f} HU, "
              f"for phase {r['bone']['l1_hu_for_phase']}: {r['bone']['category_for_phase']} "
              f"(uncertain {r['bone']['category_for_phase_uncertain']}) vs truth {r['truth_category']}")
    print("\nBetween the arterial and the portal venous phase (never confident):")
    for r in [r for r in results if r["case"].phase == "between"]:
        wrong = sum(e.confident for e in r["missing"])
        print(f"  {r['case'].name:<26} all labels: {r['full'].phase} {r['full'].candidates}; "
              f"missing labels: {wrong} confident of {len(r['missing'])}")
    print("\nRun time (ms, median over phantoms): estimate_phase / measure_contrast / morphometry + trabecular ROIs")
    for label in SPACINGS:
        rows = [r for r in results if r["case"].spacing == label]
        med = [statistics.median(1000.0 * r[key] for r in rows) for key in ("t_phase", "t_contrast", "t_bone")]
        print(f"  {label:<10} shape {rows[0]['shape']}:  {med[0]:.0f} / {med[1]:.0f} / {med[2]:.0f}")


def main(argv=None) -> int:
    parser = bc.bench_parser(__doc__)
    args = parser.parse_args(argv)
    cache = args.cache.expanduser()
    cases = [c for c in build_suite() if args.only in c.name]
    print(f"bench_phase: {len(cases)} phantoms, {2 ** len(LABELS) - 1} label combinations missing on each")
    bc.render_many({c.name: c.spec for c in cases}, cache, jobs=args.jobs, rerender=args.rerender)
    results = []
    for case in cases:
        t0 = time.perf_counter()
        results.append(measure(case, bc.load_cached(case.spec, cache)))
        print(f"  measured  {case.name:<26} in {time.perf_counter() - t0:5.1f} s")
    if results:
        print_table(results)
        print_details(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
