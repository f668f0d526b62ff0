"""A run's counts: as it goes (:class:`CohortProgress`, shown by :class:`TerminalProgress`) and
when it ends (:class:`CohortSummary`, also written as ``cohort.json``)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .. import __version__
from .one_exam import ExamOutcome

SUMMARY_FILE = "cohort.json"
"""In the cohort's output folder: :meth:`CohortSummary.to_dict` of the last run."""


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
        """The content of ``cohort.json``."""
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
        """The summary as ``vfscreen cohort`` prints it at the end (two or three lines)."""
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
