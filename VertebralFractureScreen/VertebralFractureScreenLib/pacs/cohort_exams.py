"""A cohort from a PACS query: the studies a query finds become the exam list of the cohort engine
(:func:`.cohort.run_cohort`), which screens, resumes and tabulates them as for a folder or a
manifest.

Each study's CT series is chosen by :mod:`.selection` and copied once into
``OUT/pacs-series/<StudyInstanceUID>/`` (kept: the engine reads the exams from there, and a re-run
finds them complete and pulls nothing); the exam ID is the StudyInstanceUID, the series its
``series`` and the segmentation, with ``seg_dir``, ``<StudyInstanceUID>.nii.gz`` (as
:func:`.study.segmentations`). A copy is written beside and renamed into place when whole, with
``.retrieved.json`` (series and instance count) last: a folder without it is a killed copy and
is pulled again. Studies without a CT series to screen, or whose copy fails, are listed with
their one-sentence reason and left out; the others are screened. Cohorts write no DICOM objects
and push nothing back (a cohort is research, not the clinical record).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import VFSError
from ..io.files import atomic_write_text
from .selection import choose_series
from .study import PULL_PREFIX, segmentations

SERIES_FOLDER = "pacs-series"
MARKER = ".retrieved.json"


def pulled_series(connection, study_uid: str, out: Path, min_slices: int) -> tuple[Path, str]:
    """``(folder, series UID)`` of the study's chosen CT series under ``OUT/pacs-series``,
    pulled unless a complete copy is there."""
    header = choose_series(connection.find_series(study_uid), min_slices, "the study")
    series_uid = str(header["SeriesInstanceUID"])
    folder = Path(out) / SERIES_FOLDER / study_uid
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if marker.get("series") == series_uid:
            return folder, series_uid
    except (OSError, ValueError):
        pass
    scratch = folder.parent / f"{PULL_PREFIX}{study_uid}"
    shutil.rmtree(scratch, ignore_errors=True)
    count = connection.retrieve_series(study_uid, series_uid, scratch)
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)
    atomic_write_text(folder / MARKER, json.dumps({"series": series_uid, "instances": count}) + "\n")
    return folder, series_uid


def pacs_exams(connection, query, out, *, seg_dir=None, min_slices: int, say=print) -> tuple[list, list[str]]:
    """``(exams, skipped)``: a :class:`.cohort.CohortExam` per study of ``query`` that has a CT
    series to screen, and a sentence per study left out (module docstring).

    Raises:
        PacsError: the PACS cannot be searched, or the query finds no study.
    """
    from ..cohort import CohortExam
    from .config import PacsError

    studies = connection.find_studies(query)
    if not studies:
        raise PacsError(f"{connection.describe()} has no study matching {_described(query)}.")
    exams, skipped = [], []
    for study in studies:
        uid = str(study.get("StudyInstanceUID") or "")
        try:
            seg, body = segmentations(seg_dir, uid)
            folder, series_uid = pulled_series(connection, uid, Path(out), min_slices)
        except VFSError as error:
            skipped.append(f"study {uid}: {str(error).rstrip('.')}")
            continue
        exams.append(CohortExam(uid, str(folder), None if seg is None else str(seg),
                                None if body is None else str(body), series_uid=series_uid))
        say(f"study {uid}: series {series_uid} in {folder}")
    return exams, skipped


def _described(query) -> str:
    return ", ".join(f"{key} {value}" for key, value in query.filters().items())
