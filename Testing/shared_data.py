"""Where the test data outside the repository is: the one helper the tests and benchmarks use.

* the TotalSegmentator example data (SPEC §7): ``../shared/data/totalsegmentator-example`` beside
  the repository, or wherever ``VFS_SHARED_DATA`` points (that folder itself);
* the expert-graded development CTs, for the agreement tests and benchmark.

The graded development set (VerSe scans with their Genant grades, see ``docs/validation.md``) is
never part of the repository: ``Testing/benchmarks/prepare_graded_set.py`` builds it from a
VerSe download, into the folder ``VFS_GRADED_DATA`` names (default ``../shared/data/verse-graded``
beside the repository). Its layout: ``grades.csv`` (``subject,vertebra,grade``) and one folder per
subject with ``ct.nii.gz`` and ``vert_msk.nii.gz`` (VerSe labels).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

HELD_OUT_SUBJECTS = frozenset(f"sub-verse{n:03d}" for n in range(4, 10))
"""VerSe subjects kept for independent evaluation: never used to develop, tune or test."""


def shared_data_dir() -> Path:
    """Folder of the TotalSegmentator example data (SPEC §7); it may not exist."""
    override = os.environ.get("VFS_SHARED_DATA")
    if override:
        return Path(override).expanduser().resolve()
    return (REPO_ROOT / ".." / "shared" / "data" / "totalsegmentator-example").resolve()


def graded_data_dir() -> Path:
    """The graded development set's folder (it may not exist)."""
    override = os.environ.get("VFS_GRADED_DATA")
    if override:
        return Path(override).expanduser().resolve()
    return (REPO_ROOT / ".." / "shared" / "data" / "verse-graded").resolve()


def subject_id(name: str) -> str:
    """The VerSe subject of a scan name (``sub-verse409_series1`` → ``sub-verse409``)."""
    return name.split("_")[0]


@dataclass(frozen=True)
class GradedScan:
    """One graded CT: its name, files and the experts' grade per level (``T12`` → 0–3)."""

    name: str
    ct: Path
    vertebrae: Path
    grades: dict


def graded_scans(folder: Path | None = None) -> list[GradedScan]:
    """The development set's scans that have a CT, a mask and grades, held-out subjects left out
    (sorted by name); empty when the folder or its ``grades.csv`` is absent."""
    folder = graded_data_dir() if folder is None else Path(folder)
    table = folder / "grades.csv"
    if not table.is_file():
        return []
    grades: dict[str, dict[str, int]] = {}
    with open(table, newline="") as handle:
        for row in csv.DictReader(handle):
            grades.setdefault(row["subject"], {})[row["vertebra"].upper()] = int(row["grade"])
    scans = []
    for name in sorted(grades):
        if subject_id(name) in HELD_OUT_SUBJECTS:
            continue
        ct, mask = folder / name / "ct.nii.gz", folder / name / "vert_msk.nii.gz"
        if ct.is_file() and mask.is_file():
            scans.append(GradedScan(name, ct, mask, grades[name]))
    return scans
