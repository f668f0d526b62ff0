"""Screening a cohort: many exams, resumable, on one machine or a Dask cluster (``vfscreen cohort``).

:func:`run_cohort` is the engine behind ``vfscreen cohort`` and batch use from Slicer's Python
console. It finds the exams (:func:`find_exams`), screens each one with
:func:`.screening.screen_exam` into its own SPEC §5 folder, and then writes the cohort's tables.

Inputs (:func:`find_exams`):

* a **folder**: every CT image file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``,
  ``.mhd``) directly in it is one exam, and so is every sub-folder that holds a DICOM series; the
  exam ID is the file's name without its suffix (or the sub-folder's name), in Unicode NFC form.
  Exam IDs follow the one rule of :func:`checked_exam_id` (:data:`EXAM_ID_RULE`; the same rule as
  ``vfscreen screen --exam-id``) and are unique ignoring case and Unicode form (their folders must be
  distinct on every file system). Segmentations are found by name beside it: ``<exam>_seg`` or
  ``<exam>_total`` (TotalSegmentator ``total`` ids) or ``<exam>.seg.nrrd`` (a Slicer
  segmentation), and ``<exam>_body`` or ``<exam>_vertebrae_body`` (the ``vertebrae_body`` map),
  with any of the image suffixes. Such files are never exams themselves. Exams without a
  segmentation are segmented by TotalSegmentator.
* a **CSV manifest** with a ``ct`` column and optional ``exam_id``, ``seg``, ``body_seg``,
  ``labels`` (``totalsegmentator`` / ``verse``) and ``series`` columns; relative paths are relative
  to the manifest's folder. Every other column (a label, ``age``, ``sex``...) is passed through
  to ``features.csv``. A manifest that repeats a column or an exam ID (ignoring case and Unicode
  form) is refused with one sentence naming them.

Fault injection (tests only): :data:`fault_hook`, when set, is called at the engine's write points
and may raise, e.g. ``OSError(errno.ENOSPC, ...)`` to act out a full disk.

Outputs in ``OUT``:

* ``exams/<exam_id>/``: the exam's SPEC §5 files (``exam.json`` last: it marks a finished
  exam), TotalSegmentator's label maps under ``segmentation/`` when it ran, or ``error.json``
  (stage and one-sentence reason) when the exam failed;
* ``features.csv``: one row per finished exam, in input order: ``exam_id``, the manifest's
  pass-through columns, ``features_version`` and the :mod:`.features` columns;
* ``errors.csv``: ``exam_id, stage, reason, kind`` for every failed exam; ``kind`` is ``input``
  (the exam itself cannot be screened: a re-run skips it) or ``environment`` (the machine failed
  it: disk full or over quota, permission denied, read-only file system, out of memory, a killed
  worker, a missing dependency; a plain re-run screens it again);
* ``predictions.csv`` (with a model): ``exam_id, model, probability, threshold, positive,
  demonstration, imputed_features`` per finished exam; a re-run with another ``--model`` applies
  it to the finished exams from their results, without screening them again;
* ``cohort.json``: the run summary (counts, time, exams per minute, peak memory per worker);
* ``cohort.log``: one line per exam and run, appended.

Robustness: a failing exam is recorded and never stops the others. A re-run skips finished exams
and exams whose input failed (``retry_failed=True`` tries those again too) and screens again the
exams that failed because of the environment, so a finished cohort re-runs in seconds and rewrites
none of its exam folders or tables. A folder exam whose file name cannot be an exam ID (see
:func:`find_exams`) is recorded as an input failure, and the others are screened. When even the
exam's ``error.json`` cannot be written (a full disk), its failure is still counted and listed in
``errors.csv`` if that can be written, and a re-run screens it again. The tables and
``cohort.json`` are written atomically; when that fails (a full disk) :func:`run_cohort` raises an
:class:`.errors.InputError` with one sentence, and the previous tables stay as they were. A log line
that cannot be written is dropped (never a traceback on the console).

Exit status of ``vfscreen cohort``: 0 when every exam is finished; 1 when any exam failed, in this
run or an earlier one (``errors.csv`` lists them), unless ``--allow-failures`` is given and every
failure is of kind ``input`` (pipelines that read ``errors.csv``); environment failures exit 1
even then, since a re-run would screen them. 2 for bad inputs or an unusable output folder
(one sentence on stderr, as for every command). Every file is written atomically, each
exam is screened under an exclusive lock on its folder (``fcntl.flock``, where the platform has
it) and its staging leftovers from a killed run are removed before it starts again, so killing a
run at any moment and re-running it ends with every exam done exactly once.

Interrupting a run (Ctrl-C, SIGINT) ends it as cleanly in parallel as in this process: the
exams being screened stop, their staging leftovers are removed, the tables are written for the
finished exams and :func:`run_cohort` raises ``KeyboardInterrupt`` (``vfscreen`` prints one
sentence and exits 130); a re-run keeps the finished exams and screens the others. A local
cluster's worker processes never receive the Ctrl-C themselves (it is blocked in them), so none
of them prints a traceback: this process closes the cluster, quietly, which stops them within
a few seconds.

Parallel work: ``workers=1`` screens in this process, one exam after the other. ``workers=N``
starts a local Dask cluster of N single-threaded worker processes; ``scheduler=ADDRESS`` uses an
existing Dask distributed cluster (``dask scheduler`` / ``dask worker``), whose workers must see
the inputs and ``OUT`` under the same paths (a shared file system) and have this package installed.
With a cluster, an exam that needs TotalSegmentator is two tasks: segmentation, which can ask for
worker resources (e.g. ``{"GPU": 1}``, given to workers by ``dask worker --resources GPU=1``), and
measurement, which can ask for others; Dask places and orders them.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from . import levels as lv
from .errors import DependencyError, InputError, SegmentationError, VFSError
from .model.features import FEATURE_NAMES, FEATURE_VERSION, exam_features, read_exam_folder
from .io.files import IMAGE_SUFFIXES, atomic_write_text, split_image_suffix
from .exam.screening import exam_id_of
from .io.serialization import csv_text

EXAMS_FOLDER = "exams"
FEATURES_FILE = "features.csv"
ERRORS_FILE = "errors.csv"
PREDICTIONS_FILE = "predictions.csv"
"""The model's output per finished exam, when the exams were screened with a model."""
PREDICTION_COLUMNS = ("exam_id", "model", "probability", "threshold", "positive", "demonstration", "imputed_features")
SUMMARY_FILE = "cohort.json"
LOG_FILE = "cohort.log"
ERROR_FILE = "error.json"
"""In an exam's folder: marks a failed exam (stage and reason)."""
FINISHED_FILE = "exam.json"
"""In an exam's folder: marks a finished exam (written last by :meth:`.ScreeningResult.write`)."""

