"""The screening results into Slicer's DICOM database, where QuantitativeReporting shows them
(issue 29, point 5).

A CT that Slicer loaded from its DICOM database carries the SOP Instance UIDs of its slices in the
volume node's attribute ``DICOM.instanceUIDs`` (space-separated, as Slicer's DICOM scalar volume
plugin sets it). Those UIDs lead, through the database (``fileForInstance``), back to the CT's
files: the reference series of the DICOM objects (:mod:`.report.dicom_objects`: SEG, TID 1500 SR,
the QC picture's Secondary Capture, the Key Object Selection). The objects are written into the
export folder's ``dicom/`` and that folder is then imported into the database, so the DICOM
browser lists them under the CT's study and QuantitativeReporting loads the SR with its SEG.

Both Slicer pieces are passed in: ``file_for_instance`` (``slicer.dicomDatabase.fileForInstance``)
and ``import_folder`` (e.g. ``DICOMLib.DICOMUtils.importDicom``), so the rule is tested headless
with ``slicer-core``, which has no DICOM database (CTK); what needs Slicer itself is listed in
``docs/methods.md`` (Slicer integration).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import InputError

INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
"""The volume node attribute in which Slicer keeps the SOP Instance UIDs of the slices it loaded."""


def ct_dicom_files(volume_node, file_for_instance: Callable[[str], str]) -> list[Path] | None:
    """The DICOM files the CT ``volume_node`` was loaded from, found through the DICOM database's
    ``file_for_instance(uid)``; None when the node did not come from DICOM (no UIDs). A slice whose
    file the database no longer has is an InputError: the objects would reference a partial series."""
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        return None
    files = [file_for_instance(uid) or "" for uid in uids]
    missing = sum(1 for path in files if not path or not Path(path).is_file())
    if missing:
        raise InputError(f"{missing} of the {len(uids)} DICOM files of {volume_node.GetName()} are no longer in "
                         "Slicer's DICOM database: load the CT from the database again to export DICOM results")
    return [Path(path) for path in files]


def export_to_dicom_database(result, volume_node, out_dir, file_for_instance: Callable[[str], str],
                             import_folder: Callable[[str], object]) -> dict[str, Path]:
    """Write ``result``'s DICOM objects against the CT's own DICOM files into ``out_dir/dicom/`` and
    import that folder into the DICOM database (``import_folder(path)``). Returns the objects
    written (``{}`` when the CT did not come from DICOM: nothing is written or imported).

    ``result`` must hold its label maps (a result of this session's Apply; one rebuilt from a
    saved scene's tables does not): otherwise an InputError says so. The QC picture's capture is
    written when ``out_dir/qc.png`` exists."""
    files = ct_dicom_files(volume_node, file_for_instance)
    if files is None:
        return {}
    if result.inputs is None or result.inputs.labels is None:
        raise InputError("the DICOM results need this session's measurements (the label maps): press Apply, then "
                         "export again")
    from .report.dicom_objects import DICOM_FOLDER, write_dicom_objects

    written = write_dicom_objects(result, out_dir, reference=files, required=True)
    import_folder(str(Path(out_dir) / DICOM_FOLDER))
    return written
