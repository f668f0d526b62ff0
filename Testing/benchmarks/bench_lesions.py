#!/usr/bin/env python
"""Lesions and hardware (``measure/lesions.py``) on phantom spines with truth.

Suite: 48 T10–L5 spines, every combination of

* voxels of 1 mm, 0.7 x 0.7 x 3 mm and 3 mm (partial-volume supersampling as the phantom's
  default; a fifth of the spines rotated by (15°, 0°, 10°));
* a base spine: ``normal`` (trabecular 160 HU), ``osteoporotic`` (100 HU at T10 falling to 60 HU
  at L5), ``contrast`` (185 HU, aorta enhanced) or ``fractured`` (110 HU, two wedge, crush or
  biconcave fractures of grades 1–3, with 3 mm of compacted trabeculae 200 HU denser under each
  fractured endplate, as ``Testing/test_lesions.py`` draws them);
* contents: (A) a focal sclerotic lesion of 10–20 mm, a lytic one of 5–10 mm, cement; (B) a lytic
  lesion of 10–20 mm, a sclerotic one of 5–10 mm, screws; (C) a diffuse sclerotic and a diffuse
  lytic body and a focal sclerotic lesion of 10–20 mm; (D) nothing; (E, 12 more spines)
  pathological fractures: a lytic and a sclerotic lesion of 10–20 mm in fractured bodies and cement
  in a third (vertebroplasty), grades 1–3;

with noise of 10–30 HU (60 spines in all). Sizes, HU (sclerotic 400–1200 HU, lytic −50, 0, 20 or 40 HU, diffuse
sclerotic 400–800 HU, diffuse lytic 0–40 HU), levels and fractures are drawn per spine from a
seeded generator; in (A)–(D) a lesion never shares its level with a fracture or hardware.

Every exam: ``measure_heights`` (CT and ``vertebrae_body`` map), then ``find_lesions`` (timed),
``grade_spine`` and the exam's fracture summary as screening makes it (``exam_fracture_summary``
with the flagged levels as possibly pathological).
Prints lesion sensitivity (the right kind at the lesion's level) for focal lesions of at least
10 mm and of 5–10 mm and for diffuse ones, per voxel size; lytic lesions whose contrast the rule
does not call lytic (a soft-tissue lesion in osteoporotic bone: at most 60 HU below the bone, or
above 100 HU) apart; hardware sensitivity; false flags per vertebra without lesion or hardware,
per base spine; vertebrae not assessed; grades ≥ 1 on vertebrae with a lesion or hardware and how
many of them the summary counts as osteoporotic (goal 0); the runtime of ``find_lesions`` per exam. A per-vertebra
CSV goes to ``<cache>/lesions.csv``.

Run by hand (never collected by pytest)::

    .venv/bin/python Testing/benchmarks/bench_lesions.py --jobs 2
    .venv/bin/python Testing/benchmarks/bench_lesions.py --speed --only none   # the speed exam alone

The first run renders the 48 phantoms (about 10 minutes on 2 cores); later runs take 2–3 minutes.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _bench_common as bc  # noqa: E402
from test_lesions import compaction_bands  # noqa: E402  (the fractured endplates' dense band)

from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.geometry import find_label_boxes  # noqa: E402
from VertebralFractureScreenLib.measure import lesions as le  # noqa: E402
from VertebralFractureScreenLib.measure.grading import exam_fracture_summary, grade_spine  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import measure_heights  # noqa: E402
from VertebralFractureScreenLib.phantom import render as ph  # noqa: E402

LEVELS = lv.parse_level_range("T10-L5")
SPACINGS = {"1 mm": (1.0, 1.0, 1.0), "0.7x0.7x3": (0.7, 0.7, 3.0), "3 mm": (3.0, 3.0, 3.0)}
OSTEOPOROTIC = dict(zip(LEVELS, np.linspace(100.0, 60.0, len(LEVELS)).round(1).tolist()))
BASES = {
    "normal": dict(trabecular_hu=160.0),
    "osteoporotic": dict(trabecular_hu=OSTEOPOROTIC),
    "contrast": dict(trabecular_hu=185.0, contrast=True),
    "fractured": dict(trabecular_hu=110.0),
}
CONTENTS = ("A", "B", "C", "D")
PATHOLOGICAL = "E"
PATHOLOGICAL_FRACTIONS = (0.22, 0.3, 0.45)  # height loss of grades 1, 2, 3
BAND_MM, BAND_HU = 3.0, 200.0


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    base: str
    spec: ph.PhantomSpec


def _size(rng, large: bool) -> float:
    return float(np.round(rng.uniform(10.0, 20.0) if large else rng.uniform(5.0, 9.5), 1))


def _contents(rng, content: str, levels: list[str]) -> tuple[tuple, tuple]:
    """Lesions and hardware of one spine at the given free ``levels`` (in the order used)."""
    lytic_hu = lambda: float(rng.choice([-50.0, 0.0, 20.0, 40.0]))  # noqa: E731
    sclerotic_hu = lambda: float(np.round(rng.uniform(400.0, 1200.0), -1))  # noqa: E731
    if content == "A":
        return ((ph.Lesion(levels[0], "sclerotic", _size(rng, True), sclerotic_hu()),
                 ph.Lesion(levels[1], "lytic", _size(rng, False), lytic_hu())), (ph.Hardware(levels[2], "cement"),))
    if content == "B":
        return ((ph.Lesion(levels[0], "lytic", _size(rng, True), lytic_hu()),
                 ph.Lesion(levels[1], "sclerotic", _size(rng, False), sclerotic_hu())),
                (ph.Hardware(levels[2], "screws"),))
    if content == "C":
        return ((ph.Lesion(levels[0], "sclerotic", 0.0, float(np.round(rng.uniform(400.0, 800.0), -1)), diffuse=True),
                 ph.Lesion(levels[1], "lytic", 0.0, float(rng.choice([0.0, 20.0, 40.0])), diffuse=True),
                 ph.Lesion(levels[2], "sclerotic", _size(rng, True), sclerotic_hu())), ())
    if content == PATHOLOGICAL:
        return ((ph.Lesion(levels[0], "lytic", _size(rng, True), lytic_hu()),
                 ph.Lesion(levels[1], "sclerotic", _size(rng, True), sclerotic_hu())), (ph.Hardware(levels[2], "cement"),))
    return (), ()


def _pathological_fractures(rng, levels: list[str]) -> tuple:
    """Fractures of the first three free ``levels``, where (E) puts its lesions and cement."""
    return tuple(ph.Fracture(level, str(rng.choice(ph.FRACTURE_SHAPES)), float(rng.choice(PATHOLOGICAL_FRACTIONS)))
                 for level in levels[:3])


def build_suite() -> list[Case]:
    cases = []
    for index in range(60):
        rng = np.random.default_rng(1000 + index)
        group = list(SPACINGS)[index % 3]
        base = list(BASES)[(index // 3) % 4]
        content = CONTENTS[index // 12] if index < 48 else PATHOLOGICAL
        levels = [str(level) for level in rng.permutation(LEVELS)]
        fractures = ()
        if base == "fractured":
            fractures = tuple(ph.Fracture(levels.pop(), str(rng.choice(ph.FRACTURE_SHAPES)),
                                          float(rng.choice([0.22, 0.3, 0.45]))) for _ in range(2))
        lesions, hardware = _contents(rng, content, levels)
        if content == PATHOLOGICAL:
            fractures += _pathological_fractures(rng, levels)
        rotation = (15.0, 0.0, 10.0) if index % 5 == 4 else (0.0, 0.0, 0.0)
        spec = ph.PhantomSpec(levels=LEVELS, spacing=SPACINGS[group], rotation_deg=rotation, fractures=fractures,
                              lesions=lesions, hardware=hardware, noise_hu=float(rng.choice([10, 15, 20, 25, 30])),
                              seed=index, **BASES[base])
        name = f"{index:02d} {group} {base} {content}{' rot' if any(rotation) else ''}"
        cases.append(Case(name, group, base, spec))
    return cases


def measure(case: Case, phantom: bc.CachedPhantom) -> tuple[list[dict], float]:
    """One exam: per-vertebra records (truth beside the result) and the seconds of ``find_lesions``."""
    ct = compaction_bands(phantom, case.spec, BAND_MM, BAND_HU) if case.spec.fractures else phantom.ct
    heights = measure_heights(phantom.total, phantom.ijk_to_ras, ct=ct, body_labels=phantom.vertebrae_body)
    t0 = time.perf_counter()
    found = le.find_lesions(ct, phantom.total, phantom.ijk_to_ras, heights, body_labels=phantom.vertebrae_body)
    seconds = time.perf_counter() - t0
    grades = {g.level: g for g in grade_spine(heights)}
    summary = exam_fracture_summary(list(grades.values()),
                                    [r.level for r in found if r.suspected_lesion or r.instrumented])
    truth = {vt["level"]: vt for vt in phantom.truth["vertebrae"]}
    rows = []
    for result in found:
        vt = truth[result.level]
        lesion = vt.get("lesion") or {}
        rows.append({
            "case": case.name, "group": case.group, "base": case.base, "noise": case.spec.noise_hu,
            "level": result.level, "trabecular_hu": vt["trabecular_hu"], "fractured": bool(vt.get("fracture")),
            "true_lesion": lesion.get("kind"), "true_diameter_mm": lesion.get("diameter_mm"),
            "true_diffuse": lesion.get("diffuse"), "true_lesion_hu": lesion.get("hu"),
            "true_hardware": vt.get("hardware"),
            "genant_grade": getattr(grades.get(result.level), "genant_grade", None),
            "counted_osteoporotic": result.level in summary["fractured_levels"],
            "possibly_pathological": result.level in summary["possibly_pathological_levels"], **{k: v for k, v in result.to_dict().items() if k != "label"},
            "flags": " ".join(result.flags)})
    return rows, seconds


def within_rule(row: dict, rows: list[dict]) -> bool:
    """Whether the rule's contrast calls the true lesion what it is. Lytic lesions: at most
    :data:`LYTIC_MAX_HU` and :data:`LYTIC_MIN_DROP_HU` below the level's bone; diffuse ones at most
    :data:`LYTIC_MAX_HU` and :data:`DIFFUSE_DEFICIT_HU` below the first quartile of the true
    trabecular HU of the exam's other vertebrae without a diffuse lesion (``rows``: the exam's)."""
    if row["true_lesion"] != "lytic":
        return True
    if not row["true_diffuse"]:
        return row["true_lesion_hu"] <= min(le.LYTIC_MAX_HU, row["trabecular_hu"] - le.LYTIC_MIN_DROP_HU)
    others = [r["trabecular_hu"] for r in rows if r["case"] == row["case"] and r is not row and not r["true_diffuse"]]
    return row["true_lesion_hu"] <= min(le.LYTIC_MAX_HU, float(np.percentile(others, 25)) - le.DIFFUSE_DEFICIT_HU)


def _rate(rows, hit) -> str:
    if not rows:
        return "-"
    n = sum(1 for r in rows if hit(r))
    return f"{n}/{len(rows)} ({100.0 * n / len(rows):.0f} %)"


def print_lesions(rows: list[dict]):
    print("\n=== Lesion sensitivity: the right kind at the lesion's level ===")
    def focal(kind, large):
        return lambda r: (r["true_lesion"] == kind and not r["true_diffuse"]
                          and (r["true_diameter_mm"] >= 10) == large)

    columns = {">= 10 mm sclerotic": focal("sclerotic", True), ">= 10 mm lytic": focal("lytic", True),
               "5-10 mm sclerotic": focal("sclerotic", False), "5-10 mm lytic": focal("lytic", False),
               "diffuse": lambda r: bool(r["true_diffuse"])}
    print(f"{'voxels':<12}" + "".join(f"{name:<20}" for name in columns))
    lesions = [r for r in rows if r["true_lesion"] and within_rule(r, rows)]
    for group in [*SPACINGS, "all"]:
        mine = [r for r in lesions if group in ("all", r["group"])]
        print(f"{group:<12}" + "".join(f"{_rate([r for r in mine if pick(r)], _found):<20}"
                                       for pick in columns.values()))
    print(f"  focal/diffuse right among those found: "
          f"{_rate([r for r in lesions if _found(r)], lambda r: r['diffuse'] == bool(r['true_diffuse']))}")
    large = [r["lesion_volume_ml"] / (np.pi / 6.0 * r["true_diameter_mm"] ** 3 / 1000.0)
             for r in lesions if not r["true_diffuse"] and _found(r) and r["true_diameter_mm"] >= 10]
    if large:
        print(f"  focal >= 10 mm: measured volume / sphere's volume median {np.median(large):.2f} (range "
              f"{min(large):.2f}-{max(large):.2f}; the core leaves out the shell, endplates, posterior fifth)")
    outside = [r for r in rows if r["true_lesion"] and not within_rule(r, rows)]
    print(f"  lytic lesions whose contrast the rule does not call lytic (soft tissue in osteoporotic bone), "
          f"not counted above: {_rate(outside, _found)} found")


def _found(row: dict) -> bool:
    return row["suspected_lesion"] == row["true_lesion"]


def print_hardware(rows: list[dict]):
    print("\n=== Hardware sensitivity: the right kind at its level ===")
    for group in [*SPACINGS, "all"]:
        mine = [r for r in rows if group in ("all", r["group"])]
        right = lambda r: r["instrumented"] == r["true_hardware"]  # noqa: E731
        cells = [f"{kind} {_rate([r for r in mine if r['true_hardware'] == kind], right)}"
                 for kind in le.HARDWARE_KINDS]
        print(f"{group:<12}" + "   ".join(cells))


def print_false_flags(rows: list[dict]):
    print("\n=== False flags per vertebra without lesion or hardware (suspected_lesion or instrumented) ===")
    clean = [r for r in rows if not r["true_lesion"] and not r["true_hardware"]]
    flagged = lambda r: bool(r["suspected_lesion"] or r["instrumented"])  # noqa: E731
    print(f"{'voxels':<12}" + "".join(f"{base:<18}" for base in [*BASES, "all"]) + "fractured vertebrae")
    for group in [*SPACINGS, "all"]:
        mine = [r for r in clean if group in ("all", r["group"])]
        cells = [_rate([r for r in mine if base in ("all", r["base"])], flagged) for base in [*BASES, "all"]]
        print(f"{group:<12}" + "".join(f"{c:<18}" for c in cells) + _rate([r for r in mine if r["fractured"]], flagged))
    for r in clean:
        if flagged(r):
            print(f"  false flag: {r['case']} {r['level']}: {r['suspected_lesion'] or r['instrumented']} "
                  f"{r['lesion_volume_ml']:.3f} ml {r['lesion_hu']:.0f} HU (core {r['core_hu']:.0f} HU)")
    wrong = [r for r in rows if r["true_lesion"] and r["suspected_lesion"] and not _found(r)]
    for r in wrong:
        print(f"  wrong kind: {r['case']} {r['level']}: {r['true_lesion']} called {r['suspected_lesion']}")
    skipped = [r for r in rows if "lesions_not_assessed" in r["flags"] and not r["instrumented"]]
    print(f"  not assessed (core under {le.MIN_CORE_ML} ml), hardware aside: {len(skipped)} of {len(rows)} vertebrae"
          + (": " + ", ".join(f"{r['case'].split()[0]} {r['level']}{' (fractured)' if r['fractured'] else ''}"
                              for r in skipped) if skipped else ""))


def print_pathological(rows: list[dict]):
    print("\n=== Grades >= 1 on vertebrae with a lesion or hardware (truth): counted as osteoporotic? (goal 0) ===")
    print(f"{'voxels':<12}{'vertebrae':<12}{'grade >= 1':<14}{'counted':<10}{'reported possibly pathological':<32}"
          "true fractures among them graded >= 1")
    for group in [*SPACINGS, "all"]:
        mine = [r for r in rows if group in ("all", r["group"]) and (r["true_lesion"] or r["true_hardware"])]
        graded = [r for r in mine if (r["genant_grade"] or 0) >= 1]
        counted = [r for r in graded if r["counted_osteoporotic"]]
        reported = [r for r in graded if r["possibly_pathological"]]
        true = [r for r in mine if r["fractured"]]
        print(f"{group:<12}{len(mine):<12}{len(graded):<14}{len(counted):<10}{len(reported):<32}"
              f"{_rate(true, lambda r: (r['genant_grade'] or 0) >= 1)}")
        for r in counted if group == "all" else ():
            print(f"  counted: {r['case']} {r['level']} grade {r['genant_grade']} "
                  f"({r['true_lesion'] or r['true_hardware']}; flags {r['flags'] or '-'})")


def print_runtime(times: list[tuple[Case, float]]):
    print("\n=== Runtime of find_lesions per exam (8 vertebrae; morphometry not included) ===")
    for group in [*SPACINGS, "all"]:
        seconds = np.array([s for case, s in times if group in ("all", case.group)]) * 1000.0
        if len(seconds):
            print(f"{group:<12}median {np.median(seconds):6.0f} ms   max {seconds.max():6.0f} ms")


def speed(cache: Path, repeat: int, rerender: bool):
    """``find_lesions`` on the 17-vertebra 512 x 512 x 500 exam of ``bench_morphometry_speed.py``
    (same cached phantom), best of ``repeat``, beside the morphometry it needs."""
    import bench_morphometry_speed as speed_bench

    slice_mm, _ = speed_bench.slice_spacing_that_fits()
    spec = speed_bench.make_spec(slice_mm)
    bc.render_many({"speed-T1L5-512x512x500": spec}, cache, jobs=1, rerender=rerender)
    p = bc.load_cached(spec, cache)
    heights = measure_heights(p.total, p.ijk_to_ras, ct=p.ct, body_labels=p.vertebrae_body)
    boxes = find_label_boxes(p.total)
    for label, call in (("find_lesions", lambda: le.find_lesions(p.ct, p.total, p.ijk_to_ras, heights,
                                                                  body_labels=p.vertebrae_body)),
                        ("find_lesions, label boxes given", lambda: le.find_lesions(
                            p.ct, p.total, p.ijk_to_ras, heights, body_labels=p.vertebrae_body, label_boxes=boxes))):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            found = call()
            times.append(time.perf_counter() - t0)
        print(f"  {label:<34} {min(times):6.3f} s  ({len(found)} vertebrae, {p.ct.shape[2]}x{p.ct.shape[1]}x"
              f"{p.ct.shape[0]} voxels, best of {repeat}; flagged: "
              f"{[r.level for r in found if r.flags and r.flags != ('lesions_not_assessed',)]})")


def write_csv(rows: list[dict], path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=bc.DEFAULT_CACHE,
                        help=f"cache directory of rendered phantoms (default {bc.DEFAULT_CACHE})")
    parser.add_argument("--rerender", action="store_true", help="render again even when cached")
    parser.add_argument("--jobs", type=int, default=1, help="processes for rendering missing phantoms (default 1)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--speed", action="store_true", help="also time find_lesions on the 512 x 512 x 500 exam")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the speed measurement; the best counts")
    args = parser.parse_args(argv)
    cache = args.cache.expanduser()
    cases = [c for c in build_suite() if args.only in c.name]
    if args.list:
        for c in cases:
            fractures = [f"{f.level}:{f.shape}:{f.fraction}" for f in c.spec.fractures]
            print(f"{c.name:<34} noise {c.spec.noise_hu:>4.0f}  lesions {[x.text for x in c.spec.lesions]}  "
                  f"hardware {[x.text for x in c.spec.hardware]}  fractures {fractures}")
        return 0
    print(f"bench_lesions: {len(cases)} phantoms")
    bc.render_many({c.name: c.spec for c in cases}, cache, jobs=args.jobs, rerender=args.rerender)
    rows, times = [], []
    for case in cases:
        exam_rows, seconds = measure(case, bc.load_cached(case.spec, cache))
        rows += exam_rows
        times.append((case, seconds))
        print(f"  measured  {case.name:<34} find_lesions {1000.0 * seconds:5.0f} ms", flush=True)
    if rows:
        print_lesions(rows)
        print_hardware(rows)
        print_false_flags(rows)
        print_pathological(rows)
        print_runtime(times)
        path = cache / f"lesions{('_' + args.only.replace(' ', '_')) if args.only else ''}.csv"
        write_csv(rows, path)
        print(f"\nper-vertebra CSV: {path}")
    if args.speed:
        print("\n=== Speed on the 17-vertebra exam ===")
        speed(cache, args.repeat, args.rerender)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