SEG_SUFFIXES = ("_seg", "_total")
BODY_SUFFIXES = ("_vertebrae_body", "_body")
MANIFEST_COLUMNS = ("exam_id", "ct", "seg", "body_seg", "labels", "series")
"""Manifest columns read by the engine; every other column is passed through to ``features.csv``."""
ERROR_COLUMNS = ("exam_id", "stage", "reason", "kind")
INPUT_FAILURE = "input"
"""Failure kind: the exam itself cannot be screened (a re-run skips it unless told to retry)."""
ENVIRONMENT_FAILURE = "environment"
"""Failure kind: the machine failed the exam (disk full, permissions, memory, a killed worker);
a plain re-run screens it again."""
EXAM_ID_MAX_BYTES = 200
"""The longest exam ID, in bytes of UTF-8 (file systems allow 255 per name; the rest is for
suffixes such as ``_vfscreen`` and the writers' hidden temporary names)."""
EXAM_ID_RULE = (f"letters and digits of any script, . _ + - and single inner spaces, starting with a letter or digit, "
                f"not ending with '.' or a space, at most {EXAM_ID_MAX_BYTES} bytes, and not a Windows device name such "
                f"as CON or NUL")
"""The exam-ID rule in words, as the refusals say it (see :func:`checked_exam_id`)."""
_WINDOWS_DEVICES = frozenset(["con", "prn", "aux", "nul", *(f"{port}{n}" for port in ("com", "lpt")
                                                              for n in range(1, 10))])
_ENVIRONMENT_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS")
                                if hasattr(errno, name))

fault_hook: Callable[[str, str], None] | None = None
"""Test seam: when set, called as ``fault_hook(point, exam_id)`` just before the engine writes at
``point``: ``"exam"`` (screening one exam, in the process that screens it; ``workers=1`` only),
``"error"`` (an exam's ``error.json``), ``"tables"`` (the cohort's CSV tables), ``"summary"``
(``cohort.json``) and ``"log"`` (a line of ``cohort.log``; ``exam_id`` empty for the last three).
It may raise, e.g. ``OSError(errno.ENOSPC, "No space left on device")`` to act out a full disk.
None (always, outside tests): no effect."""

log = logging.getLogger("vfscreen.cohort")


@dataclass(frozen=True)
class CohortExam:
    """One exam of a cohort: its ID, CT (file or DICOM folder) and optional segmentations
    (paths as text), label convention (None: the cohort's), DICOM series, and the manifest's
    pass-through ``columns`` as ``(name, value)`` pairs. ``refused``: why a folder exam cannot
    be screened (its name cannot be an exam ID): it is then recorded as an input failure, with
    no folder of its own, and never screened."""

    exam_id: str
    ct: str
    seg: str | None = None
    body_seg: str | None = None
    convention: str | None = None
    series_uid: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    refused: str | None = None


@dataclass(frozen=True)
class CohortSettings:
    """How every exam of a cohort is screened (the :func:`.screening.screen_exam` options)."""

    convention: str = "totalsegmentator"
    levels: tuple[str, ...] = lv.SCREENING_LEVELS
    quality: str = "normal"
    device: str = "cpu"
    segment_body: bool = False
    qc: bool = True
    model: str | None = None
    """Fracture model file (or ``"demo"``) applied to every exam; its output goes to ``exam.json``."""


@dataclass
class ExamOutcome:
    """What happened to one exam in one run. ``status``: ``done``, ``failed``, ``skipped``
    (finished or failed before: nothing to do) or ``segmented`` (first of two cluster tasks).
    ``worker`` names the process (host:pid) and ``worker_peak_rss_mib`` its peak memory so far."""

    exam_id: str
    status: str
    stage: str = ""
    reason: str = ""
    seconds: float = 0.0
    worker: str = ""
    worker_peak_rss_mib: float = float("nan")
    segmented_on: str = ""
    """The worker that ran TotalSegmentator, when a cluster task of its own did."""
    kind: str = ""
    """Of a failure: ``input`` or ``environment`` (see the module docstring)."""
    recorded: bool = True
    """Of a failure: False when its ``error.json`` could not be written (a full disk)."""


@dataclass
class CohortSummary:
    """The run summary (also written as ``cohort.json``)."""

    exams: int
    done: int
    failed: int
    unfinished: int
    screened_now: int
    failed_now: int
    skipped_now: int
    seconds: float
    workers: str
    peak_rss_mib_per_worker: dict[str, float] = field(default_factory=dict)
    out: str = ""
    failed_environment: int = 0
    """Of ``failed``: the exams that failed because of the environment (a re-run retries them)."""

    screening_seconds: float = float("nan")
    """From the run's start to its last screened exam: the time :attr:`exams_per_minute` divides by."""

    @property
    def exams_per_minute(self) -> float:
        """Exams screened per minute in this run (failures, often instant, are no throughput), the
        rate the last progress line showed; NaN when none was screened."""
        if not self.screened_now or not self.screening_seconds > 0:
            return float("nan")
        return 60.0 * self.screened_now / self.screening_seconds

    def to_dict(self) -> dict:
        return {
            "software": {"name": "VertebralFractureScreen", "version": __version__},
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "out": self.out,
            "exams": self.exams, "done": self.done, "failed": self.failed,
            "failed_environment": self.failed_environment, "unfinished": self.unfinished,
            "this_run": {"screened": self.screened_now, "failed": self.failed_now, "skipped": self.skipped_now,
                         "seconds": round(self.seconds, 3),
                         "exams_per_minute": None if math.isnan(self.exams_per_minute)
                         else round(self.exams_per_minute, 2),
                         "workers": self.workers,
                         "peak_rss_mib_per_worker": {k: round(v, 1) for k, v in self.peak_rss_mib_per_worker.items()}},
        }

    def text(self) -> str:
        rate = "" if math.isnan(self.exams_per_minute) else f", {self.exams_per_minute:.1f} exams/min"
        environment = (f" ({self.failed_environment} because of the environment: a re-run retries "
                       f"{'them' if self.failed_environment > 1 else 'it'})" if self.failed_environment else "")
        lines = [f"{self.exams} exams: {self.done} done, {self.failed} failed{environment}"
                 + (f", {self.unfinished} unfinished" if self.unfinished else ""),
                 f"this run: {self.screened_now} screened, {self.failed_now} failed, {self.skipped_now} skipped "
                 f"in {self.seconds:.1f} s{rate} ({self.workers})"]
        if self.peak_rss_mib_per_worker:
            peak = max(self.peak_rss_mib_per_worker.values())
            lines.append(f"peak memory per worker: {peak:.0f} MiB (largest of {len(self.peak_rss_mib_per_worker)})")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Finding the exams
# ------------------------------------------------------------------------------------------------


def _role(stem: str, suffix: str) -> tuple[str, str]:
    """``(role, exam stem)`` of an image file: role ``ct``, ``seg`` or ``body_seg``."""
    if suffix == ".seg.nrrd":
        return "seg", stem
    lower = stem.lower()
    for role, endings in (("body_seg", BODY_SUFFIXES), ("seg", SEG_SUFFIXES)):
        for ending in endings:
            if lower.endswith(ending) and len(stem) > len(ending):
                return role, stem[: -len(ending)]
    return "ct", stem


