"""What a failed exam is: its kind (``input``: the exam itself cannot be screened; ``environment``:
the machine failed it, and a plain re-run screens it again), the stage it failed in and the
one-sentence reason, all told from the exception that stopped it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DependencyError, SegmentationError, VFSError

if TYPE_CHECKING:  # only named in annotations: .exams imports the log from .writes, which imports this
    from .exams import CohortExam

INPUT_FAILURE = "input"
"""Failure kind: the exam itself cannot be screened (a re-run skips it unless told to retry)."""
ENVIRONMENT_FAILURE = "environment"
"""Failure kind: the machine failed the exam (disk full, permissions, memory, a killed worker);
a plain re-run screens it again."""
_ENVIRONMENT_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS")
                                if hasattr(errno, name))


def _stage_of(error: BaseException) -> str:
    """The stage an exam failed in: ``segmentation``, ``input`` (any of the library's own errors)
    or ``internal`` (a bug)."""
    if isinstance(error, (DependencyError, SegmentationError)):
        return "segmentation"
    if isinstance(error, VFSError):
        return "input"
    return "internal"


def _reason_of(error: BaseException) -> str:
    """The one sentence that ``errors.csv``, ``cohort.log`` and the command's message give for ``error``."""
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
    """Whether ``error`` is the file system's: permissions, a full disk or quota, read-only."""
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
