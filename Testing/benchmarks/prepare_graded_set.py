"""Build the expert-graded development set from a VerSe download (run by hand).

VerSe'19 and VerSe'20 (Sekuboyina et al., Med Image Anal 2021; Löffler et al., Radiol Artif
Intell 2020; CC BY-SA 4.0) publish CTs, vertebra masks and, for VerSe'19, every vertebra's Genant
grade. This script takes

* ``--verse DIR``: a VerSe folder, in the challenge's layout (``rawdata/<subject>/<subject>[_*]_ct.nii.gz``
  and ``derivatives/<subject>/<subject>[_*]_seg-vert_msk.nii.gz``) or flat (both files in
  ``<subject>/``), searched recursively;
* ``--grades CSV``: the grades, one row per vertebra with columns ``subject``, ``vertebra``
  (``T12``, or the VerSe label number) and ``grade`` (0–3), e.g. exported from the published
  grading spreadsheet;

and writes ``--out`` (default: :func:`graded_data.graded_data_dir`): ``grades.csv`` and one folder
per scan with ``ct.nii.gz`` and ``vert_msk.nii.gz`` (hard links where possible, else copies).
Subjects ``sub-verse004`` to ``sub-verse009`` are held out for independent evaluation and never
written. Nothing in the VerSe folder is changed.

    .venv/bin/python Testing/benchmarks/prepare_graded_set.py --verse ~/verse19 --grades grades.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared_data import HELD_OUT_SUBJECTS, graded_data_dir, subject_id  # noqa: E402

VERSE_NAMES = {**{n: f"C{n}" for n in range(1, 8)}, **{n + 7: f"T{n}" for n in range(1, 13)},
               **{n + 19: f"L{n}" for n in range(1, 6)}, 25: "L6", 28: "T13"}
"""VerSe label number → level name."""

_SCAN = re.compile(r"^(sub-[A-Za-z]*\d+)(?:_(.*?))?_(ct|seg-vert_msk)\.nii\.gz$")


def find_scans(root: Path) -> dict[str, dict[str, Path]]:
    """Scan name (``sub-verse012``, ``sub-verse409_series1`` for a subject's further scans) →
    ``{"ct": path, "mask": path}`` for every CT or mask file under ``root``."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(root.rglob("*.nii.gz")):
        match = _SCAN.match(path.name)
        if not match:
            continue
        subject, extra, kind = match.groups()
        series = re.search(r"split-(\w+)|(series\d+)", extra or "")
        name = subject if not series else f"{subject}_{series.group(1) or series.group(2)}"
        found.setdefault(name, {})["ct" if kind == "ct" else "mask"] = path
    return found


def read_grades(path: Path) -> dict[str, dict[str, int]]:
    """``subject → {level: grade}`` from a CSV with ``subject``, ``vertebra`` and ``grade``."""
    grades: dict[str, dict[str, int]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            vertebra = row["vertebra"].strip()
            level = VERSE_NAMES.get(int(vertebra), vertebra) if vertebra.isdigit() else vertebra.upper()
            grade = row["grade"].strip()
            if grade in ("", "nan", "NA"):
                continue
            grades.setdefault(row["subject"].strip(), {})[level] = int(float(grade))
    return grades


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verse", type=Path, required=True, help="VerSe download folder")
    parser.add_argument("--grades", type=Path, required=True, help="CSV: subject, vertebra, grade")
    parser.add_argument("--out", type=Path, default=None, help="development set folder")
    args = parser.parse_args(argv)
    out = args.out or graded_data_dir()
    if not args.verse.is_dir():
        print(f"error: {args.verse} is not a folder", file=sys.stderr)
        return 2
    if not args.grades.is_file():
        print(f"error: {args.grades} is not a file", file=sys.stderr)
        return 2
    scans, grades = find_scans(args.verse), read_grades(args.grades)
    rows, written, fractured = [], 0, 0
    for name, files in sorted(scans.items()):
        if subject_id(name) in HELD_OUT_SUBJECTS or name not in grades or set(files) != {"ct", "mask"}:
            continue
        _place(files["ct"], out / name / "ct.nii.gz")
        _place(files["mask"], out / name / "vert_msk.nii.gz")
        written += 1
        for level, grade in grades[name].items():
            rows.append({"subject": name, "vertebra": level, "grade": grade})
            fractured += grade >= 1
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "grades.csv.tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("subject", "vertebra", "grade"))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / "grades.csv.tmp", out / "grades.csv")
    print(f"{written} graded scans ({len(rows)} vertebrae, {fractured} graded ≥ 1) in {out}; "
          f"held out: {', '.join(sorted(HELD_OUT_SUBJECTS))}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