def find_exams(inputs) -> list[CohortExam]:
    """The exams of a folder or a CSV manifest (rules in the module docstring), sorted by exam ID
    for a folder and in row order for a manifest.

    Raises:
        InputError: the inputs do not exist, hold no exam, or a manifest is malformed (missing
            ``ct`` column, empty or unsafe or duplicate exam IDs).
    """
    path = Path(inputs).expanduser().absolute()  # workers in other folders (or machines) need absolute paths
    if not path.exists():
        raise InputError(f"cohort inputs {path} do not exist.")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(f"cohort inputs must be a folder of exams or a CSV manifest, not {path.name}.")
        return read_manifest(path)
    from .io.dicom import is_dicom_folder

    if is_dicom_folder(path):
        raise InputError(f"{path} is one DICOM series: give the folder that holds the exams' series folders, "
                         "or screen it with 'vfscreen screen'.")
    found: dict[str, dict[str, str]] = {}
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if is_dicom_folder(entry.path):
                    found.setdefault(entry.name, {})["ct"] = entry.path
                continue
            parts = split_image_suffix(entry.name)
            if parts is None:
                continue
            role, stem = _role(*parts)
            slot = found.setdefault(stem, {})
            if role in slot:
                raise InputError(f"two files give the {role.replace('_', ' ')} of exam {stem}: "
                                 f"{Path(slot[role]).name} and {entry.name}; keep one or use a CSV manifest.")
            slot[role] = entry.path
    exams = []
    for stem, files in sorted(found.items()):
        if "ct" not in files:
            log.warning("no CT for the segmentation %s: ignored",
                        ", ".join(_printable(Path(p).name) for p in files.values()))
            continue
        try:  # one exam whose name cannot be an exam ID is refused alone: the others are screened
            exam_id, refused = checked_exam_id(stem), None
        except InputError:
            exam_id = _printable(stem)
            refused = (f"its exam ID {exam_id!r} (from {_printable(Path(files['ct']).name)!r}) cannot name a "
                       f"folder: rename it; an exam ID is {EXAM_ID_RULE}.")
        exams.append(CohortExam(exam_id, files["ct"], files.get("seg"), files.get("body_seg"), refused=refused))
    for group in _colliding([e for e in exams if e.refused is None]):
        names = ", ".join(sorted(Path(e.ct).name for e in group))
        exams = [replace(e, refused=f"the exams {names} differ only in case or Unicode form, and so would their "
                                    "folders on macOS and Windows: rename all but one.") if e in group else e
                 for e in exams]
    if not exams:
        raise InputError(f"no exam found in {path}: expected CT images ({', '.join(IMAGE_SUFFIXES)}) or DICOM "
                         "series folders, or give a CSV manifest.")
    if all(e.refused for e in exams):
        more = f" (and {len(exams) - 1} more)" if len(exams) > 1 else ""
        raise InputError(f"no exam in {path} can be screened{more}: {exams[0].refused}")
    return exams


def _printable(text: str) -> str:
    """``text`` for a table or a message: undecodable bytes of a file name become U+FFFD and
    control characters ``?``."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


def _folded(exam_id: str) -> str:
    """The key under which two exam IDs name the same folder on some file system (case and
    Unicode form ignored, as on macOS and Windows)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", exam_id).casefold())


def _colliding(exams: Iterable[CohortExam]) -> list[list[CohortExam]]:
    """Groups of exams whose IDs name the same folder on some file system (:func:`_folded`)."""
    groups: dict[str, list[CohortExam]] = {}
    for exam in exams:
        groups.setdefault(_folded(exam.exam_id), []).append(exam)
    return [group for group in groups.values() if len(group) > 1]


def exams_from_files(cts: Sequence) -> list[CohortExam]:
    """Exams from a list of CT files or DICOM folders (e.g. picked in Slicer); each one's
    segmentations are found beside it by the folder rule's names (``<exam>_seg``, ``<exam>_total``,
    ``<exam>.seg.nrrd``, ``<exam>_body``, ``<exam>_vertebrae_body``).

    Raises:
        InputError: a CT does not exist, or two CTs have the same exam ID.
    """
    exams = []
    for ct in cts:
        path = Path(ct).expanduser().absolute()
        if not path.exists():
            raise InputError(f"CT {path} does not exist.")
        stem = path.name if path.is_dir() else exam_id_of(path)
        found: dict[str, str] = {}
        for sibling in sorted(path.parent.iterdir()):
            sibling_parts = split_image_suffix(sibling.name) if sibling.is_file() else None
            if sibling_parts is None or sibling == path:
                continue
            role, sibling_stem = _role(*sibling_parts)
            if sibling_stem == stem and role != "ct":
                found.setdefault(role, str(sibling))
        exams.append(CohortExam(checked_exam_id(stem, hint=f" ({path})"), str(path), found.get("seg"),
                                found.get("body_seg")))
    duplicates = sorted(group[0].exam_id for group in _colliding(exams))
    if duplicates:
        raise InputError(f"several CTs have the exam ID {', '.join(duplicates)} (ignoring case and Unicode form); "
                         "rename them or use a CSV manifest.")
    return exams


def checked_exam_id(text: str, what: str = "exam ID", hint: str = "") -> str:
    """``text`` in Unicode NFC form when it can be an exam ID, else a one-sentence
    :class:`.errors.InputError` (``"{what} {text!r} is not a plain name, so it cannot name a
    folder: ...{hint}."``).

    The one rule for every exam ID: ``vfscreen screen --exam-id`` (and the ID taken from the CT's
    file name when it names the default output folder), the IDs of a folder cohort, of a manifest
    and of a list of CT files. An exam ID names a folder and a cell of every table, so it is one
    plain name that every file system (Linux, macOS, Windows) keeps as it is:

    * letters and digits of any script (with the combining marks of its letters), ``. _ + -`` and
      single spaces between them (``CT abdomen``: file names have them);
      non-ASCII names are exam IDs (``müller``, ``東京``), in NFC form, so that a name is the same ID
      whichever Unicode form the file system reports;
    * starting with a letter or digit: never empty, ``.`` or ``..``, hidden (``.x``), an option
      (``-x``) or a spreadsheet formula (``=x``, ``+x``, ``@x``);
    * not ending with ``.`` or a space (Windows drops them) and not a Windows device name (``CON``, ``PRN``,
      ``AUX``, ``NUL``, ``COM1``-``COM9``, ``LPT1``-``LPT9``, also before a ``.``);
    * at most :data:`EXAM_ID_MAX_BYTES` (200) bytes in UTF-8.

    Hence no path separator (``/``, ``\\``), tab or double space, control character, undecodable byte of a file
    name or character that some file system forbids (``: * ? " < > |``). Within one cohort the
    IDs must also differ in more than case and Unicode form (their folders would be one on macOS
    and Windows)."""
    normal = unicodedata.normalize("NFC", text)
    plain = (normal[:1].isalnum() and not normal.endswith((".", " ")) and "  " not in normal
             and all(c.isalnum() or c in "._+- " or unicodedata.category(c).startswith("M") for c in normal)
             and normal.split(".")[0].casefold() not in _WINDOWS_DEVICES)
    if not plain or len(normal.encode("utf-8")) > EXAM_ID_MAX_BYTES:
        raise InputError(f"{what} {text!r} is not a plain name, so it cannot name a folder: an exam ID is "
                         f"{EXAM_ID_RULE}{hint}.")
    return normal


