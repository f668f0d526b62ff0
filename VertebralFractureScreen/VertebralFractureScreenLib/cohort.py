"""Screening a cohort: many exams, resumable, on one machine or a Dask cluster (``vfscreen cohort``).

:func:`run_cohort` is the engine behind ``vfscreen cohort`` and batch use from Slicer's Python
console. It finds the exams (:func:`find_exams`), screens each one with
:func:`.screening.screen_exam` into its own SPEC §5 folder, and then writes the cohort's tables.

Inputs (:func:`find_exams`):

* a **folder**: every CT image file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``,
  ``.mhd``) directly in it is one exam, and so is every sub-folder that holds a DICOM series; the
  exam ID is the file's name without its suffix (or the sub-folder's name). Segmentations are
  found by name beside it: ``<exam>_seg`` or ``<exam>_total`` (TotalSegmentator ``total`` ids) or
  ``<exam>.seg.nrrd`` (a Slicer segmentation), and ``<exam>_body`` or ``<exam>_vertebrae_body``
  (the ``vertebrae_body`` map), with any of the image suffixes. Such files are never exams
  themselves. Exams without a segmentation are segmented by TotalSegmentator.
* a **CSV manifest** with a ``ct`` column and optional ``exam_id``, ``seg``, ``body_seg``,
  ``labels`` (``totalsegmentator`` / ``verse``) and ``series`` columns; relative paths are relative
  to the manifest's folder. Every other column (a label, ``age``, ``sex``...) is passed through
  to ``features.csv``.

Outputs in ``OUT``:

* ``exams/<exam_id>/``: the exam's SPEC §5 files (``exam.json`` last: it marks a finished
  exam), TotalSegmentator's label maps under ``segmentation/`` when it ran, or ``error.json``
  (stage and one-sentence reason) when the exam failed;
* ``features.csv``: one row per finished exam, in input order: ``exam_id``, the manifest's
  pass-through columns, ``features_version`` and the :mod:`.features` columns;
* ``errors.csv``: ``exam_id, stage, reason`` for every failed exam;
* ``predictions.csv`` (with a model): ``exam_id, model, probability, threshold, positive,
  demonstration, imputed_features`` per finished exam;
* ``cohort.json``: the run summary (counts, time, exams per minute, peak memory per worker);
* ``cohort.log``: one line per exam and run, appended.

Robustness: a failing exam is recorded and never stops the others. A re-run skips finished and
failed exams (``retry_failed=True`` tries the failed ones again), so a finished cohort re-runs in
seconds and rewrites none of its exam folders or tables. Every file is written atomically, each
exam is screened under an exclusive lock on its folder (``fcntl.flock``, where the platform has
it) and its staging leftovers from a killed run are removed before it starts again, so killing a
run at any moment and re-running it ends with every exam done exactly once.

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
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from . import levels as lv
from .errors import DependencyError, InputError, SegmentationError, VFSError
from .features import FEATURE_NAMES, FEATURE_VERSION, exam_features, read_exam_folder
from .imageio import IMAGE_SUFFIXES, atomic_write_text, split_image_suffix
from .screening import exam_id_of
from .serialization import csv_text

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
ERROR_COLUMNS = ("exam_id", "stage", "reason")
_EXAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

log = logging.getLogger("vfscreen.cohort")


@dataclass(frozen=True)
class CohortExam:
    """One exam of a cohort: its ID, CT (file or DICOM folder) and optional segmentations
    (paths as text), label convention (None: the cohort's), DICOM series, and the manifest's
    pass-through ``columns`` as ``(name, value)`` pairs."""

    exam_id: str
    ct: str
    seg: str | None = None
    body_seg: str | None = None
    convention: str | None = None
    series_uid: str | None = None
    columns: tuple[tuple[str, str], ...] = ()


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

    @property
    def exams_per_minute(self) -> float:
        worked = self.screened_now + self.failed_now
        return 60.0 * worked / self.seconds if self.seconds > 0 and worked else float("nan")

    def to_dict(self) -> dict:
        return {
            "software": {"name": "VertebralFractureScreen", "version": __version__},
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "out": self.out,
            "exams": self.exams, "done": self.done, "failed": self.failed, "unfinished": self.unfinished,
            "this_run": {"screened": self.screened_now, "failed": self.failed_now, "skipped": self.skipped_now,
                         "seconds": round(self.seconds, 3),
                         "exams_per_minute": None if math.isnan(self.exams_per_minute)
                         else round(self.exams_per_minute, 2),
                         "workers": self.workers,
                         "peak_rss_mib_per_worker": {k: round(v, 1) for k, v in self.peak_rss_mib_per_worker.items()}},
        }

    def text(self) -> str:
        rate = "" if math.isnan(self.exams_per_minute) else f", {self.exams_per_minute:.1f} exams/min"
        lines = [f"{self.exams} exams: {self.done} done, {self.failed} failed"
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
    from .imageio import is_dicom_folder

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
            log.warning("no CT for the segmentation %s: ignored", ", ".join(Path(p).name for p in files.values()))
            continue
        exams.append(CohortExam(_checked_id(stem, path), files["ct"], files.get("seg"), files.get("body_seg")))
    if not exams:
        raise InputError(f"no exam found in {path}: expected CT images ({', '.join(IMAGE_SUFFIXES)}) or DICOM "
                         "series folders, or give a CSV manifest.")
    return exams


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
        exams.append(CohortExam(_checked_id(stem, path), str(path), found.get("seg"), found.get("body_seg")))
    duplicates = sorted(name for name, count in Counter(e.exam_id for e in exams).items() if count > 1)
    if duplicates:
        raise InputError(f"several CTs have the exam ID {', '.join(duplicates)}; rename them or use a CSV manifest.")
    return exams


def _checked_id(exam_id: str, source) -> str:
    if not _EXAM_ID.fullmatch(exam_id):
        raise InputError(f"exam ID {exam_id!r} in {source} cannot name a folder: use letters, digits and . _ + - "
                         "(not starting with . _ + -).")
    return exam_id


def read_manifest(path) -> list[CohortExam]:
    """The exams of a CSV manifest (see the module docstring)."""
    path = Path(path).expanduser().absolute()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read the manifest {path}: {getattr(error, 'strerror', None) or error}.") from None
    if "ct" not in columns:
        raise InputError(f"the manifest {path} has no 'ct' column (columns: {', '.join(columns) or 'none'}).")
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
        exam_id = _checked_id(row.get("exam_id") or exam_id_of(ct), f"line {number} of {path}")
        if exam_id in seen:
            raise InputError(f"exam ID {exam_id} is in lines {seen[exam_id]} and {number} of the manifest {path}: "
                             "exam IDs must be unique.")
        seen[exam_id] = number
        convention = row.get("labels") or None
        if convention not in (None, "totalsegmentator", "verse"):
            raise InputError(f"line {number} of {path}: labels must be totalsegmentator or verse, not {convention!r}.")
        exams.append(CohortExam(exam_id, ct, resolve(row.get("seg")), resolve(row.get("body_seg")), convention,
                                row.get("series") or None, tuple((c, row.get(c, "")) for c in passthrough)))
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


def _fail(folder: Path, exam: CohortExam, stage: str, reason: str, started: float) -> ExamOutcome:
    _write_json(folder / ERROR_FILE, {"exam_id": exam.exam_id, "stage": stage, "reason": reason,
                                      "software_version": __version__,
                                      "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return ExamOutcome(exam.exam_id, "failed", stage, reason, time.perf_counter() - started, _worker_name(),
                       _peak_rss_mib())


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
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder):
        state = exam_state(folder)
        if state == "done" or (state == "failed" and not retry_failed and after is None):
            return ExamOutcome(exam.exam_id, "skipped", worker=_worker_name(), worker_peak_rss_mib=_peak_rss_mib())
        _remove_leftovers(folder)
        try:
            if segment_only:
                from .screening import SEGMENTATION_FOLDER
                from .segmentation import segment_ct

                segment_ct(exam.ct, folder / SEGMENTATION_FOLDER, quality=settings.quality, device=settings.device,
                           body=settings.segment_body, series_uid=exam.series_uid)
                return ExamOutcome(exam.exam_id, "segmented", seconds=time.perf_counter() - started,
                                   worker=_worker_name(), worker_peak_rss_mib=_peak_rss_mib())
            from .screening import screen_exam

            result = screen_exam(exam.ct, seg=exam.seg, body_seg=exam.body_seg,
                                 convention=exam.convention or settings.convention, exam_id=exam.exam_id,
                                 levels=settings.levels, series_uid=exam.series_uid, out_dir=folder,
                                 quality=settings.quality, device=settings.device,
                                 segment_body=settings.segment_body, keep_label_maps=False, model=settings.model)
            result.write(folder, qc=settings.qc)
            (folder / ERROR_FILE).unlink(missing_ok=True)
        except Exception as error:  # noqa: BLE001 - one exam's failure never stops the cohort
            return _fail(folder, exam, _stage_of(error), _reason_of(error), started)
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


def write_tables(exams: Sequence[CohortExam], out) -> tuple[int, int]:
    """Rebuild ``features.csv`` and ``errors.csv`` from the exam folders; returns the numbers of
    finished and failed exams. Files whose content would not change are left alone."""
    out = Path(out)
    passthrough = list(dict.fromkeys(name for exam in exams for name, _ in exam.columns))
    feature_rows, error_rows, prediction_rows = [], [], []
    for exam in exams:
        folder = exam_folder(out, exam.exam_id)
        state = exam_state(folder)
        if state == "done":
            try:
                exam_json, vertebrae = read_exam_folder(folder)
                features, model = exam_features(exam_json, vertebrae), exam_json.get("model") or {}
            except (OSError, ValueError, KeyError) as error:  # a folder edited by hand
                error_rows.append({"exam_id": exam.exam_id, "stage": "features",
                                   "reason": f"cannot read its results: {error}."})
                continue
            feature_rows.append({"exam_id": exam.exam_id, **dict(exam.columns), "features_version": FEATURE_VERSION,
                                 **features})
            if model.get("probability") is not None:
                prediction_rows.append({"exam_id": exam.exam_id, "model": model.get("name"),
                                        "probability": model["probability"], "threshold": model.get("threshold"),
                                        "positive": "true" if model.get("positive") else "false",
                                        "demonstration": "true" if model.get("demonstration") else "false",
                                        "imputed_features": ";".join(model.get("imputed_features") or [])})
        elif state == "failed":
            try:
                error = json.loads((folder / ERROR_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                error = {"stage": "unknown", "reason": "its error.json cannot be read."}
            error_rows.append({"exam_id": exam.exam_id, "stage": error.get("stage", ""),
                               "reason": error.get("reason", "")})
    _write_if_changed(out / FEATURES_FILE,
                      _csv_text(["exam_id", *passthrough, "features_version", *FEATURE_NAMES], feature_rows))
    _write_if_changed(out / ERRORS_FILE, _csv_text(ERROR_COLUMNS, error_rows))
    if prediction_rows or (out / PREDICTIONS_FILE).exists():
        _write_if_changed(out / PREDICTIONS_FILE, _csv_text(PREDICTION_COLUMNS, prediction_rows))
    return len(feature_rows), sum(1 for row in error_rows if row["stage"] != "features")


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
        elapsed = time.perf_counter() - self.started
        rate = f" · {60 * self.worked / elapsed:.1f} exams/min" if self.worked and elapsed > 0 else ""
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


def _log_to(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / LOG_FILE, encoding="utf-8")
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
    duplicates = sorted(name for name, count in Counter(e.exam_id for e in exams).items() if count > 1)
    if duplicates:
        raise InputError(f"exam IDs must be unique; repeated: {', '.join(duplicates)}.")
    segment_resources = _parse_resources(segment_resources)
    measure_resources = _parse_resources(measure_resources)
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}.")
    if settings.model is not None:
        from .model import resolve_model

        resolve_model(settings.model)  # refuse a bad model file before any exam is screened
        if settings.model != "demo":  # workers may run in other folders
            settings = replace(settings, model=str(Path(settings.model).expanduser().absolute()))

    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder.")
    try:
        (out / EXAMS_FOLDER).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output folder {out}: {error.strerror or error}.") from None
    handler = _log_to(out)
    started = time.perf_counter()
    state = CohortProgress(total=len(exams))
    peaks: dict[str, float] = {}
    mode = f"Dask scheduler {scheduler}" if scheduler else (f"{workers} local workers" if workers > 1 else "in process")
    try:
        todo = []
        for exam in exams:
            folder_state = exam_state(exam_folder(out, exam.exam_id))
            if folder_state == "done" or (folder_state == "failed" and not retry_failed):
                state.skipped += 1
            else:
                todo.append(exam)
        log.info("run started: %d exams, %d to screen, %s, software %s", len(exams), len(todo), mode, __version__)
        if progress and state.skipped:
            progress(state)

        def record(outcome: ExamOutcome) -> None:
            if outcome.status == "done":
                state.done += 1
                log.info("%s done in %.1f s on %s%s", outcome.exam_id, outcome.seconds, outcome.worker,
                         f" (segmented on {outcome.segmented_on})" if outcome.segmented_on else "")
            elif outcome.status == "failed":
                state.failed += 1
                log.warning("%s failed (%s): %s", outcome.exam_id, outcome.stage, outcome.reason)
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
    finally:
        done, failed = write_tables(exams, out)
        summary = CohortSummary(exams=len(exams), done=done, failed=failed, unfinished=len(exams) - done - failed,
                                screened_now=state.done, failed_now=state.failed, skipped_now=state.skipped,
                                seconds=time.perf_counter() - started, workers=mode, peak_rss_mib_per_worker=peaks,
                                out=str(out))
        _write_json(out / SUMMARY_FILE, summary.to_dict())
        log.info("run ended: %s", summary.text().replace("\n", "; "))
        log.removeHandler(handler)
        handler.close()
    return summary


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
    with contextlib.ExitStack() as stack:
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
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
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
                folder = exam_folder(out, exam.exam_id)
                folder.mkdir(parents=True, exist_ok=True)
                outcome = _fail(folder, exam, "worker", reason, time.perf_counter())
                outcome.worker, outcome.worker_peak_rss_mib = "", float("nan")
            record(outcome)
            if cancel and cancel():
                log.info("run cancelled: %d exams not started", sum(not f.done() for f in futures))
                client.cancel([f for f in futures if not f.done()])
                break
