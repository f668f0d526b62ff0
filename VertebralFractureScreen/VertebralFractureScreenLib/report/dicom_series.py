"""The CT's DICOM series as the DICOM objects reference it (:mod:`.dicom_objects`): its instances'
headers, the patient and study they belong to, and which voxel of the screened CT each pixel of
each instance is.

:func:`reference_candidates` reads the headers (pixels are not read) of the series given as a
folder, a file of the series, a list of files or a list of pydicom datasets. :func:`match_grid`
finds where those instances lie on the CT's voxel grid, from their ImagePositionPatient,
ImageOrientationPatient and PixelSpacing alone (not from the files' order): the CT may have been
read from the same series (LPS or flipped axes, oblique slices, slices in any order) or from a
NIfTI or NRRD file converted from it. It refuses, with one sentence, a series that is not the CT's
grid voxel for voxel: each instance must be one whole slice of the CT, every slice must have its
instance, to within :data:`GRID_TOLERANCE_VOXELS`. The result turns a mask on the CT's grid into
the frames of a DICOM Segmentation on those instances, by transposing and flipping the array's
axes only: no voxel is resampled. (Headers are read with pydicom, not through
:mod:`..io.dicom`'s GDCM scan: that scan alone took 0.5 s on a 500-slice series.)

pydicom is imported here only (optional; the ``dicom`` extra).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from .. import geometry
from ..errors import DependencyError, InputError

GRID_TOLERANCE_VOXELS = 0.05
"""Largest distance, in voxels along each axis, between a pixel of the reference series and the CT
voxel it is taken for (DS rounding and NIfTI's float32 geometry stay far below it)."""

PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight", "StudyInstanceUID", "StudyDate",
    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)
"""Attributes of the Patient, General Study and Patient Study modules copied from the CT into each
new object (those the CT has)."""
TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""Type 2 attributes written empty when the CT lacks them."""

INSTALL_HINT = "pip install 'vertebral-fracture-screen[dicom]'"


def dicom_packages():
    """``(pydicom, highdicom)``, or a :class:`~.errors.DependencyError` saying how to install them."""
    try:
        import highdicom
        import pydicom
    except ImportError as error:
        raise DependencyError(f"writing DICOM objects needs highdicom and pydicom ({error}); install them with "
                              f"{INSTALL_HINT}") from None
    return pydicom, highdicom


HEADER_KEYWORDS = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                   "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
                   "Columns", "NumberOfFrames", "SliceThickness")
"""What is read of each instance to place it (the first one of the series is then read whole)."""


def reference_candidates(source, series_uid: str | None = None) -> list[list]:
    """The series that may be the reference, each as its instances' headers (pydicom datasets
    without pixel data): ``source`` is a folder (its files, not its sub-folders), a DICOM file (its
    series, from the files beside it), a list of files, or a list of pydicom datasets (used as
    they are). ``series_uid`` keeps that series only. Files that are not DICOM are passed over."""
    pydicom, _ = dicom_packages()
    series_of = None
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_file():
            series_of = str(pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID)
            path = path.parent
        if not path.is_dir():
            raise InputError(f"the reference DICOM series {path} is neither a folder nor a DICOM file")
        source = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    groups: dict[str, list] = {}
    for item in source:
        if not isinstance(item, pydicom.Dataset):
            try:
                item = pydicom.dcmread(str(item), specific_tags=list(HEADER_KEYWORDS))
            except (OSError, pydicom.errors.InvalidDicomError):
                continue
        if "ImagePositionPatient" in item and "SeriesInstanceUID" in item:
            groups.setdefault(str(item.SeriesInstanceUID), []).append(item)
    wanted = series_uid or series_of
    if wanted is not None:
        if wanted not in groups:
            raise InputError(f"the reference DICOM series {wanted} was not found (found: {', '.join(groups) or 'none'})")
        groups = {wanted: groups[wanted]}
    if not groups:
        raise InputError("the reference DICOM series holds no image instance")
    for datasets in groups.values():
        _check_one_series(datasets)
    return list(groups.values())


def whole_header(ds):
    """The instance's whole header (pixels left out) when ``ds`` was read partly from a file."""
    pydicom, _ = dicom_packages()
    name = getattr(ds, "filename", None)
    return pydicom.dcmread(name, stop_before_pixels=True) if isinstance(name, str) and name else ds