def read_manifest(path) -> list[CohortExam]:
    """The exams of a CSV manifest (see the module docstring)."""
    path = Path(path).expanduser().absolute()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            columns = [c.strip() for c in next(reader, [])]
            lines = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read the manifest {path}: {getattr(error, 'strerror', None) or error}.") from None
    repeated = sorted(name for name, count in Counter(c for c in columns if c).items() if count > 1)
    if repeated:  # a dict of the row would silently keep the last one
        raise InputError(f"the manifest {path} has the column{'s' if len(repeated) > 1 else ''} "
                         f"{', '.join(_printable(c) for c in repeated)} more than once: keep one of each.")
    if "ct" not in columns:
        raise InputError(f"the manifest {path} has no 'ct' column (columns: {', '.join(columns) or 'none'}).")
    rows = []
    for number, cells in enumerate(lines, start=2):
        if len(cells) > len(columns) and any(c.strip() for c in cells[len(columns):]):
            raise InputError(f"line {number} of the manifest {path} has more cells than its header has columns.")
        rows.append({name: cell.strip() for name, cell in zip(columns, cells) if name})
    base = path.parent
    passthrough = [c for c in columns if c not in MANIFEST_COLUMNS and c]
    exams, seen = [], {}
    for number, row in enumerate(rows, start=2):
        if not any(row.values()):
            continue
        if not row.get("ct"):
            raise InputError(f"the manifest {path} has no CT in line {number}.")

        def resolve(text):
            return None if not text else str((base / Path(text).expanduser()))

        ct = resolve(row["ct"])
        exam_id = checked_exam_id(row.get("exam_id") or exam_id_of(ct), hint=f" (line {number} of {path})")
        seen.setdefault(_folded(exam_id), []).append((exam_id, number))
        convention = row.get("labels") or None
        if convention not in (None, "totalsegmentator", "verse"):
            raise InputError(f"line {number} of {path}: labels must be totalsegmentator or verse, not {convention!r}.")
        exams.append(CohortExam(exam_id, ct, resolve(row.get("seg")), resolve(row.get("body_seg")), convention,
                                row.get("series") or None, tuple((c, row.get(c, "")) for c in passthrough)))
    repeated_ids = [places for places in seen.values() if len(places) > 1]
    if repeated_ids:
        def where(places):
            names = " / ".join(dict.fromkeys(name for name, _ in places))
            numbers = [str(number) for _, number in places]
            return f"{names} in lines {', '.join(numbers[:-1])} and {numbers[-1]}"

        raise InputError(f"the manifest {path} repeats exam ID{'s' if len(repeated_ids) > 1 else ''} "
                         f"{'; '.join(where(p) for p in repeated_ids)} (ignoring case and Unicode form): "
                         "exam IDs must be unique.")
    if not exams:
        raise InputError(f"the manifest {path} lists no exam.")
    return exams


# ------------------------------------------------------------------------------------------------
# One exam (runs in a worker)
# ------------------------------------------------------------------------------------------------


def exam_folder(out, exam_id: str) -> Path:
    """The folder of one exam's results inside the cohort output ``out``."""
    return Path(out) / EXAMS_FOLDER / exam_id


def exam_state(folder: Path) -> str:
    """``done`` (``exam.json`` present), ``failed`` (``error.json`` present) or ``todo``."""
    if (folder / FINISHED_FILE).is_file():
        return "done"
    if (folder / ERROR_FILE).is_file():
        return "failed"
    return "todo"


