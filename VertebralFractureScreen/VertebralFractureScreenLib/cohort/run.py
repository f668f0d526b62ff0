"""One run of a cohort, step by step: the inputs and options checked, the output folder and its
log opened, the exams to screen chosen, screened in this process or handed to :mod:`.cluster`,
each outcome counted, logged and shown, and, however the run ends, the tables and ``cohort.json``
written and the log let go."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from .. import __version__
from ..errors import InputError, VFSError
from .cluster import _run_on_dask
from .exams import CohortExam, _colliding, exams_from_files, find_exams
from .failures import INPUT_FAILURE, _reason_of
from .one_exam import (ERROR_FILE, EXAMS_FOLDER, CohortSettings, ExamOutcome, _to_screen, exam_folder,
                       screen_cohort_exam)
from .progress import SUMMARY_FILE, CohortProgress, CohortSummary
from .tables import _write_tables
from .writes import _fault, _log_to, _write_json, log


def run_cohort(inputs, out, *, settings: CohortSettings | None = None, workers: int = 1, scheduler: str | None = None,
               retry_failed: bool = False, segment_resources=None, measure_resources=None,
               progress: Callable[[CohortProgress], None] | None = None,
               cancel: Callable[[], bool] | None = None) -> CohortSummary:
    """Screen every exam of a cohort that is not finished yet (see the package docstring).

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
    exams = _exams_of(inputs)
    segment_resources = _parse_resources(segment_resources)
    measure_resources = _parse_resources(measure_resources)
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}.")
    settings, fracture_model = _with_model(settings or CohortSettings())
    out = _output_folder(out)
    handler = _log_to(out)
    started = time.perf_counter()
    tally = _Tally(CohortProgress(total=len(exams)), progress)
    mode = f"Dask scheduler {scheduler}" if scheduler else (f"{workers} local workers" if workers > 1 else "in process")
    finished = False
    try:
        todo = _plan(exams, out, retry_failed, mode, tally)
        if todo and (scheduler or workers > 1):
            _run_on_dask(todo, settings, out, scheduler=scheduler, workers=workers, retry_failed=retry_failed,
                         segment_resources=segment_resources, measure_resources=measure_resources,
                         record=tally.record, cancel=cancel)
        else:
            _screen_here(todo, settings, out, retry_failed, tally.record, cancel)
        finished = True
    except KeyboardInterrupt:
        log.warning("run interrupted (Ctrl-C): the next run screens the exams not finished")
        raise
    finally:
        summary = _end(exams, out, tally, started, mode, fracture_model, handler, finished)
    return summary


def _exams_of(inputs) -> list[CohortExam]:
    """The exams of :func:`run_cohort`'s ``inputs``; refused when two of their IDs would name one
    folder (case and Unicode form ignored)."""
    if isinstance(inputs, (list, tuple)):
        exams = [e for e in inputs if isinstance(e, CohortExam)]
        exams += exams_from_files([e for e in inputs if not isinstance(e, CohortExam)])
    else:
        exams = find_exams(inputs)
    duplicates = sorted(group[0].exam_id for group in _colliding(exams))
    if duplicates:
        raise InputError(f"exam IDs must be unique (ignoring case and Unicode form); repeated: {', '.join(duplicates)}.")
    return exams


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


def _with_model(settings: CohortSettings) -> tuple[CohortSettings, object]:
    """``(settings, model)``: the fracture model of ``settings`` read now, so that a bad model file
    is refused before any exam is screened, and its path made absolute, since workers may run in
    other folders; ``(settings, None)`` without a model."""
    if settings.model is None:
        return settings, None
    from ..model.fracture_model import resolve_model

    fracture_model = resolve_model(settings.model)
    if settings.model != "demo":
        settings = replace(settings, model=str(Path(settings.model).expanduser().absolute()))
    return settings, fracture_model


