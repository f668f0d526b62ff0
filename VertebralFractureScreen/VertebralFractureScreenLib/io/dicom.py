"""DICOM series: detection, reading with SimpleITK (GDCM), and the checks that the slices form one
regular volume.

Values are Hounsfield units: the rescale slope and intercept are applied by SimpleITK. Refused
with one sentence (:class:`~.errors.InputError`):

* a folder with no series, or with several and no ``series_uid`` (the series are listed); a file
  that is not part of an image series;
* a declared series (rows x columns x slices x bytes per voxel) over
  :func:`~.files.max_volume_bytes`, before any slice is read;
* slices whose ImageOrientationPatient differ (by more than :data:`DICOM_ORIENTATION_TOLERANCE`
  in any direction cosine): they are not one volume;
* slices at the same position, unevenly spaced (more than 1 % + 0.01 mm from the median step),
  gantry-tilted, or whose spacing differs from the header's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .files import check_declared_size, itk_reason
from .sitk_bridge import component_bytes, quiet_itk

DICOM_ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between the direction cosines of two slices of one series (about 0.06°)."""


def has_dicom_preamble(path: Path) -> bool:
    """True when a file carries the DICOM Part 10 marker ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path) -> bool:
    """True when ``path`` is a folder that directly holds at least one DICOM image series."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    try:
        with os.scandir(path) as entries:
            if any(entry.is_file() and has_dicom_preamble(Path(entry.path)) for entry in entries):
                return True
    except OSError:
        return False
    try:  # DICOM files without the Part 10 preamble: let GDCM decide
        with quiet_itk():
            return len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))) > 0
    except RuntimeError:
        return False


def _dicom_header(path: str) -> sitk.ImageFileReader | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _describe_series(folder: Path, uids) -> str:
    """``UID (N slices, "description")`` for each series, separated by semicolons."""
    parts = []
    for uid in uids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        text = f"{uid or '(empty SeriesInstanceUID)'} ({len(files)} slice{'s' if len(files) != 1 else ''}"
        header = _dicom_header(files[0]) if files else None
        if header is not None and header.HasMetaDataKey("0008|103e"):
            description = header.GetMetaData("0008|103e").strip()
            if description:
                text += f', "{description}"'
        parts.append(text + ")")
    return "; ".join(parts)


def read_dicom_series(folder: Path, series_uid: str | None, member: Path | None = None) -> sitk.Image:
    """Read one DICOM series from ``folder``: the one with ``series_uid``, else the one holding the
    file ``member`` when given, else the folder's only series; checked as the module says."""
    with quiet_itk():
        return _read_dicom_series_quietly(folder, series_uid, member)


