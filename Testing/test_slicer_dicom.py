"""The panel's DICOM export (issue 29, point 5): a CT that Slicer loaded from its DICOM database
gets its SEG, SR, QC capture and KOS written against its own files and imported into the database.

Real MRML nodes (``slicer-core``) and real DICOM files; the DICOM database itself (CTK's
``ctkDICOMDatabase``) is not in ``slicer-core``, so :class:`FolderDatabase` stands in for its two
calls used here (``fileForInstance`` and importing a folder), indexing files by their SOP Instance
UID as the database's indexer does. What needs Slicer itself is listed in docs/methods.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer (the slicer-core wheel) is not installed")
pydicom = pytest.importorskip("pydicom", reason="DICOM output needs pydicom (pip install '.[dicom]')")
pytest.importorskip("highdicom", reason="DICOM output needs highdicom (pip install '.[dicom]')")

from mrml_support import make_mrml_scene  # noqa: E402
from test_dicom_objects import write_ct_series  # noqa: E402  (a phantom CT as a DICOM series)
from VertebralFractureScreenLib import slicer_dicom, slicer_nodes  # noqa: E402
from VertebralFractureScreenLib.errors import InputError  # noqa: E402
from VertebralFractureScreenLib.levels import TOTAL_CLASS_NAMES  # noqa: E402
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, make_phantom, write_phantom  # noqa: E402

SPEC = PhantomSpec(levels=("T12", "L1", "L2", "L3"), spacing=(2.0, 2.0, 2.0), supersampling=1,
                   fractures=(Fracture.parse("L1:wedge:0.35"),), seed=3)


class FolderDatabase:
    """Stands in for Slicer's DICOM database: SOP Instance UID → file, and a folder import."""

    def __init__(self):
        self.files: dict[str, str] = {}
        self.imported: list[str] = []

    def fileForInstance(self, uid: str) -> str:  # noqa: N802 (ctkDICOMDatabase's name)
        return self.files.get(uid, "")

    def import_folder(self, folder: str) -> None:
        self.imported.append(folder)
        for path in sorted(Path(folder).glob("*.dcm")):
            self.files[str(pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID)] = str(path)


@pytest.fixture(scope="module")
def scene_from_dicom(tmp_path_factory):
    """A phantom CT written as a DICOM series, in the database, loaded as a volume node with the
    slices' UIDs (as Slicer's DICOM plugin leaves them), with its segmentation node."""
    folder = tmp_path_factory.mktemp("slicer_dicom")
    phantom = make_phantom(SPEC)
    paths = write_phantom(SPEC, folder / "phantom")
    series = write_ct_series(folder / "ct", phantom.ct.astype(np.int16), phantom.ijk_to_ras)
    database = FolderDatabase()
    database.import_folder(str(folder / "ct"))
    mrml = make_mrml_scene()
    volume = mrml.load_volume(paths["ct"], name="ct")
    uids = [str(pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID) for p in series]
    volume.SetAttribute(slicer_dicom.INSTANCE_UIDS_ATTRIBUTE, " ".join(uids))
    segmentation = mrml.load_segmentation(paths["total"], TOTAL_CLASS_NAMES, name="total")
    result, _ = slicer_nodes.screen_into_scene(volume, segmentation)
    return dict(folder=folder, database=database, volume=volume, result=result, series=series, mrml=mrml)


def test_the_objects_reference_the_ct_s_own_files_and_enter_the_database(scene_from_dicom, tmp_path):
    s = scene_from_dicom
    s["result"].write(tmp_path, qc=True)
    written = slicer_dicom.export_to_dicom_database(s["result"], s["volume"], tmp_path, s["database"].fileForInstance,
                                                    s["database"].import_folder)
    assert set(written) == {"seg", "sr", "sc", "kos"}
    assert s["database"].imported[-1] == str(tmp_path / "dicom")
    ct = pydicom.dcmread(str(s["series"][0]), stop_before_pixels=True)
    ct_uids = {str(pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID) for p in s["series"]}
    for name, path in written.items():
        ds = pydicom.dcmread(str(path))
        assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.PatientID == ct.PatientID, name
        assert s["database"].fileForInstance(str(ds.SOPInstanceUID)) == str(path), name  # imported
    seg = pydicom.dcmread(str(written["seg"]))
    referenced = {str(item.ReferencedSOPInstanceUID) for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == ct_uids
    import highdicom as hd

    groups = hd.sr.srread(str(written["sr"])).content.get_volumetric_roi_measurement_groups()
    by_level = {str(group.tracking_identifier): group for group in groups}
    l1 = next(r for r in s["result"].vertebrae if r["level"] == "L1")
    assert by_level["L1"].get_measurements()[0].value == pytest.approx(l1["ha_mm"], rel=1e-12)


def test_a_ct_not_from_dicom_exports_nothing_and_a_lost_file_is_one_sentence(scene_from_dicom, tmp_path):
    s = scene_from_dicom
    plain = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16), name="plain")
    assert slicer_dicom.export_to_dicom_database(s["result"], plain, tmp_path, s["database"].fileForInstance,
                                                 s["database"].import_folder) == {}
    assert not (tmp_path / "dicom").exists()
    gone = FolderDatabase()
    gone.files = dict(list(s["database"].files.items())[1:])
    with pytest.raises(InputError, match=r"1 of the \d+ DICOM files of ct are no longer in Slicer's DICOM database"):
        slicer_dicom.export_to_dicom_database(s["result"], s["volume"], tmp_path, gone.fileForInstance,
                                              gone.import_folder)
    assert gone.imported == [] and not (tmp_path / "dicom").exists()