def _output_folder(out) -> Path:
    """``out`` as an absolute path, with its ``exams`` folder created; one sentence when it cannot
    be."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder.")
    try:
        (out / EXAMS_FOLDER).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        what = "write into the output folder" if out.is_dir() else "create the output folder"
        raise InputError(f"cannot {what} {out}: {error.strerror or error}.") from None
    return out


class _Tally:
    """A run's outcomes as they come: counted in a :class:`.CohortProgress` (given to ``progress``
    after each), logged, each worker's peak memory kept, and the failures whose ``error.json``
    could not be written kept for ``errors.csv``."""

    def __init__(self, state: CohortProgress, progress: Callable[[CohortProgress], None] | None):
        self.state = state
        self.progress = progress
        self.peaks: dict[str, float] = {}
        self.unrecorded: dict[str, ExamOutcome] = {}

    def record(self, outcome: ExamOutcome) -> None:
        """Count, log and show one exam's outcome."""
        state = self.state
        if outcome.status == "done":
            state.done += 1
            state.last_done_at = time.perf_counter()
            self.unrecorded.pop(outcome.exam_id, None)
            log.info("%s done in %.1f s on %s%s", outcome.exam_id, outcome.seconds, outcome.worker,
                     f" (segmented on {outcome.segmented_on})" if outcome.segmented_on else "")
        elif outcome.status == "failed":
            state.failed += 1
            if not outcome.recorded:
                self.unrecorded[outcome.exam_id] = outcome
            log.warning("%s failed (%s): %s [kind %s%s]", outcome.exam_id, outcome.stage, outcome.reason,
                        outcome.kind or INPUT_FAILURE, "" if outcome.recorded else f", no {ERROR_FILE}")
        else:
            state.skipped += 1
            log.info("%s skipped: finished by another process", outcome.exam_id)
        if outcome.worker and not math.isnan(outcome.worker_peak_rss_mib):
            self.peaks[outcome.worker] = max(self.peaks.get(outcome.worker, 0.0), outcome.worker_peak_rss_mib)
        state.last = outcome
        if self.progress:
            self.progress(state)


def _plan(exams: Sequence[CohortExam], out: Path, retry_failed: bool, mode: str, tally: _Tally) -> list[CohortExam]:
    """The exams this run screens: neither finished nor failed by their input (unless
    ``retry_failed``); the others, refused exams included, are counted as skipped. Logs the run's
    start."""
    state = tally.state
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
    if tally.progress and state.skipped:
        tally.progress(state)
    return todo


def _screen_here(todo: Sequence[CohortExam], settings: CohortSettings, out: Path, retry_failed: bool,
                 record: Callable[[ExamOutcome], None], cancel: Callable[[], bool] | None) -> None:
    """Screen the exams in this process, one after the other, until ``cancel()`` says stop."""
    for exam in todo:
        if cancel and cancel():
            log.info("run cancelled")
            break
        record(screen_cohort_exam(exam, settings, str(out), retry_failed=retry_failed))


def _end(exams: Sequence[CohortExam], out: Path, tally: _Tally, started: float, mode: str, model, handler,
         finished: bool) -> CohortSummary | None:
    """End a run however it ended: write its tables and ``cohort.json`` (:func:`_finish`), then let
    go of the log file. When they cannot be written (a full disk), a run that ``finished`` raises
    one sentence; a run that an error stopped returns None, so that the error is the one reported."""
    try:
        return _finish(exams, out, tally, started, mode, model)
    except VFSError as error:  # the tables or the summary cannot be written (a full disk)
        log.error("run ended without its tables: %s", error)
        if finished:  # else the error that stopped the run is the one to report
            raise InputError(f"{str(error).rstrip('.')}; the exams finished so far are kept, and running the "
                             "same command again writes the tables.") from None
        return None
    finally:
        log.removeHandler(handler)
        handler.close()


def _finish(exams: Sequence[CohortExam], out: Path, tally: _Tally, started: float, mode: str,
            model=None) -> CohortSummary:
    """Write the cohort's tables and ``cohort.json``; returns the summary. With ``model``, the
    predictions of every finished exam are that model's, also for exams screened before with
    another model or none (a re-run with a new ``--model`` needs no screening)."""
    state = tally.state
    done, failed, failed_environment = _write_tables(exams, out, tally.unrecorded, model)
    summary = CohortSummary(exams=len(exams), done=done, failed=failed, unfinished=len(exams) - done - failed,
                            screened_now=state.done, failed_now=state.failed, skipped_now=state.skipped,
                            seconds=time.perf_counter() - started, screening_seconds=state.last_done_at - state.started,
                            workers=mode, peak_rss_mib_per_worker=tally.peaks,
                            out=str(out), failed_environment=failed_environment)
    try:
        _fault("summary")
        _write_json(out / SUMMARY_FILE, summary.to_dict())
    except OSError as error:
        raise InputError(f"cannot write {out / SUMMARY_FILE}: {_reason_of(error)}") from None
    log.info("run ended: %s", summary.text().replace("\n", "; "))
    return summary
