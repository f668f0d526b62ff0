"""The DICOM objects of a screened exam (issue 29): SEG, TID 1500 SR, Secondary Capture, KOS.

Each case writes a real DICOM CT series of a small phantom (L1–L3, 1.5 x 1.5 x 2 mm, fresh UIDs)
in one orientation, screens it from that folder with its label map, writes the objects and checks
them with the standard's own tools, as a PACS or Slicer would read them:

* ``dciodvfy`` (Debian ``dicom3tools``) finds no error in any object (its warnings are listed in
  the test's output);
* ``tid1500reader`` (PyPI ``dcmqi``) reads every measurement of the SR back, with its value, unit
  and concept, Ha, Hm and Hp three distinct concepts;
* ``segimage2itkimage`` (dcmqi) reads the SEG back as label maps whose voxels, resampled by
  nothing, equal ours on the CT's grid: LPS, flipped and oblique series;
* highdicom reads the SEG and the SR back (``segread``, ``srread``).

A tool that is not installed skips its check with the reason (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="DICOM output needs pydicom (pip install '.[dicom]')")
hd = pytest.importorskip("highdicom", reason="DICOM output needs highdicom (pip install '.[dicom]')")

from VertebralFractureScreenLib import geometry  # noqa: E402
from VertebralFractureScreenLib.errors import InputError  # noqa: E402
from VertebralFractureScreenLib.exam.screening import screen_exam  # noqa: E402
from VertebralFractureScreenLib.io.volume import Volume  # noqa: E402
from VertebralFractureScreenLib.phantom.render import make_phantom  # noqa: E402
from VertebralFractureScreenLib.phantom.spec import Fracture, PhantomSpec  # noqa: E402
from VertebralFractureScreenLib.report import dicom_codes as dc  # noqa: E402
from VertebralFractureScreenLib.report.dicom_objects import write_dicom_objects  # noqa: E402
from VertebralFractureScreenLib.report.dicom_sr import (HEIGHT_KEYS, MUSCLE_MEASUREMENTS, ROI_MEASUREMENTS,  # noqa: E402
                                                        VERTEBRA_MEASUREMENTS, heights_shown)
from VertebralFractureScreenLib.report.measurements import EXAM_FIELDS, MUSCLE_TABLE, VERTEBRA_TABLE, by_key  # noqa: E402

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# ------------------------------------------------------------------------------------------------
# A DICOM CT series of a phantom
# ------------------------------------------------------------------------------------------------


def _save(ds, path: Path) -> None:
    """Write ``ds`` as a DICOM Part 10 file with pydicom 2.4 or 3."""
    ds.preamble = b"\0" * 128
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
    else:
        ds.save_as(str(path), enforce_file_format=True)


def write_ct_series(folder: Path, ct: np.ndarray, ijk_to_ras: np.ndarray, *, patient: str = "Phantom^Spine",
                    reverse_files: bool = False) -> list[Path]:
    """A single-frame CT series of ``ct`` (HU ``[k, j, i]``, int16) on the grid ``ijk_to_ras``: one
    instance per slice ``k`` (rows ``j``, columns ``i``), fresh UIDs, in LPS as DICOM has it.
    ``reverse_files``: number the files from the last slice (readers must sort by position)."""
    folder.mkdir(parents=True, exist_ok=True)
    ijk_to_lps = geometry.LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
    steps = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(steps, axis=0)
    orientation = np.concatenate([steps[:, 0] / spacing[0], steps[:, 1] / spacing[1]])
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    paths = []
    for k in range(ct.shape[0]):
        meta = pydicom.dataset.FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_STORAGE, pydicom.uid.generate_uid()
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient, "VFS-0001", "19480214", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101500", "ACC0001", "1"
        ds.ReferringPhysicianName, ds.StudyDescription, ds.Manufacturer = "", "CT abdomen", "Phantom"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, (ct.shape[0] - k if reverse_files else k + 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in steps @ [0, 0, k] + ijk_to_lps[:3, 3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # rows (j), columns (i)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = ct.shape[1], ct.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.KVP = "120"
        ds.PixelData = np.ascontiguousarray(ct[k], dtype="<i2").tobytes()
        path = folder / f"ct_{ds.InstanceNumber:04d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def flipped_grid(array: np.ndarray, ijk_to_ras: np.ndarray, axes=(0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """``array`` with the given array axes reversed, and the grid matrix that keeps every voxel where
    it was in the patient."""
    matrix = np.array(ijk_to_ras, dtype=float)
    for axis in axes:
        voxel_axis = 2 - axis  # array axis 0 is k, the third voxel axis
        n = array.shape[axis]
        matrix[:3, 3] += matrix[:3, voxel_axis] * (n - 1)
        matrix[:3, voxel_axis] *= -1
    return np.flip(array, axes).copy(), matrix


# ------------------------------------------------------------------------------------------------
# The exams: one per orientation of the series
# ------------------------------------------------------------------------------------------------

ORIENTATIONS = ("LPS", "flipped", "oblique")
"""``LPS``: rows and columns along L and P, slices from feet to head; ``flipped``: rows towards the
patient's right, columns towards P, slices from head to feet and the files numbered backwards, no
``vertebrae_body`` map (whole vertebrae); ``oblique``: the grid tilted 15° and 10°."""


def _phantom(orientation: str):
    spec = PhantomSpec(levels=("L1", "L2", "L3"), spacing=(1.5, 1.5, 2.0), supersampling=1,
                       grid_orientation="RAS" if orientation == "flipped" else orientation,
                       fractures=(Fracture("L2", "wedge", 0.3),))
    return make_phantom(spec)


class Exam:
    """One screened exam and its DICOM objects."""

    def __init__(self, root: Path, orientation: str):
        self.orientation = orientation
        phantom = _phantom(orientation)
        ct, grid = phantom.ct, phantom.ijk_to_ras
        if orientation == "flipped":
            ct, grid = flipped_grid(ct, grid, axes=(0, 1))
        self.written = Volume(ct, grid)  # the grid the instances were written on
        self.files = write_ct_series(root / "ct", ct, grid, reverse_files=orientation == "flipped")
        body = None if orientation == "flipped" else Volume(phantom.vertebrae_body, phantom.ijk_to_ras)
        self.result = screen_exam(root / "ct", seg=Volume(phantom.total, phantom.ijk_to_ras), body_seg=body,
                                  model="demo" if orientation == "LPS" else None)
        self.out = root / "out"
        self.result.write(self.out)
        self.paths = write_dicom_objects(self.result, self.out)
        self.ct_header = pydicom.dcmread(str(self.files[0]), stop_before_pixels=True)

    def read(self, name: str):
        return pydicom.dcmread(str(self.paths[name]))

    def expected_masks(self) -> dict[str, np.ndarray]:
        """Tracking ID of each segment → its voxels on the CT's grid, from the screening's own label
        maps (computed here, not by the writer)."""
        from VertebralFractureScreenLib.measure.muscles import MUSCLE_LABELS
        from VertebralFractureScreenLib.measure.trabecular_roi import trabecular_roi_mask

        inputs = self.result.inputs
        labels = inputs.labels.array
        body = None if inputs.body_labels is None else np.asarray(inputs.body_labels)
        masks = {}
        for heights, roi in zip(self.result.heights, self.result.rois):
            masks[f"vertebra:{heights.level}"] = (labels == heights.label) & (True if body is None else body == 1)
            slices, mask, _ = trabecular_roi_mask(heights, labels, inputs.ct.ijk_to_ras, body_labels=inputs.body_labels)
            whole = np.zeros(labels.shape, dtype=bool)
            whole[slices] = mask
            assert int(whole.sum()) == roi.voxels  # the phantom has no focal lesion to leave out
            masks[f"roi:{heights.level}"] = whole
        for name, label in MUSCLE_LABELS.items():
            masks[f"muscle:{name}"] = labels == label
        return masks


@pytest.fixture(scope="module", params=ORIENTATIONS)
def exam(request, tmp_path_factory) -> Exam:
    return Exam(tmp_path_factory.mktemp(f"dicom-{request.param}"), request.param)


def _tool(name: str) -> str:
    """The path of a validator (on PATH or beside this Python), or a skip with the reason."""
    beside = Path(sys.executable).parent / name
    path = shutil.which(name) or (str(beside) if beside.exists() else None)
    if path is None:
        how = ("Debian's dicom3tools (apt-get install dicom3tools; .ci/run installs it as root)" if name == "dciodvfy"
               else "dcmqi (pip install dcmqi; its 1.5 wheels need Python >= 3.10, where the test extra installs it)")
        pytest.skip(f"{name} is not installed: it comes with {how}")
    return path


# ------------------------------------------------------------------------------------------------
# What is written
# ------------------------------------------------------------------------------------------------


def test_the_four_objects_are_new_series_in_the_ct_s_study(exam):
    assert set(exam.paths) == {"seg", "sr", "sc", "kos"}
    assert all(path.parent == exam.out / "dicom" for path in exam.paths.values())
    objects = {name: exam.read(name) for name in exam.paths}
    ct = exam.ct_header
    for name, ds in objects.items():
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                        "StudyTime", "AccessionNumber", "StudyID"):
            assert ds.get(keyword) == ct.get(keyword), (name, keyword)
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID"):
            uid = pydicom.uid.UID(str(ds.get(keyword)))
            assert uid.is_valid and uid != ct.get(keyword), (name, keyword)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert len({ds.SeriesInstanceUID for ds in objects.values()}) == 4
    assert objects["seg"].FrameOfReferenceUID == ct.FrameOfReferenceUID
    observer = [item for item in objects["sr"].ContentSequence if item.ValueType == "TEXT"
                and item.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer Model Name"]
    from VertebralFractureScreenLib import __version__

    assert observer and observer[0].TextValue == f"VertebralFractureScreenLib {__version__}"
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in objects["kos"].ContentSequence if item.ValueType in ("COMPOSITE", "IMAGE")}
    assert referenced == {str(objects[name].SOPInstanceUID) for name in ("seg", "sr", "sc")}


def test_dciodvfy_finds_no_error(exam):
    tool = _tool("dciodvfy")
    warnings = {}
    for name, path in exam.paths.items():
        done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, f"dciodvfy {name}: {errors}"
        warnings[name] = sorted(set(line for line in lines if line.startswith("Warning")))
    print(f"dciodvfy warnings ({exam.orientation}): {json.dumps(warnings, indent=1)}")
    # the one kind of warning left: dciodvfy does not know this product's private coding scheme
    assert all("99VFS" in line for lines in warnings.values() for line in lines), warnings


def _finite(value) -> bool:
    return value is not None and not isinstance(value, bool) and np.isfinite(float(value))


def expected_measurements(result) -> list[tuple]:
    """(group, concept, derivation, unit, value) of every number the SR must hold, from the result's
    rows and ``exam.json`` fields and the registry's codes."""
    rows = []
    vertebra, muscle, exam_fields = by_key(VERTEBRA_TABLE), by_key(MUSCLE_TABLE), by_key(EXAM_FIELDS)

    def add(group, quantity, value):
        if _finite(value):
            derivation = quantity.derivation.value if quantity.derivation else None
            rows.append((group, (quantity.code.scheme, quantity.code.value), derivation, quantity.unit, float(value)))

    for row in result.vertebrae:
        for key in VERTEBRA_MEASUREMENTS:
            if heights_shown(row) or key not in HEIGHT_KEYS:
                add(row["level"], vertebra[key], row[key])
        for key in ROI_MEASUREMENTS:
            add(f"{row['level']} trabecular ROI", vertebra[key], row[key])
    for row in result.muscles:
        if "not_segmented" not in row["flags"]:
            for key in MUSCLE_MEASUREMENTS:
                add(f"{row['muscle']} {row['level']}", muscle[key], row[key])
    exam = result.exam
    fields = [("fracture.max_grade", "Fractures"), ("fracture.count", "Fractures"),
              ("fracture.graded_levels", "Fractures"), ("bone.l1_hu", "Bone density"), ("contrast.aorta_hu", "Contrast")]
    if exam["model"]["probability"] is not None:
        fields += [("model.probability", "Fracture model"), ("model.threshold", "Fracture model")]
    for key, group in fields:
        part, name = key.split(".")
        add(group, exam_fields[key], exam[part][name])
    return rows


