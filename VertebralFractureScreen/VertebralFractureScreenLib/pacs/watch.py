"""Watch mode: poll the PACS every N seconds and screen each new CT study once.

Each poll (a *tick*) asks the PACS, by QIDO-RS or C-FIND, for the studies whose StudyDate lies
in the last ``since_days`` days (today included): a dated query every PACS answers (Orthanc's
``/changes`` feed is Orthanc's alone). For each study, oldest first:

* ``done`` in the journal (:mod:`.journal`): skipped, forever;
* still arriving: a study is screened only once its NumberOfStudyRelatedInstances is the same as
  at the previous tick (a study half-received would miss slices). The counts are kept in the
  journal, so this holds across restarts and for ``--once`` runs from cron: a study is screened
  by the first tick that finds it unchanged;
* failed ``max_attempts`` times: skipped until ``retry_failed`` (so a broken study does not pull
  its series from the PACS at every tick forever);
* otherwise :func:`.study.screen_study`: pulled, screened, pushed; a failure is recorded and the
  study is tried again at the next tick.

Guarantees (tested by killing the watcher with SIGKILL at random moments): no study is screened
twice (``screened`` is journalled before the push; afterwards only its files are pushed again);
none is lost (a study is ``done`` only after the PACS stored all its results); a re-push sends the
same files, so the PACS holds each result once. An unreachable PACS at a tick is one sentence on
stderr and the next tick tries again; ``once`` makes it the command's failure instead.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import date, timedelta

from ..errors import VFSError
from .connection import StudyQuery
from .journal import DONE, FAILED, Journal
from .study import ScreenOptions, screen_study

DEFAULT_INTERVAL_S = 60.0
DEFAULT_SINCE_DAYS = 1
DEFAULT_MAX_ATTEMPTS = 5


@dataclass
class TickReport:
    """What one tick did: study UIDs screened (and pushed), failed, and waiting to settle."""

    done: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    waiting: list = field(default_factory=list)


def watch_query(since_days: int, today: date | None = None) -> StudyQuery:
    """The dated query of a tick: StudyDate from ``since_days`` days ago, open-ended."""
    start = (today or date.today()) - timedelta(days=since_days)
    return StudyQuery(dates=f"{start:%Y%m%d}-")


def tick(connection, journal: Journal, out, options: ScreenOptions, *, since_days: int = DEFAULT_SINCE_DAYS,
         max_attempts: int = DEFAULT_MAX_ATTEMPTS, retry_failed: bool = False, say=print) -> TickReport:
    """One poll (module docstring). Raises PacsError when the PACS cannot be searched."""
    report = TickReport()
    for study in connection.find_studies(watch_query(since_days)):
        uid = str(study.get("StudyInstanceUID") or "")
        entry = journal.entry(uid)
        if not uid or entry.get("state") == DONE:
            continue
        if entry.get("state") == FAILED and int(entry.get("attempts", 0)) >= max_attempts and not retry_failed:
            continue
        if not journal.settled(uid, study.get("NumberOfStudyRelatedInstances")):
            report.waiting.append(uid)
            continue
        try:
            say(screen_study(connection, uid, out, options, journal))
            report.done.append(uid)
        except VFSError as error:
            attempts = journal.entry(uid).get("attempts", 1)
            later = "tried again at the next poll" if attempts < max_attempts or retry_failed else \
                f"not tried again ({attempts} attempts; --retry-failed tries it)"
            print(f"vfscreen: study {uid}: {str(error).rstrip('.')} ({later}).", file=sys.stderr)
            report.failed.append(uid)
    return report


@contextlib.contextmanager
def _stop_on_sigterm():
    """While watching, SIGTERM ends the watcher like Ctrl-C (exit 130): between two studies'
    steps, journal intact. The previous handler comes back afterwards (``watch --once`` from a
    library caller leaves the process as it found it)."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (a library caller): leave the handler alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def watch(connect, out, options: ScreenOptions, *, interval_s: float = DEFAULT_INTERVAL_S,
          since_days: int = DEFAULT_SINCE_DAYS, once: bool = False, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
          retry_failed: bool = False, say=print) -> int:
    """Poll until interrupted (or once); returns the exit status: 0, or 1 when ``once`` and a study
    failed. ``connect()`` gives a fresh :class:`.connection.PacsConnection` for each tick.

    Raises:
        PacsError: with ``once``, the PACS could not be searched; always, another process holds
            the output folder.
    """
    journal = Journal(out)
    with _stop_on_sigterm(), journal.locked():
        while True:
            started = time.monotonic()
            try:
                with connect() as connection:
                    report = tick(connection, journal, out, options, since_days=since_days,
                                  max_attempts=max_attempts, retry_failed=retry_failed, say=say)
            except VFSError as error:
                if once:
                    raise
                print(f"vfscreen: {str(error).rstrip('.')} (trying again in {interval_s:g} s).", file=sys.stderr)
                report = None
            if once:
                return 1 if report.failed else 0
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
