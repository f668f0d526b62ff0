"""One study from the PACS and back: choose its CT series, copy it into a temporary folder, screen
it as ``vfscreen screen`` does (results folder with ``dicom/``), and send the SEG, SR, Secondary
Capture and KOS back to the PACS.

Steps and what the journal (:mod:`.journal`) says after each:

1. pull (``find_series``, :func:`.selection.choose_series`, ``retrieve_series`` into a
   ``.pull-*`` folder inside OUT, removed afterwards);
2. screen (:func:`.exam.screening.screen_exam` on that folder, with the study's segmentation from
   ``--seg-dir`` or TotalSegmentator), write ``OUT/<StudyInstanceUID>/`` and its ``dicom/``
   objects: the journal says ``screened`` only now;
3. push the files of ``dicom/`` (SEG, SR, SC, KOS, in that order, the KOS last since it
   references the others): ``done`` only when the PACS stored all of them.

A study whose results are already ``screened`` is only pushed again, from the files on disk: the
same SOP Instance UIDs, so the PACS replaces (or keeps) what an earlier, partial push left there
and never holds two copies. A failure at any step records ``failed`` with its stage and sentence
and raises it again; the next poll or run tries the study again.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, VFSError
from .config import PacsError
from .journal import DONE, FAILED, SCREENED, Journal, folder_for
from .selection import MIN_SLICES, choose_series, describe

if TYPE_CHECKING:  # the cohort package reads images (SimpleITK): not imported when the parser is built
    from ..cohort import CohortSettings

SEG_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")
"""Suffixes of a study's segmentation in ``--seg-dir``: ``<StudyInstanceUID><suffix>``, and
``<StudyInstanceUID>_body<suffix>`` for the vertebrae_body map."""
PUSH_ORDER = ("seg.dcm", "sr.dcm", "qc.dcm", "kos.dcm")
PULL_PREFIX = ".pull-"


@dataclass(frozen=True)
class ScreenOptions:
    """How studies are screened: ``settings``, ``vfscreen screen``'s options (as a cohort holds
    them), the segmentation folder and the series rule's minimum number of images."""

    settings: CohortSettings
    seg_dir: Path | None = None
    min_slices: int = MIN_SLICES


def segmentations(seg_dir, study_uid: str) -> tuple[Path | None, Path | None]:
    """``(seg, body_seg)`` of a study from ``seg_dir`` (None, None without a folder).

    Raises:
        InputError: a folder is given and holds no segmentation of this study (a missing one is
            never replaced by a TotalSegmentator run the user did not ask for)."""
    if seg_dir is None:
        return None, None
    folder = Path(seg_dir)

    def first(stem):
        return next((folder / f"{stem}{s}" for s in SEG_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)

    seg = first(study_uid)
    if seg is None:
        raise InputError(f"no segmentation of study {study_uid} in {folder} (expected {study_uid}.nii.gz)")
    return seg, first(f"{study_uid}_body")


def result_files(folder: Path) -> list[Path] | None:
    """The DICOM objects of a results folder in push order, or None when the set is not complete
    (SEG, SR and KOS always; the Secondary Capture when there is a QC picture)."""
    dicom = Path(folder) / "dicom"
    needed = ["seg.dcm", "sr.dcm", "kos.dcm"] + (["qc.dcm"] if (Path(folder) / "qc.png").is_file() else [])
    if not (Path(folder) / "exam.json").is_file() or not all((dicom / name).is_file() for name in needed):
        return None
    return [dicom / name for name in PUSH_ORDER if (dicom / name).is_file()]


def screen_study(connection, study_uid: str, out, options: ScreenOptions, journal: Journal) -> str:
    """Screen and push one study (module docstring); returns a line for the terminal.

    Raises:
        VFSError: the study failed at some step (recorded in the journal first).
    """
    entry = journal.entry(study_uid)
    if entry.get("state") == DONE:
        return f"study {study_uid}: already screened and pushed ({folder_for(out, study_uid)})"
    folder = folder_for(out, study_uid)
    files = result_files(folder) if entry.get("screened") else None
    stage, note = "pull", "results pushed again from"
    try:
        if files is None:
            header = _pull_and_screen(connection, study_uid, Path(out), folder, options)
            journal.record(study_uid, SCREENED, screened=True, series=header.get("SeriesInstanceUID"))
            files, note = result_files(folder), f"{describe(header)} screened; results in"
            if files is None:
                raise InputError(f"the DICOM objects of study {study_uid} were not all written in {folder / 'dicom'}")
        stage = "push"
        push(connection, study_uid, files)
    except VFSError as error:
        journal.record(study_uid, FAILED, stage=getattr(error, "stage", stage), error=str(error).rstrip("."))
        raise
    journal.record(study_uid, DONE, pushed=[f.name for f in files])
    return f"study {study_uid}: {note} {folder}; {len(files)} result files stored in {connection.describe()}"


def push(connection, study_uid: str, files: list[Path]) -> None:
    """Store the result files and check that the PACS lists every one of them afterwards: a server
    may answer success for an instance it filtered out (Orthanc's Lua filters do), and a study is
    ``done`` only when its whole result set is in the PACS.

    Raises:
        PacsError: a file was refused, or is not listed after the push."""
    import pydicom

    connection.store(files, study_uid)
    uids = {str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID): f.name for f in files}
    listed = connection.stored_instances(study_uid)
    missing = sorted(name for uid, name in uids.items() if uid not in listed)
    if missing:
        raise PacsError(f"{connection.describe()} accepted but does not keep {len(missing)} of {len(files)} result "
                        f"files ({', '.join(missing)}; a filter of the PACS may drop them)")


def _pull_and_screen(connection, study_uid: str, out: Path, folder: Path, options: ScreenOptions) -> dict:
    """Steps 1 and 2 (module docstring): the chosen series' header. The failing step is set as
    the raised error's ``stage`` (``pull``, ``screen``)."""
    from ..exam.screening import screen_exam
    from ..report.dicom_objects import write_dicom_objects

    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"{PULL_PREFIX}*"):  # a killed run's copy: never read, only removed
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=PULL_PREFIX, dir=out) as scratch:
        try:
            header = choose_series(connection.find_series(study_uid), options.min_slices, "the study")
            series_uid = str(header["SeriesInstanceUID"])
            connection.retrieve_series(study_uid, series_uid, Path(scratch))
        except VFSError as error:
            error.stage = "pull"
            raise
        try:
            seg, body = segmentations(options.seg_dir, study_uid)
            result = screen_exam(scratch, seg=seg, body_seg=body, exam_id=study_uid, series_uid=series_uid,
                                 out_dir=folder, keep_label_maps=True, **options.settings.screen_options(),
                                 sources={"ct": f"{connection.describe()}, study {study_uid}, series {series_uid}"})
            result.write(folder, qc=options.settings.qc)
            write_dicom_objects(result, folder, reference=scratch, series_uid=series_uid, required=True)
        except VFSError as error:
            error.stage = "screen"
            raise
    return header