def test_tid1500reader_reads_every_measurement(exam, tmp_path):
    tool = _tool("tid1500reader")
    done = subprocess.run([tool, "--inputDICOM", str(exam.paths["sr"]), "--outputMetadata", str(tmp_path / "sr.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    groups = {group["TrackingIdentifier"]: group for group in json.loads((tmp_path / "sr.json").read_text())["Measurements"]}
    read = {}
    for name, group in groups.items():
        for item in group.get("measurementItems", []):
            derivation = item.get("derivationModifier", {}).get("CodeValue")
            key = (name, (item["quantity"]["CodingSchemeDesignator"], item["quantity"]["CodeValue"]), derivation)
            assert key not in read, f"two measurements read as the same concept: {key}"
            read[key] = (item["units"]["CodeValue"], float(item["value"]))
    expected = expected_measurements(exam.result)
    assert len(expected) > 100 if exam.orientation == "LPS" else len(expected) > 80
    for group, concept, derivation, unit, value in expected:
        got_unit, got = read.pop((group, concept, derivation))
        assert got_unit == unit and got == pytest.approx(value, rel=1e-12, abs=1e-12), (group, concept)
    assert not read, f"measurements nobody expected: {sorted(read)}"
    for level in ("L1", "L2", "L3"):
        heights = [item["quantity"]["CodeValue"] for item in groups[level]["measurementItems"]
                   if item["units"]["CodeValue"] == "mm"]
        assert heights == ["ha", "hm", "hp"]  # three distinct concepts, as Slicer lists them
    seg = exam.read("seg")
    for name, group in groups.items():
        if "ReferencedSegment" in group:
            assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
            description = seg.SegmentSequence[group["ReferencedSegment"] - 1]
            kind = "roi" if "trabecular ROI" in name else "vertebra" if name in ("L1", "L2", "L3") else "muscle"
            assert description.TrackingID == f"{kind}:{name.split()[0]}"
    grades = {item["conceptCode"]["CodeValue"]: item["conceptValue"]["CodeValue"]
              for item in groups["L2"]["qualitativeEvaluations"]}
    row = next(r for r in exam.result.vertebrae if r["level"] == "L2")
    assert grades == {"genant": f"genant_{row['genant_grade']}", "shape": f"shape_{row['shape']}"}
    assert row["genant_grade"] >= 1
    fractured = [item["conceptValue"]["CodeValue"] for item in groups["Fractures"]["qualitativeEvaluations"]
                 if item["conceptCode"]["CodeValue"] == dc.FRACTURED_LEVEL.value]
    assert fractured == [dc.vertebra_code(level).value for level in exam.result.exam["fracture"]["fractured_levels"]]


def _segments_by_id(seg) -> dict[str, int]:
    return {str(item.TrackingID): int(item.SegmentNumber) for item in seg.SegmentSequence}


def test_segimage2itkimage_gives_our_label_maps_voxel_for_voxel(exam, tmp_path):
    import SimpleITK as sitk

    from VertebralFractureScreenLib.io.images import resample_by_indexing
    from VertebralFractureScreenLib.io.sitk_bridge import volume_from_sitk

    tool = _tool("segimage2itkimage")
    done = subprocess.run([tool, "--inputDICOM", str(exam.paths["seg"]), "--outputDirectory", str(tmp_path),
                           "--outputType", "nrrd"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ct = exam.result.inputs.ct
    expected = exam.expected_masks()
    numbers = _segments_by_id(exam.read("seg"))
    assert set(numbers) == set(expected)  # every vertebra, ROI and muscle is a segment
    for key, number in numbers.items():
        volume = volume_from_sitk(sitk.ReadImage(str(tmp_path / f"{number}.nrrd")))
        on_ct = resample_by_indexing(volume, ct)  # None unless its grid is the CT's up to axis order
        assert on_ct is not None, f"{key}: dcmqi's grid is not the CT's"
        assert np.array_equal(on_ct > 0, expected[key]), f"{key} ({exam.orientation}): voxels differ"


def test_highdicom_reads_the_seg_and_the_sr_back(exam):
    from VertebralFractureScreenLib.io.images import resample_by_indexing

    seg = hd.seg.segread(str(exam.paths["seg"]))
    numbers = _segments_by_id(seg)
    ct = exam.result.inputs.ct
    uids = [str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in exam.files]
    k_of = {uid: k for k, uid in enumerate(uids)}  # instance → slice k of the written grid
    referenced = [uid for _, _, uid in seg.get_source_image_uids()]
    for key, mask in exam.expected_masks().items():
        written = resample_by_indexing(Volume(mask.astype(np.uint8), ct.ijk_to_ras), exam.written)
        pixels = seg.get_pixels_by_source_instance(referenced, segment_numbers=[numbers[key]])[..., 0]
        for uid, frame in zip(referenced, pixels):
            assert np.array_equal(frame > 0, written[k_of[uid]] > 0), f"{key}: instance {k_of[uid]}"
        assert sum(int(written[k_of[uid]].sum()) for uid in referenced) == int(mask.sum())
    sr = hd.sr.srread(str(exam.paths["sr"]))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(numbers) - 4 + sum(1 for row in exam.result.muscles if "not_segmented" not in row["flags"])
    first = groups[0]
    row = exam.result.vertebrae[0]
    assert str(first.tracking_identifier) == row["level"]
    assert first.get_measurements()[0].value == pytest.approx(row["ha_mm"], rel=1e-12)
    assert first.get_measurements()[0].unit.value == "mm"
    assert len(sr.content.get_image_measurement_groups()) == (4 if exam.orientation == "LPS" else 3)


# ------------------------------------------------------------------------------------------------
# Without a DICOM CT
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lps_exam(tmp_path_factory) -> Exam:
    return Exam(tmp_path_factory.mktemp("dicom-reference"), "LPS")


def _screen_in_memory(exam: Exam):
    """The same CT screened from memory (no DICOM behind it)."""
    inputs = exam.result.inputs
    return screen_exam(Volume(np.array(inputs.ct.array), inputs.ct.ijk_to_ras), seg=inputs.labels)


def test_a_ct_not_read_from_dicom_writes_nothing_without_a_reference(lps_exam, tmp_path):
    result = _screen_in_memory(lps_exam)
    assert write_dicom_objects(result, tmp_path) == {}
    assert not (tmp_path / "dicom").exists()
    with pytest.raises(InputError, match="not read from DICOM.*give its DICOM series as the reference"):
        write_dicom_objects(result, tmp_path, required=True)


def test_a_reference_series_on_the_ct_s_grid_is_referenced(lps_exam, tmp_path):
    result = _screen_in_memory(lps_exam)
    paths = write_dicom_objects(result, tmp_path, lps_exam.files[0].parent)
    assert set(paths) == {"seg", "sr", "kos"}  # no QC picture in tmp_path: no Secondary Capture
    seg = pydicom.dcmread(str(paths["seg"]), stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == lps_exam.ct_header.SeriesInstanceUID
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(lps_exam.files)


def test_a_reference_series_off_the_ct_s_grid_is_refused(lps_exam, tmp_path):
    result = _screen_in_memory(lps_exam)
    inputs = result.inputs
    shifted = inputs.ct.ijk_to_ras.copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 0]  # half a voxel along i
    other = write_ct_series(tmp_path / "other", np.array(inputs.ct.array), shifted)
    with pytest.raises(InputError, match="not on the CT's voxel grid"):
        write_dicom_objects(result, tmp_path, other[0].parent)
    with pytest.raises(InputError, match="not on the CT's voxel grid"):
        write_dicom_objects(result, tmp_path, other[:-1])  # a slice missing


def test_the_library_imports_without_pydicom_and_highdicom():
    code = ("import sys; sys.modules['pydicom'] = None; sys.modules['highdicom'] = None\n"
            "import VertebralFractureScreenLib.cli, VertebralFractureScreenLib.report.dicom_objects\n"
            "from VertebralFractureScreenLib.report.dicom_series import dicom_packages\n"
            "from VertebralFractureScreenLib.errors import DependencyError\n"
            "try:\n    dicom_packages()\nexcept DependencyError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'vertebral-fracture-screen[dicom]'" in done.stdout


def test_private_codes_fit_dicom_and_are_documented():
    from VertebralFractureScreenLib.report.measurements import PRIVATE_SCHEME

    methods = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text(encoding="utf-8")
    for code in dc.private_codes():
        assert code.scheme == PRIVATE_SCHEME and len(code.value) <= 16, code
        assert f"`{code.value}`" in methods, f"{code.value} is not listed in docs/methods.md"
    assert dc.vertebra_code("L1").value == "66794005" and dc.vertebra_code("T12").value == "23215003"
    assert dc.structure_codes("iliopsoas_left") == (dc.Code("68455001", "SCT", "Iliopsoas muscle"),
                                                    dc.Code("7771000", "SCT", "Left"))


def test_the_directly_encoded_parts_are_the_bytes_pydicom_writes(lps_exam, tmp_path):
    """The SR's content tree and evidence, encoded by ``report/dicom_encode.py``, are byte for byte
    what pydicom's own writer makes of the same dataset."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from VertebralFractureScreenLib.report.dicom_encode import write_part10
    from VertebralFractureScreenLib.report.dicom_objects import reference_series
    from VertebralFractureScreenLib.report.dicom_seg import exam_segments
    from VertebralFractureScreenLib.report.dicom_sr import CURRENT_REQUESTED_PROCEDURE_EVIDENCE, measurement_report, sr_document

    result = lps_exam.result
    series, seg = reference_series(result), lps_exam.read("seg")
    report = measurement_report(result, series, str(seg.SOPInstanceUID), exam_segments(result))
    uids = {"series": pydicom.uid.generate_uid(), "instance": pydicom.uid.generate_uid(), "series_number": 1}
    equipment = {"Manufacturer": "m", "ManufacturerModelName": "n", "SoftwareVersions": "1"}
    ds = sr_document(report, series, [*series.datasets, seg], uids, equipment)
    write_part10(tmp_path / "sr.dcm", ds, fast_from=CURRENT_REQUESTED_PROCEDURE_EVIDENCE)
    ours = (tmp_path / "sr.dcm").read_bytes()
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    theirs = fp.getvalue()
    assert len(theirs) > 50_000 and ours.endswith(theirs)


def test_vfscreen_screen_writes_the_objects_of_a_dicom_ct(lps_exam, tmp_path, capsys):
    """The command line: a DICOM CT gets OUT/dicom/ by itself, --no-dicom leaves it out, a NIfTI CT
    gets it with --dicom-reference, and asking for both is one sentence and exit status 2."""
    from VertebralFractureScreenLib.cli import main
    from VertebralFractureScreenLib.io.images import write_volume

    seg = tmp_path / "total.nii.gz"
    write_volume(seg, lps_exam.result.inputs.labels)
    assert main(["screen", str(lps_exam.files[0].parent), "--seg", str(seg), "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a" / "dicom").iterdir()) == ["kos.dcm", "qc.dcm", "seg.dcm", "sr.dcm"]
    assert "DICOM objects" in capsys.readouterr().out
    assert main(["screen", str(lps_exam.files[0].parent), "--seg", str(seg), "--out", str(tmp_path / "b"),
                 "--no-dicom"]) == 0
    assert not (tmp_path / "b" / "dicom").exists()
    ct = tmp_path / "ct.nii.gz"
    write_volume(ct, lps_exam.result.inputs.ct)
    assert main(["screen", str(ct), "--seg", str(seg), "--out", str(tmp_path / "c"), "--no-qc",
                 "--dicom-reference", str(lps_exam.files[0].parent)]) == 0
    assert sorted(p.name for p in (tmp_path / "c" / "dicom").iterdir()) == ["kos.dcm", "seg.dcm", "sr.dcm"]
    capsys.readouterr()
    assert main(["screen", str(ct), "--seg", str(seg), "--out", str(tmp_path / "d"), "--no-dicom",
                 "--dicom-reference", str(lps_exam.files[0].parent)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
