"""One exam's results folder (SPEC §5): its files, how it is written so that it never looks finished
before it is, its state, and its content read back as the same typed values screening produced.

The folder holds ``vertebrae.csv``, ``muscles.csv``, ``qc.png`` (optional) and ``exam.json``;
``exam.json`` is written last and marks a finished exam, ``error.json`` (cohorts) a failed one.
:func:`publish` writes the files into a hidden staging folder beside them (prefix
:data:`STAGING_PREFIX`), removes the old ``exam.json`` first and moves the new one in last, so a
reader never takes a half-written or mixed folder for a finished exam. :func:`read_finished`
parses the CSV cells by the measurement registry's kinds (numbers, integers, booleans, lists,
text), so features computed from a folder read back equal those computed in memory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io.serialization import FORMULA_TRIGGERS
from .measurements import MUSCLE_TABLE, VERTEBRA_TABLE, Quantity

FINISHED_FILE = "exam.json"
"""Written last: its presence marks a finished exam."""
ERROR_FILE = "error.json"
"""A failed exam's stage and reason (written by cohorts)."""
OUTPUT_FILES = ("vertebrae.csv", "muscles.csv", "qc.png", FINISHED_FILE)
"""The result files, in the order they are moved into place (``exam.json`` last)."""
OPTIONAL_FILES = frozenset({"qc.png"})
"""Result files a run may leave out (``--no-qc``): an older one is removed, never left beside
newer results."""
STAGING_PREFIX = ".vfscreen-partial-"
"""Name prefix of the hidden folder the files are written into before they move into place."""
SEGMENTATION_FOLDER = "segmentation"
"""Sub-folder where TotalSegmentator's label maps are kept for re-runs."""


def exam_state(folder: Path) -> str:
    """``done`` (``exam.json`` present), ``failed`` (``error.json`` present) or ``todo``."""
    folder = Path(folder)
    if (folder / FINISHED_FILE).is_file():
        return "done"
    if (folder / ERROR_FILE).is_file():
        return "failed"
    return "todo"


def publish(out_dir, write: Callable[[Path], None]) -> dict[str, Path]:
    """Create ``out_dir`` when absent, let ``write(staging)`` write the result files (any of
    :data:`OUTPUT_FILES`) into a fresh staging folder inside it, then move them into place:
    the old ``exam.json`` is removed first and the new one moved in last; an optional file not
    written this time is removed. Returns the paths written; the staging folder is always removed."""
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        write(staging)
        (out_dir / FINISHED_FILE).unlink(missing_ok=True)
        written = {}
        for name in OUTPUT_FILES:
            if (staging / name).exists():
                os.replace(staging / name, out_dir / name)
                written[name] = out_dir / name
            elif name in OPTIONAL_FILES:
                (out_dir / name).unlink(missing_ok=True)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(folder: Path) -> None:
    """The staging folders and hidden temporary files (``.name.tmp-…``) of a run killed while
    writing into ``folder`` or its segmentation sub-folder."""
    for place in (Path(folder), Path(folder) / SEGMENTATION_FOLDER):
        if not place.is_dir():
            continue
        for entry in place.iterdir():
            if entry.name.startswith(STAGING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(".") and ".tmp-" in entry.name:
                entry.unlink(missing_ok=True)


@dataclass(frozen=True)
class FinishedExam:
    """A finished exam read back: ``exam`` the content of ``exam.json``; ``vertebrae`` and
    ``muscles`` the rows of the two tables with typed values (as :func:`parse_cell` gives them)."""

    exam: dict
    vertebrae: list[dict]
    muscles: list[dict]


def read_finished(folder) -> FinishedExam:
    """The results of a finished exam folder.

    Raises:
        FileNotFoundError: the folder has no ``exam.json`` (the exam is not finished).
        ValueError: ``exam.json`` is not JSON.
    """
    folder = Path(folder)
    exam = json.loads((folder / FINISHED_FILE).read_text(encoding="utf-8"))
    return FinishedExam(exam, _read_table(folder / "vertebrae.csv", VERTEBRA_TABLE),
                        _read_table(folder / "muscles.csv", MUSCLE_TABLE))


def _read_table(path: Path, table: Sequence[Quantity]) -> list[dict]:
    if not path.is_file():
        return []
    kinds = {q.key: q.kind for q in table}
    with path.open(newline="", encoding="utf-8") as handle:
        return [{key: parse_cell(text, kinds.get(key, "text")) for key, text in row.items()}
                for row in csv.DictReader(handle)]


def parse_cell(text: str | None, kind: str):
    """A cell of a results table as the value it was written from
    (:func:`..io.serialization.csv_cell`): ``number`` → float (NaN when empty), ``integer`` → int
    (None when empty), ``boolean`` → True/False (None when empty), ``list`` → list of texts
    (``;``-separated), ``text`` → the text without the quote that protected it from spreadsheet
    formulas. A number cell that is not a number reads as NaN."""
    text = "" if text is None else text
    if kind == "number":
        try:
            return float(text) if text else math.nan
        except ValueError:
            return math.nan
    if kind == "integer":
        try:
            return int(text) if text else None
        except ValueError:
            return None
    if kind == "boolean":
        return {"true": True, "false": False}.get(text.strip().lower())
    if kind == "list":
        return [_unquoted(part) for part in text.split(";")] if text else []
    return _unquoted(text)


def _unquoted(text: str) -> str:
    """``text`` without the ``'`` that :func:`..io.serialization.neutralised` put before a formula
    trigger."""
    return text[1:] if text.startswith("'") and text[1:2] in FORMULA_TRIGGERS and text[1:2] else text
