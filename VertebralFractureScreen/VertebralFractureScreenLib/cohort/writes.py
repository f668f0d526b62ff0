"""How the engine writes its own files: JSON and tables atomically (:func:`.io.files.atomic_write_text`,
so a file is either the old one or the whole new one, never half written), ``cohort.log`` through a
handler that drops what it cannot write, and the test seam at every write point.

Fault injection (tests only): :data:`fault_hook`, when set, is called at the engine's write points
and may raise, e.g. ``OSError(errno.ENOSPC, ...)`` to act out a full disk. Tests set it here
(``cohort.writes.fault_hook``): the writers look it up in this module.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from ..io.files import atomic_write_text
from .failures import _reason_of

LOG_FILE = "cohort.log"
"""In the cohort's output folder: one line per exam and run, appended (not atomic: a line is either
written or dropped)."""

fault_hook: Callable[[str, str], None] | None = None
"""Test seam: when set, called as ``fault_hook(point, exam_id)`` just before the engine writes at
``point``: ``"exam"`` (screening one exam, in the process that screens it; ``workers=1`` only),
``"error"`` (an exam's ``error.json``), ``"tables"`` (the cohort's CSV tables), ``"summary"``
(``cohort.json``) and ``"log"`` (a line of ``cohort.log``; ``exam_id`` empty for the last three).
It may raise, e.g. ``OSError(errno.ENOSPC, "No space left on device")`` to act out a full disk.
None (always, outside tests): no effect."""

log = logging.getLogger("vfscreen.cohort")


def _fault(point: str, exam_id: str = "") -> None:
    """Call :data:`fault_hook` at the write point ``point`` (see there), when a test set it."""
    if fault_hook is not None:
        fault_hook(point, exam_id)


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically (an :class:`.errors.InputError` naming ``path``
    when it cannot be written)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds it; True when written."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(path, text)
    return True


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
    """Append the engine's log lines (INFO and above) to ``out/cohort.log`` from now on; the caller
    removes and closes the returned handler when the run ends."""
    try:
        handler = _CohortLogHandler(out / LOG_FILE, encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot write the log {out / LOG_FILE}: {_reason_of(error)}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
