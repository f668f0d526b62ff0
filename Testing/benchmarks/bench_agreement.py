"""Agreement of the fracture grades with expert Genant readings on real graded CTs (run by hand).

Reads the graded development set (``Testing/graded_data.py``: VerSe scans with their experts'
grades, held-out subjects left out), measures and grades every scan with its expert vertebra
mask and the CT, and compares, per vertebra that both graded (expert grades T4–L5 only):

* the product's grade (``genant_grade``, height and area against the expected normal shape) with
  Genant's published boundaries, and the SPEC §4 ``quantitative_grade`` beside it;
* the same grade with its boundaries chosen by leave-one-scan-out cross-validation: for each scan,
  the scale factors on the height and the area boundaries that maximise the weighted kappa on the
  other scans (ties: closest to the published ones) grade it. Needs at least 3 scans.

Reports sensitivity for grade ≥ 2 and ≥ 1, specificity on grade-0 vertebrae, linearly weighted
kappa, the confusion matrix, per-exam detection of any grade ≥ 2, and every disagreement by two
grades or more (reader variability or method: look at the cases). Writes the per-vertebra table
to ``--table`` (CSV).

    .venv/bin/python Testing/benchmarks/bench_agreement.py [--table agreement.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _bench_common  # noqa: E402,F401  (puts the Lib on the path)
from shared_data import graded_data_dir, graded_scans  # noqa: E402

from VertebralFractureScreenLib import levels as lv  # noqa: E402
from VertebralFractureScreenLib.report.agreement import agreement  # noqa: E402
from VertebralFractureScreenLib.io.exam_inputs import load_exam  # noqa: E402
from VertebralFractureScreenLib.measure.grading import AREA_BOUNDARIES, GRADE_BOUNDARIES, grade_spine, reader_grade  # noqa: E402
from VertebralFractureScreenLib.measure.morphometry import measure_heights  # noqa: E402

GRADED_LEVELS = lv.parse_level_range("T4-L5")
SCALES = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2)


def measure(scan) -> list[dict]:
    """One row per vertebra the experts graded (T4–L5) with our grades and losses."""
    exam = load_exam(scan.ct, scan.vertebrae, convention="verse")
    heights = measure_heights(exam.labels.array, exam.labels.ijk_to_ras, convention="verse", ct=exam.ct.array,
                              label_boxes=exam.label_boxes, label_grid=exam.label_grid)
    grades = {g.level: g for g in grade_spine(heights)}
    rows = []
    for level, expert in scan.grades.items():
        if level not in GRADED_LEVELS:
            continue
        g = grades.get(level)
        measured = g is not None and g.genant_grade is not None
        rows.append({
            "scan": scan.name, "level": level, "expert": expert,
            "graded": measured,
            "tool": g.genant_grade if measured else None,
            "quantitative": g.quantitative_grade if measured else None,
            "basis": g.grade_basis if measured else "",
            "shape_loss": max(g.wedge_loss, g.middle_loss, g.crush_loss if g.crush_loss == g.crush_loss else -1)
            if measured else float("nan"),
            "wedge_loss": g.wedge_loss if measured else float("nan"),
            "middle_loss": g.middle_loss if measured else float("nan"),
            "crush_loss": g.crush_loss if measured else float("nan"),
            "size_loss": g.size_loss if measured else float("nan"),
            "area_loss": g.area_loss if measured else float("nan"),
            "endplate_depression": g.endplate_depression if measured else float("nan"),
            "references": " ".join(g.reference_levels) if measured else "",
            "flags": ";".join(g.flags) if g is not None else "not segmented",
        })
    return rows


def regrade(row: dict, height_scale: float, area_scale: float) -> int:
    return reader_grade(row["shape_loss"], row["size_loss"], row["area_loss"],
                        [b * height_scale for b in GRADE_BOUNDARIES], [b * area_scale for b in AREA_BOUNDARIES])[0]


def cross_validated(rows: list[dict]) -> list[int]:
    """Leave-one-scan-out grades (see the module docstring)."""
    scans = sorted({r["scan"] for r in rows})
    grid = list(itertools.product(SCALES, SCALES))
    out = {}
    for scan in scans:
        train = [r for r in rows if r["scan"] != scan]

        def score(scales):
            a = agreement([r["expert"] for r in train], [regrade(r, *scales) for r in train])
            return (a.kappa if a.kappa == a.kappa else -1.0, -abs(scales[0] - 1.0) - abs(scales[1] - 1.0))

        best = max(grid, key=score)
        for r in rows:
            if r["scan"] == scan:
                out[id(r)] = regrade(r, *best)
        print(f"  fold {scan}: height x{best[0]:.1f}, area x{best[1]:.1f}")
    return [out[id(r)] for r in rows]


def report(name: str, rows: list[dict], tool: list[int]) -> None:
    a = agreement([r["expert"] for r in rows], tool)
    print(f"\n{name}: {a.vertebrae} vertebrae ({a.normal} grade 0, {a.fractured_g1} grade ≥ 1, "
          f"{a.fractured_g2} grade ≥ 2)")
    print(f"  sensitivity grade ≥ 2: {a.sensitivity_g2:.1%}   grade ≥ 1: {a.sensitivity_g1:.1%}")
    print(f"  specificity on grade 0 (not called ≥ 1): {a.specificity:.1%}   (not called ≥ 2): {a.specificity_g2:.1%}")
    print(f"  linearly weighted kappa: {a.kappa:.3f}")
    print("  confusion (rows expert 0–3, columns tool 0–3):")
    for g, line in enumerate(a.confusion):
        print(f"    {g}: " + " ".join(f"{n:4d}" for n in line))
    exams = sorted({r["scan"] for r in rows})
    by_exam = {e: ([r["expert"] for r in rows if r["scan"] == e], [t for r, t in zip(rows, tool) if r["scan"] == e])
               for e in exams}
    positive = [e for e in exams if max(by_exam[e][0]) >= 2]
    negative = [e for e in exams if max(by_exam[e][0]) < 2]
    found = sum(max(by_exam[e][1]) >= 2 for e in positive)
    clear = sum(max(by_exam[e][1]) < 2 for e in negative)
    print(f"  per exam, any grade ≥ 2: {found}/{len(positive)} detected, {clear}/{len(negative)} clear")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=None, help="write the per-vertebra table here (CSV)")
    args = parser.parse_args(argv)
    scans = graded_scans()
    if not scans:
        print(f"no graded development scans in {graded_data_dir()} (see prepare_graded_set.py)")
        return 1
    started = time.perf_counter()
    rows = []
    for scan in scans:
        t = time.perf_counter()
        rows += measure(scan)
        print(f"{scan.name}: {time.perf_counter() - t:.1f} s")
    graded = [r for r in rows if r["graded"]]
    skipped = [r for r in rows if not r["graded"]]
    print(f"\n{len(scans)} scans, {len(rows)} expert-graded vertebrae T4–L5, {len(graded)} graded by the tool "
          f"({len(skipped)} not: incomplete or not segmented), {time.perf_counter() - started:.0f} s")
    report("genant_grade, published boundaries", graded, [r["tool"] for r in graded])
    report("quantitative_grade (SPEC §4)", graded, [r["quantitative"] for r in graded])
    if len({r["scan"] for r in graded}) >= 3:
        print("\nleave-one-scan-out boundaries:")
        report("genant_grade, cross-validated boundaries", graded, cross_validated(graded))
    else:
        print("\ncross-validation needs at least 3 graded scans: not run")
    print("\ndisagreements (expert vs tool):")
    for r in graded:
        if r["tool"] != r["expert"]:
            print(f"  {r['scan']} {r['level']}: expert {r['expert']}, tool {r['tool']} ({r['basis']}); shape "
                  f"{r['shape_loss']:.2f} (wedge {r['wedge_loss']:.2f}, middle {r['middle_loss']:.2f}, crush "
                  f"{r['crush_loss']:.2f}), size {r['size_loss']:.2f}, area {r['area_loss']:.2f}, endplate "
                  f"{r['endplate_depression']:.2f}, references {r['references'] or '-'}")
    if args.table:
        with open(args.table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