def _read_error(folder: Path) -> dict:
    """An exam's ``error.json`` with its ``kind`` (files of earlier versions have none: a failed
    cluster worker was the environment, anything else the input)."""
    try:
        error = json.loads((folder / ERROR_FILE).read_text(encoding="utf-8"))
        if not isinstance(error, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        error = {"stage": "unknown", "reason": "its error.json cannot be read."}
    if error.get("kind") not in (INPUT_FAILURE, ENVIRONMENT_FAILURE):
        error["kind"] = ENVIRONMENT_FAILURE if error.get("stage") == "worker" else INPUT_FAILURE
    return error


def _to_screen(folder: Path, retry_failed: bool) -> bool:
    """Whether a run screens the exam of ``folder``: not finished, and not failed by its input
    (unless ``retry_failed``)."""
    state = exam_state(folder)
    if state == "done":
        return False
    return state == "todo" or retry_failed or _read_error(folder)["kind"] == ENVIRONMENT_FAILURE


@contextlib.contextmanager
def _exclusive(folder: Path):
    """Hold an exclusive lock on the exam's folder: a second process (an orphaned worker of a
    killed run, a concurrent run) waits, then finds the exam finished. The operating system drops
    the lock when its holder dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs must not overlap there
        yield
        return
    with open(folder / ".lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path) -> None:
    """Staging folders and temporary files of a run that was killed while writing."""
    for place in (folder, folder / "segmentation"):
        if not place.is_dir():
            continue
        for entry in place.iterdir():
            if entry.name.startswith(".vfscreen-partial-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(".") and ".tmp-" in entry.name:
                entry.unlink(missing_ok=True)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _peak_rss_mib() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20  # kB on Linux, bytes on macOS


def _fault(point: str, exam_id: str = "") -> None:
    if fault_hook is not None:
        fault_hook(point, exam_id)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _stage_of(error: BaseException) -> str:
    if isinstance(error, (DependencyError, SegmentationError)):
        return "segmentation"
    if isinstance(error, VFSError):
        return "input"
    return "internal"


def _reason_of(error: BaseException) -> str:
    if isinstance(error, VFSError):
        return str(error)
    if isinstance(error, MemoryError):
        return "out of memory while screening this exam."
    if isinstance(error, OSError):
        return f"{error.strerror or error} ({error.filename or 'file system'})."
    return f"internal error ({type(error).__name__}: {error}); please report it."


def _causes(error: BaseException):
    """``error`` and the errors it was raised from or while handling (a one-sentence
    :class:`.errors.InputError` raised ``from None`` still keeps its ``OSError`` as context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _kind_of(error: BaseException) -> str:
    """``environment`` when the machine, not the exam, failed: a full disk or quota, permissions
    (an input file that exists but may not be read, a folder that may not be written: the user
    fixes them without changing the exam), a read-only file system, memory, a missing dependency,
    a killed worker; else ``input``."""
    for cause in _causes(error):
        if isinstance(cause, (MemoryError, DependencyError)) or type(cause).__name__ == "KilledWorker":
            return ENVIRONMENT_FAILURE
        if _environment_os_error(cause):
            return ENVIRONMENT_FAILURE
    return INPUT_FAILURE


def _environment_os_error(error: BaseException) -> bool:
    return isinstance(error, PermissionError) or (isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS)


def _unreadable_input(exam: CohortExam) -> str | None:
    """The first of the exam's input files (CT, segmentations) that exists but that this process
    may not read (a DICOM folder: list), or None."""
    for text in (exam.ct, exam.seg, exam.body_seg):
        if text and os.path.exists(text):
            wanted = os.R_OK | os.X_OK if os.path.isdir(text) else os.R_OK
            if not os.access(text, wanted):
                return text
    return None


def _environment_failure(error: BaseException, exam: CohortExam, folder: Path) -> tuple[str, str]:
    """``(kind, reason)`` of an exam's failure. A permission problem is the environment's, whether
    the reader kept its ``PermissionError`` (then the reason is that error's own sentence, which
    the reader's may have hidden behind e.g. "the file is corrupt") or the file or folder is
    found unreadable or unwritable afterwards."""
    reason = _reason_of(error)
    for cause in _causes(error):
        if isinstance(cause, OSError) and _environment_os_error(cause):
            if cause.strerror and cause.strerror not in reason:
                reason = _reason_of(cause)
            return ENVIRONMENT_FAILURE, reason
    kind = _kind_of(error)
    if kind == INPUT_FAILURE:
        unreadable = _unreadable_input(exam)
        if unreadable is not None:
            return ENVIRONMENT_FAILURE, f"{os.strerror(errno.EACCES)} ({unreadable})."
        if not os.access(folder, os.W_OK | os.X_OK):
            kind = ENVIRONMENT_FAILURE  # its folder was made read-only: permissions, not the exam
    return kind, reason


def _fail(folder: Path, exam: CohortExam, stage: str, reason: str, started: float,
          kind: str = INPUT_FAILURE) -> ExamOutcome:
    """Record a failed exam in its ``error.json``; when even that cannot be written (a full disk)
    the outcome says so (``recorded=False``) and the failure is of the environment."""
    outcome = ExamOutcome(exam.exam_id, "failed", stage, reason, 0.0, _worker_name(), _peak_rss_mib(), kind=kind)
    try:
        _fault("error", exam.exam_id)
        _write_json(folder / ERROR_FILE, {"exam_id": exam.exam_id, "stage": stage, "reason": reason, "kind": kind,
                                          "software_version": __version__,
                                          "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except (OSError, VFSError) as error:
        outcome.recorded = False
        if kind == INPUT_FAILURE and _kind_of(error) == ENVIRONMENT_FAILURE:
            outcome.reason = f"{reason.rstrip('.')}; and its {ERROR_FILE} cannot be written: {_reason_of(error)}"
    outcome.seconds = time.perf_counter() - started
    return outcome


def screen_cohort_exam(exam: CohortExam, settings: CohortSettings, out: str, *, retry_failed: bool = False,
                       segment_only: bool = False, after: ExamOutcome | None = None) -> ExamOutcome:
    """Screen one exam of a cohort into ``exam_folder(out, exam.exam_id)``; never raises for the
    exam's own problems (they become ``error.json`` and a ``failed`` outcome).

    ``segment_only`` runs only TotalSegmentator (the first of an exam's two cluster tasks);
    ``after`` is the outcome of that task: when it failed, this one does nothing more."""
    started = time.perf_counter()
    if after is not None and after.status in ("failed", "skipped"):
        return after
    folder = exam_folder(out, exam.exam_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder):
            return _screen_locked(exam, settings, folder, started, retry_failed=retry_failed,
                                  segment_only=segment_only, after=after)
    except (OSError, VFSError, MemoryError) as error:  # its folder or lock: the disk, not the exam
        kind = _kind_of(error)
        outcome = ExamOutcome(exam.exam_id, "failed", "output", _reason_of(error), time.perf_counter() - started,
                              _worker_name(), _peak_rss_mib(), kind=kind, recorded=False)
        if folder.is_dir():
            outcome = _fail(folder, exam, "output", outcome.reason, started, kind)
        return outcome


def _screen_locked(exam: CohortExam, settings: CohortSettings, folder: Path, started: float, *, retry_failed: bool,
                   segment_only: bool, after: ExamOutcome | None) -> ExamOutcome:
    """:func:`screen_cohort_exam` once it holds the lock of the exam's folder."""
    if not _to_screen(folder, retry_failed or after is not None):
        return ExamOutcome(exam.exam_id, "skipped", worker=_worker_name(), worker_peak_rss_mib=_peak_rss_mib())
    _remove_leftovers(folder)
    try:
        _fault("exam", exam.exam_id)
        if segment_only:
            from .exam.screening import SEGMENTATION_FOLDER
            from .segment.totalsegmentator import segment_ct

            segment_ct(exam.ct, folder / SEGMENTATION_FOLDER, quality=settings.quality, device=settings.device,
                       body=settings.segment_body, series_uid=exam.series_uid)
            return ExamOutcome(exam.exam_id, "segmented", seconds=time.perf_counter() - started,
                               worker=_worker_name(), worker_peak_rss_mib=_peak_rss_mib())
        from .exam.screening import screen_exam

        result = screen_exam(exam.ct, seg=exam.seg, body_seg=exam.body_seg,
                             convention=exam.convention or settings.convention, exam_id=exam.exam_id,
                             levels=settings.levels, series_uid=exam.series_uid, out_dir=folder,
                             quality=settings.quality, device=settings.device,
                             segment_body=settings.segment_body, keep_label_maps=False, model=settings.model)
        result.write(folder, qc=settings.qc)
        (folder / ERROR_FILE).unlink(missing_ok=True)
    except Exception as error:  # noqa: BLE001 - one exam's failure never stops the cohort
        kind, reason = _environment_failure(error, exam, folder)
        return _fail(folder, exam, _stage_of(error), reason, started, kind)
    return ExamOutcome(exam.exam_id, "done", seconds=time.perf_counter() - started, worker=_worker_name(),
                       worker_peak_rss_mib=_peak_rss_mib(), segmented_on=after.worker if after is not None else "")


# ------------------------------------------------------------------------------------------------
# The cohort tables
# ------------------------------------------------------------------------------------------------


def _cell(value) -> str:
    """Cohort tables keep 6 significant digits (probabilities near 0 stay distinct)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _csv_text(columns: Sequence[str], rows: Iterable[dict]) -> str:
    return csv_text(columns, rows, cell=_cell)


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds it; True when written."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(path, text)
    return True


def write_tables(exams: Sequence[CohortExam], out, model=None) -> tuple[int, int]:
    """Rebuild ``features.csv`` and ``errors.csv`` (and ``predictions.csv``) from the exam
    folders; returns the numbers of finished and failed exams. Files whose content would not
    change are left alone. ``model``: a :class:`.model.FractureModel` whose predictions replace
    those the exams were screened with (from their features, without screening them again); None:
    each exam's own.

    Raises:
        InputError: a table cannot be written (one sentence; the tables written before stay whole)."""
    done, failed, _ = _write_tables(exams, out, model=model)
    return done, failed


def _write_tables(exams: Sequence[CohortExam], out, unrecorded: dict[str, ExamOutcome] | None = None,
                  model=None) -> tuple[int, int, int]:
    """:func:`write_tables`, also listing the failures of this run whose ``error.json`` could not
    be written (``unrecorded``); returns the numbers of finished, failed and of those failed the
    ones failed by the environment."""
    out = Path(out)
    unrecorded = unrecorded or {}
    passthrough = list(dict.fromkeys(name for exam in exams for name, _ in exam.columns))
    feature_rows, error_rows, prediction_rows = [], [], []
    for exam in exams:
        if exam.refused is not None:
            error_rows.append({"exam_id": exam.exam_id, "stage": "input", "reason": exam.refused,
                               "kind": INPUT_FAILURE})
            continue
        folder = exam_folder(out, exam.exam_id)
        state = exam_state(folder)
        if state == "done":
            try:
                exam_json, vertebrae = read_exam_folder(folder)
                features = exam_features(exam_json, vertebrae)
                output = model.apply(features) if model is not None else (exam_json.get("model") or {})
            except (OSError, ValueError, KeyError) as error:  # a folder edited by hand
                error_rows.append({"exam_id": exam.exam_id, "stage": "features",
                                   "reason": f"cannot read its results: {error}.", "kind": _kind_of(error)})
                continue
            feature_rows.append({"exam_id": exam.exam_id, **dict(exam.columns), "features_version": FEATURE_VERSION,
                                 **features})
            if output.get("probability") is not None:
                prediction_rows.append({"exam_id": exam.exam_id, "model": output.get("name"),
                                        "probability": output["probability"], "threshold": output.get("threshold"),
                                        "positive": "true" if output.get("positive") else "false",
                                        "demonstration": "true" if output.get("demonstration") else "false",
                                        "imputed_features": ";".join(output.get("imputed_features") or [])})
        elif state == "failed":
            error = _read_error(folder)
            error_rows.append({"exam_id": exam.exam_id, "stage": error.get("stage", ""),
                               "reason": error.get("reason", ""), "kind": error["kind"]})
        elif exam.exam_id in unrecorded:
            outcome = unrecorded[exam.exam_id]
            error_rows.append({"exam_id": exam.exam_id, "stage": outcome.stage, "reason": outcome.reason,
                               "kind": ENVIRONMENT_FAILURE})  # no error.json: a re-run screens it again
    try:
        _fault("tables")
        _write_if_changed(out / FEATURES_FILE,
                          _csv_text(["exam_id", *passthrough, "features_version", *FEATURE_NAMES], feature_rows))
        _write_if_changed(out / ERRORS_FILE, _csv_text(ERROR_COLUMNS, error_rows))
        if prediction_rows or (out / PREDICTIONS_FILE).exists():
            _write_if_changed(out / PREDICTIONS_FILE, _csv_text(PREDICTION_COLUMNS, prediction_rows))
    except OSError as error:
        raise InputError(f"cannot write the cohort's tables in {out}: {_reason_of(error)}") from error
    failures = [row for row in error_rows if row["stage"] != "features"]
    return (len(feature_rows), len(failures), sum(row["kind"] == ENVIRONMENT_FAILURE for row in failures))


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------


@dataclass
class CohortProgress:
    """Counts of a running cohort, given to the progress callback after each exam."""

    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.perf_counter)
    last: ExamOutcome | None = None
    last_done_at: float = float("nan")
    """When the last exam was screened (``time.perf_counter``)."""

    def exams_per_minute(self) -> float:
        """Exams screened per minute so far (NaN before the first): failures are left out, since
        one that fails at once would make the rate absurd."""
        elapsed = self.last_done_at - self.started
        return 60.0 * self.done / elapsed if self.done and elapsed > 0 else float("nan")

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped

    @property
    def worked(self) -> int:
        return self.done + self.failed

    def eta_seconds(self) -> float:
        """Seconds left at the rate of the exams screened so far (NaN before the first)."""
        elapsed = time.perf_counter() - self.started
        if not self.worked:
            return float("nan")
        return elapsed / self.worked * (self.total - self.finished)

    def line(self) -> str:
        rate = "" if math.isnan(self.exams_per_minute()) else f" · {self.exams_per_minute():.1f} exams/min"
        eta = self.eta_seconds()
        eta_text = "" if math.isnan(eta) else f" · ETA {_duration(eta)}"
        width = len(str(self.total))
        return (f"[{self.finished:>{width}}/{self.total}] {self.done} done · {self.failed} failed · "
                f"{self.skipped} skipped{rate}{eta_text}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TerminalProgress:
    """A progress line on a terminal (rewritten in place), or a line every 5 % / 30 s in a log."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_print = 0.0
        self._last_share = -1

    def __call__(self, progress: CohortProgress) -> None:
        if self.interactive:
            self.stream.write("\r\033[K" + progress.line())
            if progress.finished == progress.total:
                self.stream.write("\n")
            self.stream.flush()
            return
        share = int(20 * progress.finished / max(progress.total, 1))
        now = time.perf_counter()
        if share != self._last_share or now - self._last_print > 30 or progress.finished == progress.total:
            self._last_share, self._last_print = share, now
            print(progress.line(), file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _parse_resources(text) -> dict[str, float] | None:
    """``"GPU=1,MEMORY=8e9"`` → ``{"GPU": 1.0, "MEMORY": 8e9}``; dicts pass through."""
    if text is None or isinstance(text, dict):
        return text or None
    resources = {}
    for item in str(text).split(","):
        name, _, value = item.partition("=")
        try:
            resources[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"worker resources must be NAME=NUMBER[,NAME=NUMBER], got {text!r}.") from None
        if not name.strip():
            raise InputError(f"worker resources must be NAME=NUMBER[,NAME=NUMBER], got {text!r}.")
    return resources


class _CohortLogHandler(logging.FileHandler):
    """``cohort.log``: a line that cannot be written (a full disk) is dropped and counted, never
    printed as logging's traceback on the console."""

    dropped = 0

    def emit(self, record) -> None:
        try:
            _fault("log")
            super().emit(record)
        except Exception:  # noqa: BLE001 - handleError would print a traceback
            self.handleError(record)

    def handleError(self, record) -> None:  # noqa: N802 - logging's name
        self.dropped += 1

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # its last buffered line could not be written either
            self.dropped += 1


def _log_to(out: Path) -> logging.Handler:
    try:
        handler = _CohortLogHandler(out / LOG_FILE, encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot write the log {out / LOG_FILE}: {_reason_of(error)}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def run_cohort(inputs, out, *, settings: CohortSettings | None = None, workers: int = 1, scheduler: str | None = None,
               retry_failed: bool = False, segment_resources=None, measure_resources=None,
               progress: Callable[[CohortProgress], None] | None = None,
               cancel: Callable[[], bool] | None = None) -> CohortSummary:
    """Screen every exam of a cohort that is not finished yet (see the module docstring).

    Args:
        inputs: a folder of exams, a CSV manifest, or a list of :class:`CohortExam` or of CT
            paths (:func:`exams_from_files`).
        out: the cohort's output folder (created when absent).
        settings: how exams are screened (:class:`CohortSettings`).
        workers: local worker processes (1: in this process, no Dask).
        scheduler: address of a running Dask distributed scheduler (e.g. ``tcp://10.0.0.5:8786``)
            or the path of its scheduler file; ``workers`` is then ignored.
        retry_failed: screen the exams that failed in an earlier run again.
        segment_resources, measure_resources: Dask worker resources (``{"GPU": 1}`` or
            ``"GPU=1"``) that TotalSegmentator's and the measurement's tasks ask for (cluster only).
        progress: called with a :class:`CohortProgress` after each exam.
        cancel: polled between exams; when it returns True no further exam is started, the tables
            are written for what is finished, and the summary says how many remain.

    Returns:
        The :class:`CohortSummary` (also written as ``cohort.json``).

    Raises:
        InputError: bad inputs (see :func:`find_exams`) or an unusable output folder.
        DependencyError: a cluster was asked for and Dask distributed is not installed.
    """
    settings = settings or CohortSettings()
    if isinstance(inputs, (list, tuple)):
        exams = [e for e in inputs if isinstance(e, CohortExam)]
        exams += exams_from_files([e for e in inputs if not isinstance(e, CohortExam)])
    else:
        exams = find_exams(inputs)
    duplicates = sorted(group[0].exam_id for group in _colliding(exams))
    if duplicates:
        raise InputError(f"exam IDs must be unique (ignoring case and Unicode form); repeated: {', '.join(duplicates)}.")
    segment_resources = _parse_resources(segment_resources)
    measure_resources = _parse_resources(measure_resources)
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}.")
    fracture_model = None
    if settings.model is not None:
        from .model.fracture_model import resolve_model

        fracture_model = resolve_model(settings.model)  # refuse a bad model file before any exam is screened
        if settings.model != "demo":  # workers may run in other folders
            settings = replace(settings, model=str(Path(settings.model).expanduser().absolute()))

    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder.")
    try:
        (out / EXAMS_FOLDER).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        what = "write into the output folder" if out.is_dir() else "create the output folder"
        raise InputError(f"cannot {what} {out}: {error.strerror or error}.") from None
    handler = _log_to(out)
    started = time.perf_counter()
    state = CohortProgress(total=len(exams))
    peaks: dict[str, float] = {}
    unrecorded: dict[str, ExamOutcome] = {}
    mode = f"Dask scheduler {scheduler}" if scheduler else (f"{workers} local workers" if workers > 1 else "in process")
    finished = False
    try:
        todo = []
        for exam in exams:
            if exam.refused is not None:
                state.skipped += 1
                log.warning("%s refused (input): %s", exam.exam_id, exam.refused)
            elif _to_screen(exam_folder(out, exam.exam_id), retry_failed):
                todo.append(exam)
            else:
                state.skipped += 1
        log.info("run started: %d exams, %d to screen, %s, software %s", len(exams), len(todo), mode, __version__)
        if progress and state.skipped:
            progress(state)

        def record(outcome: ExamOutcome) -> None:
            if outcome.status == "done":
                state.done += 1
                state.last_done_at = time.perf_counter()
                unrecorded.pop(outcome.exam_id, None)
                log.info("%s done in %.1f s on %s%s", outcome.exam_id, outcome.seconds, outcome.worker,
                         f" (segmented on {outcome.segmented_on})" if outcome.segmented_on else "")
            elif outcome.status == "failed":
                state.failed += 1
                if not outcome.recorded:
                    unrecorded[outcome.exam_id] = outcome
                log.warning("%s failed (%s): %s [kind %s%s]", outcome.exam_id, outcome.stage, outcome.reason,
                            outcome.kind or INPUT_FAILURE, "" if outcome.recorded else f", no {ERROR_FILE}")
            else:
                state.skipped += 1
                log.info("%s skipped: finished by another process", outcome.exam_id)
            if outcome.worker and not math.isnan(outcome.worker_peak_rss_mib):
                peaks[outcome.worker] = max(peaks.get(outcome.worker, 0.0), outcome.worker_peak_rss_mib)
            state.last = outcome
            if progress:
                progress(state)

        if todo and (scheduler or workers > 1):
            _run_on_dask(todo, settings, out, scheduler=scheduler, workers=workers, retry_failed=retry_failed,
                         segment_resources=segment_resources, measure_resources=measure_resources,
                         record=record, cancel=cancel)
        else:
            for exam in todo:
                if cancel and cancel():
                    log.info("run cancelled")
                    break
                record(screen_cohort_exam(exam, settings, str(out), retry_failed=retry_failed))
        finished = True
    except KeyboardInterrupt:
        log.warning("run interrupted (Ctrl-C): the next run screens the exams not finished")
        raise
    finally:
        try:
            summary = _finish(exams, out, state, unrecorded, started, mode, peaks, fracture_model)
        except VFSError as error:  # the tables or the summary cannot be written (a full disk)
            log.error("run ended without its tables: %s", error)
            if finished:  # else the error that stopped the run is the one to report
                raise InputError(f"{str(error).rstrip('.')}; the exams finished so far are kept, and running the "
                                 "same command again writes the tables.") from None
        finally:
            log.removeHandler(handler)
            handler.close()
    return summary


def _finish(exams, out: Path, state: CohortProgress, unrecorded: dict[str, ExamOutcome], started: float, mode: str,
            peaks: dict[str, float], model=None) -> CohortSummary:
    """Write the cohort's tables and ``cohort.json``; returns the summary. With ``model``, the
    predictions of every finished exam are that model's, also for exams screened before with
    another model or none (a re-run with a new ``--model`` needs no screening)."""
    done, failed, failed_environment = _write_tables(exams, out, unrecorded, model)
    summary = CohortSummary(exams=len(exams), done=done, failed=failed, unfinished=len(exams) - done - failed,
                            screened_now=state.done, failed_now=state.failed, skipped_now=state.skipped,
                            seconds=time.perf_counter() - started, screening_seconds=state.last_done_at - state.started,
                            workers=mode, peak_rss_mib_per_worker=peaks,
                            out=str(out), failed_environment=failed_environment)
    try:
        _fault("summary")
        _write_json(out / SUMMARY_FILE, summary.to_dict())
    except OSError as error:
        raise InputError(f"cannot write {out / SUMMARY_FILE}: {_reason_of(error)}") from None
    log.info("run ended: %s", summary.text().replace("\n", "; "))
    return summary


def _worker_failure(exam: CohortExam, out, reason: str) -> ExamOutcome:
    """The outcome of an exam whose cluster task did not return (its worker died, the cluster
    failed): an environment failure, recorded in its ``error.json`` when that can be written."""
    folder = exam_folder(out, exam.exam_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        outcome = _fail(folder, exam, "worker", reason, time.perf_counter(), ENVIRONMENT_FAILURE)
    except OSError:
        outcome = ExamOutcome(exam.exam_id, "failed", "worker", reason, kind=ENVIRONMENT_FAILURE, recorded=False)
    outcome.worker, outcome.worker_peak_rss_mib = "", float("nan")
    return outcome


@contextlib.contextmanager
def _sigint_held():
    """Hold Ctrl-C off a local Dask cluster while it starts (then raise a Ctrl-C that came
    meanwhile as KeyboardInterrupt).

    SIGINT is blocked in this thread, so the threads the cluster starts (its event loop, which
    starts and restarts the worker processes) and the worker processes inherit the blocked signal:
    a Ctrl-C at the terminal, sent to the whole process group, reaches only this process, which
    then closes the cluster, instead of printing a traceback from every worker. multiprocessing's
    resource tracker unblocks SIGINT in the thread that first starts it, so it is started here,
    before. No effect where the platform has no signal masks (Windows)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    with contextlib.suppress(Exception):  # ImportError or a platform without it: nothing to protect against
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    caught = []
    previous_handler = _python_sigint_handler()
    if previous_handler is not None:  # a Ctrl-C meanwhile is noted, not raised half-way through the start
        signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    if caught:
        raise KeyboardInterrupt


def _python_sigint_handler():
    """The SIGINT handler when this thread may replace it and restore it (the main thread, and a
    handler set from Python: not one that an embedding application set in C), else None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGINT)


def _quiet_exit(outer: contextlib.ExitStack, kind: type, todo: Sequence[CohortExam], out) -> None:
    """A cluster run ends early (``kind``: its exception's type): hush it while it closes (Dask's
    loggers silenced and, after a Ctrl-C, further Ctrl-C ignored until it is closed: the command
    ends with its one sentence, never Dask's tracebacks), then remove the staging leftovers of the
    exams it stopped. Both are undone or done by ``outer``, which unwinds after the cluster closed."""
    outer.callback(_remove_interrupted_leftovers, todo, out)
    for logger in [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]:
        outer.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.CRITICAL + 1)
    handler = _python_sigint_handler()
    if issubclass(kind, KeyboardInterrupt) and handler is not None:
        outer.callback(signal.signal, signal.SIGINT, handler)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _remove_interrupted_leftovers(exams: Sequence[CohortExam], out) -> None:
    """The staging folders and temporary files that stopped workers left in the folders of
    ``exams``: each folder whose lock is free (no process screens it any more) is cleaned, the
    others are left to the process that holds them."""
    try:
        import fcntl
    except ImportError:  # no locks (Windows): a re-run cleans them before it screens the exam
        return
    for exam in exams:
        folder = exam_folder(out, exam.exam_id)
        try:
            with open(folder / ".lock", "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                try:
                    _remove_leftovers(folder)
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        except OSError:  # no folder or lock (never started), or still held
            continue


def _run_on_dask(todo, settings, out, *, scheduler, workers, retry_failed, segment_resources, measure_resources,
                 record, cancel) -> None:
    """Submit the exams to a Dask cluster (local or at ``scheduler``) and record their outcomes
    as they complete. Exams that need TotalSegmentator are two tasks (segmentation, then
    measurement) so that each can ask for its own worker resources."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise DependencyError("parallel and cluster runs need Dask distributed: "
                              "pip install 'vertebral-fracture-screen[cohort]'.") from None
    with contextlib.ExitStack() as outer, contextlib.ExitStack() as stack:
        # Leaving early (Ctrl-C, a lost scheduler): the inner stack closes the client and the cluster,
        # hushed by _quiet_exit (pushed after each of them, so it runs before they close); the outer
        # one then removes the staging leftovers of the exams they were screening.
        hushed = []

        def hush(kind, error, trace) -> bool:
            if kind is not None and not hushed:
                hushed.append(kind)
                _quiet_exit(outer, kind, todo, out)
            return False  # the error goes on

        if scheduler:
            target = {"scheduler_file": scheduler} if Path(scheduler).is_file() else {"address": scheduler}
            try:
                client = stack.enter_context(Client(**target, timeout="30s"))
            except (OSError, TimeoutError) as error:
                raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {error}.") from None
        else:
            import dask

            # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which also fixes glibc's mmap
            # threshold at 128 KiB: every larger numpy temporary is then a fresh mmap with its page
            # faults, and screening took 1.8x as long (measured). Our workers keep glibc's defaults.
            stack.enter_context(dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}))
            # No dashboard, and the scheduler's own HTTP server (health checks) on a free port, not on
            # 8787, where a second cohort running on this machine printed Dask's "port in use" warning.
            # Dask's log lines (errors included) stay out of the terminal: an exam's failure is in
            # errors.csv and cohort.log, a worker's death too (as a failed exam).
            with _sigint_held():  # its worker processes never see Ctrl-C: this process stops them
                cluster = stack.enter_context(LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, silence_logs=logging.CRITICAL))
                stack.push(hush)  # a Ctrl-C during the start is raised as the block ends
            client = stack.enter_context(Client(cluster))
        stack.push(hush)
        futures = {}
        for exam in todo:
            first = None
            if exam.seg is None:
                first = client.submit(screen_cohort_exam, exam, settings, str(out), retry_failed=retry_failed,
                                      segment_only=True, resources=segment_resources, pure=False,
                                      key=f"segment-{exam.exam_id}-{os.urandom(4).hex()}")
            future = client.submit(screen_cohort_exam, exam, settings, str(out), retry_failed=retry_failed,
                                   after=first, resources=measure_resources, pure=False,
                                   key=f"screen-{exam.exam_id}-{os.urandom(4).hex()}")
            futures[future] = exam
        pending = as_completed(list(futures))
        for future in pending:
            exam = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # noqa: BLE001 - a worker died or the task could not run
                reason = (f"its worker died ({type(error).__name__}: out of memory or killed)"
                          if type(error).__name__ == "KilledWorker" else _reason_of(error))
                outcome = _worker_failure(exam, out, reason)
            record(outcome)
            if cancel and cancel():
                log.info("run cancelled: %d exams not started", sum(not f.done() for f in futures))
                client.cancel([f for f in futures if not f.done()])
                break