def _check_one_series(datasets: list) -> None:
    needed = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
              "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    for ds in datasets:
        missing = [keyword for keyword in needed if keyword not in ds]
        if missing:
            raise InputError(f"the reference DICOM instance {ds.get('SOPInstanceUID', '(no UID)')} lacks "
                             f"{', '.join(missing)}: it cannot be referenced as a slice of the CT")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise InputError("the reference DICOM series holds multi-frame images; only single-frame series "
                             "(one slice per instance) are supported")
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if len({text_value(ds, keyword) for ds in datasets}) > 1:
            raise InputError(f"the reference DICOM instances of one series differ in {keyword}")


@dataclass(frozen=True)
class ReferenceSeries:
    """A reference series matched to the CT's grid (:func:`match_grid`).

    ``datasets``: its instances sorted along the slice normal (``ImageOrientationPatient``'s row ×
    column direction): the position index of a plane is its place here. ``axes``: the CT array's
    axes (of ``[k, j, i]``) that run along the planes, the rows and the columns; ``flips``: which
    of them run backwards. ``spacing`` is the distance between planes (mm)."""

    datasets: list
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing: float

    @property
    def first(self):
        return self.datasets[0]

    def oriented(self, array: np.ndarray) -> np.ndarray:
        """A view of an array on the CT's grid (or a box of it) with axes (plane, row, column)."""
        view = np.transpose(array, self.axes)
        flips = tuple(axis for axis, flip in enumerate(self.flips) if flip)
        return np.flip(view, flips) if flips else view

    def frames(self, box, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(planes, frames)`` of a boolean mask given on ``box`` (slices ``[k, j, i]``) of the CT's
        grid: the position indices of the planes it touches and its frames there (``[n, rows,
        columns]``, empty planes left out)."""
        shape = (len(self.datasets), int(self.first.Rows), int(self.first.Columns))
        oriented = self.oriented(mask)
        ranges = []
        for axis, flip, n in zip(self.axes, self.flips, shape):
            start, stop = box[axis].start or 0, box[axis].stop
            ranges.append((n - stop, n - start) if flip else (start, stop))
        keep = np.flatnonzero(oriented.any(axis=(1, 2)))
        frames = np.zeros((keep.size, shape[1], shape[2]), dtype=bool)
        (r0, r1), (c0, c1) = ranges[1], ranges[2]
        frames[:, r0:r1, c0:c1] = oriented[keep]
        return keep + ranges[0][0], frames


def text_value(ds, keyword: str) -> str:
    """An element's value as the file has it (backslash-separated text), without pydicom's
    conversion (about 0.1 ms a value: 0.3 s for the positions and UIDs of 500 instances)."""
    value = ds.get_item(keyword).value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \0")
    if isinstance(value, (str, int, float)):
        return getattr(value, "original_string", None) or str(value)
    return "\\".join(getattr(v, "original_string", None) or str(v) for v in value)


def _float_list(ds, keyword: str) -> np.ndarray:
    return np.array([float(v) for v in text_value(ds, keyword).split("\\")], dtype=float)


def match_grid(datasets: list, ijk_to_ras, shape_kji) -> ReferenceSeries:
    """The reference series placed on the CT's grid (``ijk_to_ras``, array shape ``[k, j, i]``), or an
    :class:`~.errors.InputError` when its instances are not that grid's slices (module docstring)."""
    orientation = _float_list(datasets[0], "ImageOrientationPatient")
    for ds in datasets[1:]:
        if np.max(np.abs(_float_list(ds, "ImageOrientationPatient") - orientation)) > 1e-4:
            raise InputError("the reference DICOM series mixes slice orientations: it is not one volume")
    row_dir, column_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, column_dir)
    positions = {id(ds): _float_list(ds, "ImagePositionPatient") for ds in datasets}
    datasets = sorted(datasets, key=lambda ds: float(positions[id(ds)] @ normal))
    row_spacing, column_spacing = _float_list(datasets[0], "PixelSpacing")
    ras_to_ijk = np.linalg.inv(np.asarray(ijk_to_ras, dtype=float))
    to_ijk = ras_to_ijk @ geometry.LPS_TO_RAS  # LPS (DICOM) → CT voxel indices (i, j, k)
    along_column = to_ijk[:3, :3] @ row_dir * column_spacing  # one pixel to the right: next column
    along_row = to_ijk[:3, :3] @ column_dir * row_spacing  # one pixel down: next row
    origins = np.array([to_ijk[:3, :3] @ positions[id(ds)] + to_ijk[:3, 3] for ds in datasets])
    size_ijk = np.array(shape_kji[::-1])
    axis_c, sign_c = _unit_axis(along_column)
    axis_r, sign_r = _unit_axis(along_row)
    if axis_c is None or axis_r is None or axis_c == axis_r:
        raise InputError("the reference DICOM series is not on the CT's voxel grid: its rows and columns do not run "
                         "along the CT's voxel axes")
    axis_p = 3 - axis_c - axis_r
    expected = np.zeros((len(datasets), 3))
    expected[:, axis_c] = 0 if sign_c > 0 else size_ijk[axis_c] - 1
    expected[:, axis_r] = 0 if sign_r > 0 else size_ijk[axis_r] - 1
    planes = np.arange(len(datasets))
    backwards = len(datasets) > 1 and origins[1, axis_p] < origins[0, axis_p]
    expected[:, axis_p] = size_ijk[axis_p] - 1 - planes if backwards else planes
    if (len(datasets) != size_ijk[axis_p] or int(datasets[0].Columns) != size_ijk[axis_c]
            or int(datasets[0].Rows) != size_ijk[axis_r]
            or np.max(np.abs(origins - expected)) > GRID_TOLERANCE_VOXELS):
        raise InputError(f"the reference DICOM series ({len(datasets)} instances of {datasets[0].Rows} x "
                         f"{datasets[0].Columns}) is not on the CT's voxel grid ({' x '.join(map(str, shape_kji))} "
                         "voxels [k, j, i]): its instances must be the CT's slices, voxel for voxel")
    spacing = float(np.linalg.norm(np.asarray(ijk_to_ras, dtype=float)[:3, axis_p]))
    # array axes of [k, j, i] are 2 - (voxel axis i, j, k)
    return ReferenceSeries(datasets, (2 - axis_p, 2 - axis_r, 2 - axis_c), (bool(backwards), sign_r < 0, sign_c < 0),
                           spacing)


