"""Screening a cohort's exams on Dask: a local cluster of worker processes or an existing one, each
exam one task (two when TotalSegmentator runs: segmentation and measurement, each with its own
worker resources), and an early end (Ctrl-C, a lost scheduler) that stops the workers quietly and
cleans up after them."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import DependencyError, InputError
from .exams import CohortExam
from .failures import _reason_of
from .one_exam import _remove_interrupted_leftovers, _worker_failure, screen_cohort_exam
from .writes import log


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
