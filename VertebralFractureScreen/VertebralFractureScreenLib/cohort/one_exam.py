"""One exam of a cohort, in the process that screens it: its folder in the output and that folder's
state (finished, failed or to do), the lock that keeps a second process out, the staging leftovers
of a killed run, and the screening itself, whose failures become the folder's ``error.json``."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from .. import levels as lv
from ..errors import VFSError
from .exams import CohortExam
from .failures import (ENVIRONMENT_FAILURE, INPUT_FAILURE, _environment_failure, _kind_of, _reason_of,
                       _stage_of)
from .writes import _fault, _write_json
from ..report.exam_folder import ERROR_FILE, SEGMENTATION_FOLDER, exam_state, remove_leftovers

EXAMS_FOLDER = "exams"


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
    relabel_levels: bool = False
    """Move vertebra labels by the level shift ribs and sacrum agree on (``screen_exam``'s option)."""
    segment_ribs: bool = False
    """TotalSegmentator also segments the ribs, for the level check (``screen_exam``'s option)."""

    @classmethod
    def from_options(cls, options, levels: tuple[str, ...]) -> CohortSettings:
        """The screening options of the command line (``--labels`` … ``--segment-ribs``, shared by
        ``vfscreen cohort`` and ``vfscreen pacs``), with ``levels`` already parsed."""
        return cls(convention=options.labels, levels=levels, quality=options.quality, device=options.device,
                   segment_body=options.body, qc=not options.no_qc, model=options.model,
                   relabel_levels=options.relabel_levels, segment_ribs=options.segment_ribs)

    def screen_options(self, convention: str | None = None) -> dict:
        """These settings as :func:`.screening.screen_exam`'s keyword arguments (``qc`` is
        :meth:`.ScreeningResult.write`'s); ``convention``: the exam's own label convention, if any."""
        return dict(convention=convention or self.convention, levels=self.levels, quality=self.quality,
                    device=self.device, segment_body=self.segment_body, model=self.model,
                    relabel_levels=self.relabel_levels, segment_ribs=self.segment_ribs)


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
    """Of a failure: ``input`` or ``environment`` (see :mod:`.failures`)."""
    recorded: bool = True
    """Of a failure: False when its ``error.json`` could not be written (a full disk)."""


def exam_folder(out, exam_id: str) -> Path:
    """The folder of one exam's results inside the cohort output ``out``."""
    return Path(out) / EXAMS_FOLDER / exam_id


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
                    remove_leftovers(folder)
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        except OSError:  # no folder or lock (never started), or still held
            continue


def _worker_name() -> str:
    """This process as ``host:pid``, the worker named in ``cohort.log`` and ``cohort.json``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (NaN where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20  # kB on Linux, bytes on macOS


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
    remove_leftovers(folder)
    try:
        _fault("exam", exam.exam_id)
        if segment_only:
            from ..segment.totalsegmentator import RIB_CLASSES, SCREENING_CLASSES, segment_ct

            classes = SCREENING_CLASSES + (RIB_CLASSES if settings.segment_ribs else ())  # as screen_exam asks
            segment_ct(exam.ct, folder / SEGMENTATION_FOLDER, quality=settings.quality, device=settings.device,
                       body=settings.segment_body, series_uid=exam.series_uid, classes=classes)
            return ExamOutcome(exam.exam_id, "segmented", seconds=time.perf_counter() - started,
                               worker=_worker_name(), worker_peak_rss_mib=_peak_rss_mib())
        from ..exam.screening import screen_exam

        result = screen_exam(exam.ct, seg=exam.seg, body_seg=exam.body_seg, exam_id=exam.exam_id,
                             series_uid=exam.series_uid, out_dir=folder, keep_label_maps=False,
                             **settings.screen_options(exam.convention))
        result.write(folder, qc=settings.qc)
        (folder / ERROR_FILE).unlink(missing_ok=True)
    except Exception as error:  # noqa: BLE001 - one exam's failure never stops the cohort
        kind, reason = _environment_failure(error, exam, folder)
        return _fail(folder, exam, _stage_of(error), reason, started, kind)
    return ExamOutcome(exam.exam_id, "done", seconds=time.perf_counter() - started, worker=_worker_name(),
                       worker_peak_rss_mib=_peak_rss_mib(), segmented_on=after.worker if after is not None else "")



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