def _unit_axis(step: np.ndarray) -> tuple[int | None, int]:
    """(axis, sign) when ``step`` (voxel indices per pixel) is one voxel along one axis."""
    axis = int(np.argmax(np.abs(step)))
    sign = 1 if step[axis] > 0 else -1
    unit = np.zeros(3)
    unit[axis] = sign
    return (axis, sign) if np.max(np.abs(step - unit)) <= GRID_TOLERANCE_VOXELS / 1000 else (None, sign)


def concept(code):
    """A :class:`.measurements.Code` as highdicom's ``CodedConcept`` (meaning in ASCII)."""
    from .dicom_codes import plain

    _, hd = dicom_packages()
    return hd.sr.CodedConcept(code.value, code.scheme, plain(code.meaning))


def private_scheme_identification():
    """The Coding Scheme Identification Sequence that declares this product's private scheme
    (``99VFS``, PS3.3 C.12.1.1.5), for an object that uses its codes."""
    from .measurements import PRIVATE_SCHEME

    pydicom, _ = dicom_packages()
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "VertebralFractureScreen private codes (docs/methods.md, docs/outputs.md)"
    item.CodingSchemeResponsibleOrganization = "VertebralFractureScreen developers"
    return [item]


def new_instance(reference: ReferenceSeries, sop_class: str, modality: str, uids: dict, equipment: dict,
                 description: str):
    """A new object's dataset in the CT's study: file meta information, the CT's patient and study
    (:func:`patient_study`), its SOP class and instance, a new series (``uids``: ``series``,
    ``instance``, ``series_number``) with ``description``, ``equipment`` (Manufacturer …), and
    now as its creation and content date and time."""
    pydicom, _ = dicom_packages()
    now = datetime.now()
    ds = patient_study(reference)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, uids["instance"]
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uids["instance"]
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = modality, uids["series"], uids[
        "series_number"], 1
    ds.SeriesDescription = description
    ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = now.strftime("%H%M%S")
    for keyword, value in equipment.items():
        setattr(ds, keyword, value)
    return ds


def patient_study(reference: ReferenceSeries):
    """A pydicom dataset with the CT's patient and study attributes (:data:`PATIENT_STUDY_KEYWORDS`)."""
    pydicom, _ = dicom_packages()
    out = pydicom.Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in reference.first:
            out[keyword] = copy.deepcopy(reference.first[keyword])
        elif keyword in TYPE2_KEYWORDS:
            setattr(out, keyword, "")
    return out