def _read_dicom_series_quietly(folder: Path, series_uid: str | None, member: Path | None) -> sitk.Image:
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as error:
        raise InputError(f"cannot scan DICOM folder {folder}: {itk_reason(error)}") from None
    if not uids:
        raise InputError(f"no DICOM series found in folder {folder}")
    if series_uid is not None:
        if series_uid not in uids:
            raise InputError(
                f"DICOM series {series_uid} is not in folder {folder}, which holds: {_describe_series(folder, uids)}"
            )
        uid = series_uid
    elif member is not None:
        uid = next(
            (
                u
                for u in uids
                if any(
                    os.path.samefile(f, member) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), u)
                )
            ),
            None,
        )
        if uid is None:
            raise InputError(f"cannot read DICOM file {member}: it is not part of an image series")
    elif len(uids) == 1:
        uid = uids[0]
    else:
        raise InputError(
            f"DICOM folder {folder} holds {len(uids)} series: {_describe_series(folder, uids)};"
            " choose one with series_uid"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    first = _dicom_header(files[0]) if files else None
    if first is not None:
        size = first.GetSize()
        check_declared_size(folder, "DICOM series", (*size[:2], len(files) * (size[2] if len(size) > 2 else 1)),
                            component_bytes(first.GetPixelID()) * max(1, first.GetNumberOfComponents()))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read DICOM series {uid or '(no UID)'} in {folder}: {itk_reason(error)}") from None
    _check_dicom_slice_positions(reader, len(files), image, folder)
    return image


def _dicom_vector(reader: sitk.ImageSeriesReader, index: int, tag: str) -> np.ndarray | None:
    try:
        if not reader.HasMetaDataKey(index, tag):
            return None
        return np.array([float(v) for v in reader.GetMetaData(index, tag).split("\\")], dtype=float)
    except (RuntimeError, ValueError):
        return None


def _check_dicom_orientations(reader: sitk.ImageSeriesReader, count: int, first: np.ndarray, folder: Path):
    """Refuse a series whose slices do not all share the first slice's ImageOrientationPatient:
    SimpleITK would stack them into one volume with the first slice's orientation."""
    for n in range(1, count):
        orientation = _dicom_vector(reader, n, "0020|0037")
        if orientation is None or orientation.size != 6 or not np.all(np.isfinite(orientation)):
            raise InputError(
                f"DICOM series in {folder} has no valid slice orientation (ImageOrientationPatient) in slice {n + 1}"
                f" of {count}, so its slices cannot be stacked into one volume"
            )
        if np.max(np.abs(orientation - first)) > DICOM_ORIENTATION_TOLERANCE:
            angles = []
            for a, b in ((first[:3], orientation[:3]), (first[3:], orientation[3:])):
                cosine = float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
                angles.append(math.degrees(math.acos(min(1.0, max(-1.0, cosine)))))
            raise InputError(
                f"DICOM series in {folder} mixes slice orientations (slice {n + 1} of {count} is turned"
                f" {max(angles):.2g} degrees against the first), so its slices are not one volume; export the"
                " series again or separate the slices of each orientation"
            )


def _check_dicom_slice_positions(reader: sitk.ImageSeriesReader, count: int, image: sitk.Image, folder: Path):
    """Refuse series whose slices are not a regular grid: SimpleITK would silently assume one,
    and every distance measured on the volume would be wrong."""
    if count < 2:
        return
    orientation = _dicom_vector(reader, 0, "0020|0037")
    positions = [_dicom_vector(reader, n, "0020|0032") for n in range(count)]
    if orientation is None or orientation.size != 6 or any(p is None or p.size != 3 for p in positions):
        return  # no per-slice geometry (e.g. multi-frame): trust the reader
    _check_dicom_orientations(reader, count, orientation, folder)
    normal = np.cross(orientation[:3], orientation[3:])
    steps = np.diff(np.array(positions), axis=0)
    along = steps @ normal
    typical = float(np.median(np.abs(along)))
    tolerance = 0.01 * typical + 0.01
    if typical < 1e-3 or np.min(along * np.sign(along[0])) < 1e-3:
        raise InputError(
            f"DICOM series in {folder} has several slices at the same position (duplicated slices or several"
            " acquisitions in one series)"
        )
    if np.max(np.abs(np.abs(along) - typical)) > tolerance:
        raise InputError(
            f"DICOM series in {folder} has unevenly spaced slices ({np.min(np.abs(along)):.3g} to"
            f" {np.max(np.abs(along)):.3g} mm; missing slices?)"
        )
    drift = float(np.max(np.linalg.norm(steps - along[:, None] * normal[None, :], axis=1)))
    if drift > tolerance:
        angle = math.degrees(math.atan2(drift, typical))
        raise InputError(
            f"DICOM series in {folder} is gantry-tilted ({angle:.1f} degrees), which is not supported;"
            " resample it to a regular grid first (for example in 3D Slicer) and save it as NRRD or NIfTI"
        )
    if abs(image.GetSpacing()[2] - typical) > tolerance:
        raise InputError(
            f"DICOM series in {folder} has inconsistent slice spacing ({image.GetSpacing()[2]:.4g} mm in the"
            f" header, {typical:.4g} mm between slice positions)"
        )
