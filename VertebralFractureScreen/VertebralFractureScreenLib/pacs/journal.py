"""The PACS journal: which studies of an output folder are screened, pushed or failed, kept in
``OUT/pacs-journal.json`` so that ``vfscreen pacs screen`` and ``vfscreen pacs watch`` resume
after any crash or SIGKILL without losing or repeating a study.

One entry per StudyInstanceUID::

    {"state": "done" | "screened" | "failed", "screened": true, "series": "1.2...",
     "attempts": 2, "stage": "push", "error": "one sentence", "updated": "2026-01-31T12:00:00"}

* ``screened`` (and the flag of the same name) is written only after the study's results folder
  and all its DICOM objects are complete on disk; from then on the study is never screened again,
  only (re)pushed, from those very files, so a re-push reuses the same SOP Instance UIDs;
* ``done`` is written only after the PACS stored every result file;
* ``failed`` counts ``attempts`` and keeps the last sentence; the next poll tries again.

``seen`` keeps each study's NumberOfStudyRelatedInstances of the last poll (the watch screens a
study once it stops growing). The file is replaced atomically (written beside, flushed, renamed)
at each change, so a kill leaves the previous or the next version, never half of one. One process
at a time works in an output folder: :meth:`Journal.locked` holds an exclusive lock
(``fcntl.flock`` where the platform has it) and refuses a second one with one sentence.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from pathlib import Path

from ..io.files import atomic_write_text
from .config import PacsError

JOURNAL_FILE = "pacs-journal.json"
LOCK_FILE = ".pacs-journal.lock"
DONE, SCREENED, FAILED = "done", "screened", "failed"


class Journal:
    """The journal of one output folder (module docstring)."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / JOURNAL_FILE
        self.studies: dict[str, dict] = {}
        self.seen: dict[str, object] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.studies, self.seen = dict(data.get("studies", {})), dict(data.get("seen", {}))
            except (OSError, ValueError, AttributeError) as error:
                raise PacsError(f"cannot read the PACS journal {self.path} ({error}); move it away to start "
                                "afresh (studies already pushed would then be screened again).") from None

    def entry(self, study_uid: str) -> dict:
        return self.studies.get(study_uid, {})

    def state(self, study_uid: str) -> str | None:
        return self.entry(study_uid).get("state")

    def record(self, study_uid: str, state: str, **fields) -> dict:
        """Set a study's state (and fields), counting attempts of failures; saved at once."""
        entry = dict(self.entry(study_uid))
        if state == FAILED:
            entry["attempts"] = int(entry.get("attempts", 0)) + 1
        else:
            entry.pop("error", None)
            entry.pop("stage", None)
        entry.update(fields, state=state, updated=datetime.now().isoformat(timespec="seconds"))
        self.studies[study_uid] = entry
        self.save()
        return entry

    def settled(self, study_uid: str, instances) -> bool:
        """Whether the study has as many instances as at the last poll (None: the PACS does not
        say; then: whether it was seen before). Remembers this poll's count (saved)."""
        key = "unknown" if instances is None else int(instances)
        before = self.seen.get(study_uid)
        if before != key:
            self.seen[study_uid] = key
            self.save()
        return before == key

    def save(self) -> None:
        data = {"studies": self.studies, "seen": self.seen}
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock while the block runs (module docstring)."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one process per folder is then the user's rule
            yield self
            return
        handle = open(self.out / LOCK_FILE, "a")
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise PacsError(f"another vfscreen pacs process works in {self.out}: stop it first, or give "
                                "another --out.") from None
            yield self
        finally:
            handle.close()


def describe_entry(entry: dict) -> str:
    """A journal entry in a few words (for ``vfscreen pacs status``-like summaries)."""
    if entry.get("state") == FAILED:
        return f"failed at {entry.get('stage', '?')} ({entry.get('attempts', 1)} attempts): {entry.get('error', '')}"
    return str(entry.get("state", "new"))


def folder_for(out, study_uid: str) -> Path:
    """The results folder of a study: ``OUT/<StudyInstanceUID>/`` (a SPEC §5 exam folder)."""
    return Path(out) / study_uid

