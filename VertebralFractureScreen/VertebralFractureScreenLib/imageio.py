"""Reading and writing CT volumes and label maps.

Everything here returns or takes a :class:`Volume`: a voxel array indexed ``[k, j, i]`` (slice, row,
column, exactly as SimpleITK's ``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` give it) and
a 4x4 IJK→RAS matrix in millimetres (see :mod:`.geometry`). ITK, SimpleITK, NRRD files written by
Slicer and DICOM describe positions in LPS; the conversion ``RAS = diag(-1, -1, 1) · LPS`` happens
only in this module, so the rest of the library sees RAS only.

Inputs:

* CT: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``),
  or a DICOM series (a folder, or one file of the series). Values are Hounsfield units: DICOM
  rescale slope/intercept and NIfTI ``scl_slope``/``scl_inter`` are applied by SimpleITK.
* Label maps: the same image formats, or a 3D Slicer segmentation (``.seg.nrrd``) whose segments
  are mapped to a label convention by segment ID, then by terminology (never by display name
  alone). Label maps given with a reference CT are resampled onto the CT's grid by nearest
  neighbour in physical space.

Every problem with the user's input raises :class:`~.errors.InputError` with one sentence that
names the file; SimpleITK's ``RuntimeError`` never escapes. Problems that do not stop reading
(segments that cannot be mapped, overlapping segments) are reported with :class:`LabelMapWarning`
through the standard :mod:`warnings` module, so callers can collect them with
``warnings.catch_warnings(record=True)``.

Headers are checked before any voxel is read, because ITK silently repairs some broken headers
(a NaN, zero or negative NIfTI voxel size becomes 1 mm; a NaN origin becomes 0) and prints others'
problems on stderr. Refused with one sentence:

* a voxel size (NIfTI ``pixdim[1..3]``, or the length of a voxel axis in the final geometry, any
  format) that is not a finite number between :data:`MIN_VOXEL_SIZE_MM` and
  :data:`MAX_VOXEL_SIZE_MM`, and a degenerate (flat) voxel grid;
* a NIfTI with neither a qform nor an sform (both codes 0) and a NRRD without ``space directions``:
  their orientation in the patient is unknown (ITK would assume one), and a NRRD's voxel size too;
* a non-finite NIfTI quaternion, ``qoffset`` or ``srow`` (sform) in a transform that is used
  (its code is above 0), a ``vox_offset`` that is not a whole finite number of bytes past the
  header, and dimensions that are not 1..7 positive sizes;
* DICOM slices whose ImageOrientationPatient differ (by more than :data:`DICOM_ORIENTATION_TOLERANCE`
  in any direction cosine): they are not one volume;
* a NRRD (or MetaImage) whose detached data file is not a regular file in the header's folder or
  below it (absolute paths, ``..`` escaping that folder, links leading out of it, devices, FIFOs),
  or is split over several files;
* a declared volume (voxels x bytes per voxel, as the header states it) larger than
  :func:`max_volume_bytes`: 2**31 bytes (2 GiB) by default, or the whole number of bytes in the
  environment variable ``VFSCREEN_MAX_VOLUME_BYTES``. The check runs before anything is allocated
  or inflated, and compressed data is never inflated beyond the declared size, so a small
  compressed file that declares a huge volume (a "decompression bomb") costs neither memory nor
  time.

Writers (:func:`write_volume`, :func:`write_segmentation_nrrd`) are atomic: they write a temporary
file in the destination folder and move it into place with :func:`os.replace`, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import math
import os
import re
import secrets
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import geometry, levels
from .errors import InputError

__all__ = [
    "Volume",
    "LabelMapWarning",
    "LABEL_MAP_CONVENTIONS",
    "read_ct",
    "read_labelmap",
    "segment_structure",
    "resample_labelmap",
    "write_volume",
    "write_segmentation_nrrd",
    "is_dicom_folder",
    "atomic_write",
    "atomic_write_text",
    "split_image_suffix",
    "IMAGE_SUFFIXES",
    "volume_from_sitk",
    "volume_to_sitk",
    "max_volume_bytes",
    "MAX_VOLUME_BYTES_DEFAULT",
]

_INT16_MIN, _INT16_MAX = -32768, 32767
_SLAB_VOXELS = 16_000_000
"""Voxels processed at once when scanning or resampling large volumes (bounds temporary memory)."""

MAX_VOLUME_BYTES_DEFAULT = 2**31
"""Largest volume read by default, in bytes as its header declares it (voxels x bytes per voxel):
2 GiB, e.g. 1000 slices of 512x512 in 32 bits. ``VFSCREEN_MAX_VOLUME_BYTES`` overrides it."""
MAX_VOLUME_BYTES_VARIABLE = "VFSCREEN_MAX_VOLUME_BYTES"
MIN_VOXEL_SIZE_MM = 1e-3
MAX_VOXEL_SIZE_MM = 1e3
"""Voxel sizes outside ``[MIN_VOXEL_SIZE_MM, MAX_VOXEL_SIZE_MM]`` are header errors, not scans."""
DICOM_ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between the direction cosines of two slices of one series (about 0.06°)."""


def max_volume_bytes() -> int:
    """The largest declared volume, in bytes, that is read: ``VFSCREEN_MAX_VOLUME_BYTES`` when set
    (a positive whole number of bytes, such as ``4294967296`` or ``4e9``), else
    :data:`MAX_VOLUME_BYTES_DEFAULT`."""
    text = os.environ.get(MAX_VOLUME_BYTES_VARIABLE, "").strip()
    if not text:
        return MAX_VOLUME_BYTES_DEFAULT
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise InputError(f"{MAX_VOLUME_BYTES_VARIABLE} must be a positive whole number of bytes, got {text!r}")
    return int(value)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _check_declared_size(path: Path, what: str, sizes, bytes_per_voxel: int) -> int:
    """The declared size in bytes of a volume of ``sizes`` voxels; raises when it is over
    :func:`max_volume_bytes` (before anything is allocated or inflated)."""
    nbytes = math.prod(int(n) for n in sizes) * int(bytes_per_voxel)
    limit = max_volume_bytes()
    if nbytes > limit:
        size = "x".join(str(int(n)) for n in sizes)
        raise InputError(
            f"{what} file {path} declares a {size} volume of {_gib(nbytes)}, too large to read (the limit is"
            f" {_gib(limit)}; set {MAX_VOLUME_BYTES_VARIABLE} to a larger number of bytes if the file is genuine)"
        )
    return nbytes


def _number_list(values) -> str:
    return ", ".join(f"{float(v):g}" for v in values)


def plausible_voxel_sizes(sizes) -> bool:
    """Whether every voxel size (mm) is a finite number between :data:`MIN_VOXEL_SIZE_MM` and
    :data:`MAX_VOXEL_SIZE_MM`: the one rule for files (here) and volumes given in memory
    (``exam_inputs.check_ct``)."""
    return all(math.isfinite(v) and MIN_VOXEL_SIZE_MM <= v <= MAX_VOXEL_SIZE_MM for v in map(float, sizes))


def _check_voxel_sizes(sizes, path: Path, what: str, source: str = "") -> None:
    """Refuse voxel sizes that are not finite numbers in the plausible range."""
    sizes = [float(v) for v in sizes]
    if plausible_voxel_sizes(sizes):
        return
    raise InputError(
        f"{what} file {path} has an invalid voxel spacing ({_number_list(sizes)} mm{source}); each voxel size must"
        f" be a number between {MIN_VOXEL_SIZE_MM:g} and {MAX_VOXEL_SIZE_MM:g} mm"
    )


def _check_grid(ijk_to_ras: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Refuse a voxel grid that no measurement can stand on: non-finite numbers, voxel sizes out
    of range, or axes that are (nearly) parallel."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    if not np.all(np.isfinite(matrix)):
        raise InputError(
            f"{what} file {path} has non-finite numbers (NaN or infinity) in its voxel grid or position"
            f" (origin {_number_list(matrix[:3, 3])}), so its geometry is unknown"
        )
    sizes = np.linalg.norm(matrix[:3, :3], axis=0)
    _check_voxel_sizes(sizes, path, what)
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-6 * float(np.prod(sizes)):
        raise InputError(f"{what} file {path} has a degenerate voxel grid (two of its axes are parallel),"
                         " so its geometry is unknown")
    return matrix


@contextlib.contextmanager
def _quiet_itk():
    """Keep ITK's own warnings (printed on stderr by the C++ library) out of the user's console:
    the problems they describe are checked here and reported as one sentence."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


class LabelMapWarning(UserWarning):
    """A label map was read, but part of it was left out or overwritten (segments not mapped,
    segments overlapping)."""


# ------------------------------------------------------------------------------------------------
# Volume
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D voxel array with its geometry.

    Attributes:
        array: voxel values indexed ``[k, j, i]`` (slice, row, column). CT volumes hold HU
            (``int16`` or ``float32``); label maps hold integer label ids.
        ijk_to_ras: 4x4 matrix in mm: column 0 is the RAS step of one voxel along ``i`` (the last
            array axis), column 1 along ``j``, column 2 along ``k``, column 3 the RAS position of
            the centre of voxel ``(0, 0, 0)``. Stored as a read-only ``float64`` copy.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self):
        array = self.array
        if not isinstance(array, np.ndarray) or array.ndim != 3:
            raise ValueError(f"Volume.array must be a 3-D numpy array, got {getattr(array, 'shape', type(array))}")
        matrix = np.array(self.ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise ValueError("Volume.ijk_to_ras must be a finite 4x4 matrix")
        if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise ValueError("Volume.ijk_to_ras must be an invertible affine matrix (last row 0 0 0 1)")
        matrix.setflags(write=False)
        object.__setattr__(self, "ijk_to_ras", matrix)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(nk, nj, ni)``."""
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along ``(i, j, k)``."""
        return geometry.voxel_spacing(self.ijk_to_ras)

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when ``other`` has the same shape and each of its voxel centres lies within
        ``tol`` mm of this volume's voxel centre with the same index."""
        if self.shape != other.shape:
            return False
        return _max_grid_deviation_mm(self.ijk_to_ras, other.ijk_to_ras, self.shape) <= tol


def _max_grid_deviation_mm(m1: np.ndarray, m2: np.ndarray, shape_kji) -> float:
    """Largest distance (mm) between the voxel centres of two grids of the same shape (an affine
    difference is largest at a corner of the grid)."""
    nk, nj, ni = shape_kji
    corners = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], dtype=float)
    delta = geometry.ijk_to_ras_points(m1, corners) - geometry.ijk_to_ras_points(m2, corners)
    return float(np.max(np.linalg.norm(delta, axis=1)))


# ------------------------------------------------------------------------------------------------
# SimpleITK <-> Volume
# ------------------------------------------------------------------------------------------------


def _sitk_ijk_to_ras(image: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """IJK→RAS (mm) of a 3-D SimpleITK image (or of a reader's image information), whose origin
    and direction are in LPS."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)[None, :]
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return geometry.LPS_TO_RAS @ ijk_to_lps


def _lps_geometry(ijk_to_ras: np.ndarray):
    """(spacing, direction as row-major 9-tuple, origin), all LPS, for SimpleITK."""
    ijk_to_lps = geometry.LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing[None, :]
    return tuple(spacing), tuple(direction.ravel()), tuple(ijk_to_lps[:3, 3])


def volume_from_sitk(image: sitk.Image) -> Volume:
    """Copy a 3-D scalar SimpleITK image (LPS geometry) into a :class:`Volume` (RAS geometry)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("volume_from_sitk needs a 3-D scalar image")
    return Volume(np.array(sitk.GetArrayViewFromImage(image)), _sitk_ijk_to_ras(image))


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """Copy a :class:`Volume` into a SimpleITK image with the equivalent LPS geometry.

    The grid's axes need not be orthogonal for SimpleITK itself, but NIfTI cannot store a sheared
    grid (see :func:`write_volume`)."""
    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, direction, origin = _lps_geometry(volume.ijk_to_ras)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


# ------------------------------------------------------------------------------------------------
# Reading helpers
# ------------------------------------------------------------------------------------------------


def _require_file(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} path is a folder, not a file: {path}")
    if not path.is_file():
        raise InputError(f"{what} path {path} is not a regular file (a device, pipe or socket)")
    return path


def _itk_reason(error: Exception) -> str:
    """The useful part of a SimpleITK/ITK exception message, as a short clause."""
    text = str(error)
    if "Unable to determine ImageIO reader" in text:
        return "the file is corrupt or not in a supported format (NIfTI, NRRD, MetaImage)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        prefix = r"^((sitk::ERROR|ITK ERROR|ERROR|Description):|\w+\(0x[0-9a-fA-F]+\):|\[nrrd\]\s*\w+:)\s*"
        while re.match(prefix, line):
            line = re.sub(prefix, "", line, count=1)
        if line and not line.startswith(("Exception thrown", "/", "Location:", "File:", "Line:")):
            return line.rstrip(".")
    return "the file is corrupt or unreadable"


_NIFTI_BYTES_PER_VOXEL = {
    2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16,
    1792: 16, 2048: 32, 2304: 4,
}
"""Bytes per voxel of each NIfTI datatype code."""


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that decide where the voxels are and where they lie."""

    version: int
    dims: tuple
    datatype: int
    pixdim: tuple
    vox_offset: float
    qform_code: int
    sform_code: int
    quatern: tuple
    qoffset: tuple
    srow: tuple
    magic: bytes
    scaling: tuple

    @property
    def header_bytes(self) -> int:
        """Smallest ``vox_offset`` of a single-file NIfTI: the header plus the 4-byte extension flag."""
        return 352 if self.version == 1 else 544


def _parse_nifti_header(header: bytes) -> _NiftiHeader | None:
    """The header of a NIfTI-1 or NIfTI-2 file of either byte order; None when ``header`` is not one."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            f = lambda fmt, offset: struct.unpack_from(endian + fmt, header, offset)  # noqa: E731
            return _NiftiHeader(1, f("8h", 40), f("h", 70)[0], f("8f", 76), f("f", 108)[0], f("h", 252)[0],
                                f("h", 254)[0], f("3f", 256), f("3f", 268), f("12f", 280), header[344:348],
                                f("2f", 112))
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            f = lambda fmt, offset: struct.unpack_from(endian + fmt, header, offset)  # noqa: E731
            return _NiftiHeader(2, f("8q", 16), f("h", 12)[0], f("8d", 104), float(f("q", 168)[0]), f("i", 344)[0],
                                f("i", 348)[0], f("3d", 352), f("3d", 376), f("12d", 400), header[4:8],
                                f("2d", 176))
    return None


def _check_nifti_header(info: _NiftiHeader, path: Path, what: str) -> int:
    """Refuse a NIfTI header that ITK would read wrongly or noisily; returns the bytes a single
    file needs (header, extensions and voxels)."""

    def bad(reason: str) -> InputError:
        return InputError(f"{what} file {path} has {reason}")

    if info.magic not in (b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0"):
        raise bad("no NIfTI magic in its header (an Analyze 7.5 or damaged file), so its position in space is"
                  " unknown; save it as NIfTI")
    ndim = info.dims[0]
    if not 1 <= ndim <= 7:
        raise bad(f"an invalid NIfTI header (dim[0] = {ndim}, the number of dimensions, must be 1 to 7)")
    sizes = info.dims[1 : ndim + 1]
    if any(n < 1 for n in sizes):
        shown = ", ".join(f"dim[{axis}] = {n}" for axis, n in enumerate(sizes, start=1) if n < 1)
        raise bad(f"an invalid image size in its NIfTI header ({shown}; every size must be at least 1)")
    if info.datatype not in _NIFTI_BYTES_PER_VOXEL:
        raise bad(f"an unknown NIfTI datatype code ({info.datatype})")
    offset = info.vox_offset
    if not (math.isfinite(offset) and offset == int(offset) and info.header_bytes <= offset <= 2**40):
        raise bad(f"an invalid vox_offset ({offset:g}) in its NIfTI header: the voxel data must start at a whole"
                  f" number of bytes, at least {info.header_bytes}, into the file")
    _check_voxel_sizes(info.pixdim[1 : min(ndim, 3) + 1], path, what, " in the NIfTI header's pixdim")
    if info.qform_code <= 0 and info.sform_code <= 0:
        raise bad("no position in space in its NIfTI header (qform_code and sform_code are both 0), so which way"
                  " is anterior, superior and left is unknown; save it again with its scanner geometry (e.g. with"
                  " dcm2niix from the DICOM series)")
    checks = []
    if info.qform_code > 0:
        checks += [("quaternion", info.quatern), ("qoffset", info.qoffset)]
    if info.sform_code > 0:
        checks.append(("sform", info.srow))
    for name, values in checks:
        if not all(math.isfinite(v) for v in values):
            raise bad(f"a non-finite {name} in its NIfTI header ({_number_list(values)}), so its position in space"
                      " is unknown")
    slope, inter = info.scaling  # NaN is how nibabel writes "not scaled"; infinity is no scaling at all
    if math.isinf(slope) or (math.isfinite(slope) and slope != 0 and math.isinf(inter)):
        raise bad(f"an infinite value scaling in its NIfTI header (scl_slope {slope:g}, scl_inter {inter:g})")
    if info.sform_code > 0 and info.qform_code <= 0:  # ITK uses the sform alone: it must be a real grid
        linear = np.array(info.srow, dtype=float).reshape(3, 4)[:, :3]
        norms = np.linalg.norm(linear, axis=0)
        if abs(np.linalg.det(linear)) <= 1e-6 * float(np.prod(norms)) or min(norms) < MIN_VOXEL_SIZE_MM:
            raise bad("a degenerate sform in its NIfTI header (voxel axes of zero length or parallel), so its"
                      " position in space is unknown")
    nbytes = _check_declared_size(path, what, sizes, _NIFTI_BYTES_PER_VOXEL[info.datatype])
    return int(offset) + nbytes


def _check_nifti(path: Path, what: str) -> None:
    """Check a ``.nii``/``.nii.gz`` header (see :func:`_check_nifti_header`) and raise when the file
    is shorter than the header says.

    ITK reads a truncated NIfTI without complaint and fills the missing voxels with garbage, so a
    partly copied or downloaded file must be caught here. A gzip stream is inflated at most as far
    as the header's size, never to its end."""
    name = path.name.lower()
    compressed = name.endswith(".nii.gz")
    if not (compressed or name.endswith(".nii")):
        return
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as f:
            header = f.read(540)
        info = _parse_nifti_header(header)
        if info is None:
            return  # not NIfTI: ITK says what is wrong
        expected = _check_nifti_header(info, path, what)
        if compressed:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", f.read(4))[0]  # uncompressed size mod 2**32 (last member)
            if isize == expected % 2**32:
                return
            actual = _gzip_uncompressed_size(path, expected)
        else:
            actual = path.stat().st_size
    except (OSError, EOFError, zlib.error, struct.error):
        raise InputError(f"cannot read {what} file {path}: the file is corrupt or truncated") from None
    if actual < expected:
        raise InputError(
            f"{what} file {path} is truncated ({actual} of {expected} bytes; incomplete copy or download?)"
        )


def _gzip_uncompressed_size(path: Path, stop: int) -> int:
    """Length of a gzip file's decompressed content, counted no further than ``stop`` bytes
    (raises on a corrupt or truncated stream before that)."""
    total = 0
    with contextlib.closing(_file_chunks(path)) as chunks:
        for chunk in chunks:
            total += len(chunk)
            if total >= stop:
                break
    return total


def _read_image_file(path: Path, what: str) -> sitk.Image:
    """Read a single image file with SimpleITK, turning every failure into an InputError.

    The header is checked first (NIfTI fields, NRRD and MetaImage data files, the declared size),
    so ITK never allocates a huge volume or follows a data file out of the header's folder."""
    _check_nifti(path, what)
    _check_detached_data(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
            size = reader.GetSize()
            components = max(1, reader.GetNumberOfComponents())
            _check_declared_size(path, what, (*size, components), _component_bytes(reader.GetPixelID()))
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read {what} file {path}: {_itk_reason(error)}") from None
    return image


def _component_bytes(pixel_id: int) -> int:
    """Bytes of one component of a SimpleITK pixel type (8 when unknown: the largest scalar)."""
    name = sitk.GetPixelIDValueAsString(pixel_id).lower()
    found = re.search(r"(\d+)-bit", name)
    if found:
        bits = int(found.group(1))
        return max(1, bits // 8) * (2 if "complex" in name else 1)
    return 8


def _check_detached_data(path: Path, what: str) -> None:
    """For a NRRD or MetaImage header read by ITK: refuse a data file outside the header's folder
    and a declared size over the limit, before ITK opens anything."""
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        try:
            fields, _, _ = _read_nrrd_header(path, what)
        except OSError as error:
            raise InputError(f"cannot read {what} file {path}: {error.strerror or error}") from None
        _check_nrrd_geometry(fields, path, what)
        data_file = fields.get("data file", fields.get("datafile"))
        if data_file:
            _checked_data_file(path, data_file, what, "NRRD")
        try:
            dtype = _NRRD_DTYPE[fields["type"].lower()]
            sizes = [int(v) for v in fields["sizes"].split()]
        except (KeyError, ValueError):
            return  # ITK says what is wrong
        if sizes and min(sizes) >= 1:
            _check_declared_size(path, what, sizes, dtype.itemsize)
    elif name.endswith((".mhd", ".mha")):
        _check_metaimage_data_file(path, what)


def _check_nrrd_geometry(fields: dict[str, str], path: Path, what: str) -> None:
    """Refuse a NRRD header without ``space directions`` (no orientation; ITK would assume one, and
    1 mm steps without ``spacings``), NaN, infinite, zero or absurd voxel steps and a non-finite
    origin: ITK turns a NaN direction of a spatial axis into 1 mm, and a NaN origin into 0."""
    def numbers(text: str) -> list[float]:
        try:
            return [float(v) for v in text.strip().strip("()").split(",")]
        except ValueError:
            return []  # not numbers at all: the reader says what is wrong

    if "space directions" not in fields:
        raise InputError(f"{what} file {path} has no space directions in its NRRD header, so its voxel size and"
                         " its orientation in the patient are unknown; save it again with its geometry (e.g. from"
                         " Slicer or with SimpleITK)")
    for token in re.findall(r"none|\([^)]*\)", fields["space directions"]):
        if token != "none":
            values = numbers(token)
            if values:
                step = math.sqrt(sum(v * v for v in values)) if all(map(math.isfinite, values)) else math.nan
                _check_voxel_sizes([step], path, what, f" for the NRRD space direction {token}")
    if "space origin" in fields:
        values = numbers(fields["space origin"])
        if values and not all(map(math.isfinite, values)):
            raise InputError(f"{what} file {path} has a non-finite space origin in its NRRD header"
                             f" ({fields['space origin']}), so its position in space is unknown")


def _check_metaimage_data_file(path: Path, what: str) -> None:
    """Refuse a MetaImage header (``.mhd``/``.mha``) whose ``ElementDataFile`` is not a regular file
    in its folder or below it (``LOCAL`` data follows the header and is fine)."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8", errors="replace")  # the header is the first lines
    except OSError as error:
        raise InputError(f"cannot read {what} file {path}: {error.strerror or error}") from None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "elementdatafile":
            value = value.strip()
            if value.upper() != "LOCAL":
                _checked_data_file(path, value, what, "MetaImage")
            return


def _checked_data_file(header: Path, data_file: str, what: str, kind: str) -> Path:
    """The path of a detached data file named in a header, when it is a regular file in the
    header's folder or below it; raises otherwise (absolute paths, ``..`` leading out of the
    folder, links leading out of it, devices, FIFOs, folders, several files)."""

    def refuse(reason: str) -> InputError:
        return InputError(f"{what} file {header} names the {kind} data file {data_file!r}, which {reason}")

    if data_file.upper().startswith("LIST") or len(data_file.split()) > 1 or "%" in data_file:
        raise refuse("splits the data over several files (not supported)")
    if os.path.isabs(data_file) or re.match(r"^[A-Za-z]:", data_file) or data_file.startswith("\\"):
        raise refuse("is an absolute path; the data file must be in the header's folder or below it")
    folder = os.path.realpath(header.parent)
    target = os.path.realpath(os.path.join(folder, data_file))
    if os.path.commonpath([folder, target]) != folder:
        raise refuse("is outside the header's folder; the data file must be in that folder or below it")
    try:
        mode = os.stat(target).st_mode
    except OSError:
        raise refuse("does not exist") from None
    if not stat.S_ISREG(mode):
        raise refuse("is not a regular file")
    return Path(target)


def _check_single_slice(shape_kji, path: Path) -> None:
    if min(shape_kji) < 2:
        size = "x".join(str(n) for n in shape_kji[::-1])
        raise InputError(f"CT {path} has a single slice ({size}); a 3-D volume is needed")


_READ_CHUNK_BYTES = 4 * 2**20
_NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 256: np.int8, 512: np.uint16}
"""NIfTI-1 datatype codes read directly (little-endian, no scaling)."""


def _file_chunks(path: Path):
    """The bytes of a file, gunzipped when it ends in ``.gz``, in chunks of at most
    :data:`_READ_CHUNK_BYTES` (zlib directly: about twice as fast as :mod:`gzip`, and never the
    whole file in memory at once)."""
    with open(path, "rb") as handle:
        if not path.name.lower().endswith(".gz"):
            while chunk := handle.read(_READ_CHUNK_BYTES):
                yield chunk
            return
        inflater = zlib.decompressobj(wbits=31)
        while compressed := handle.read(4 * 2**20):
            while compressed:
                chunk = inflater.decompress(compressed, _READ_CHUNK_BYTES)
                if chunk:
                    yield chunk
                if inflater.eof:  # another gzip member may follow
                    compressed = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=31)
                else:
                    compressed = inflater.unconsumed_tail


def _read_nifti_directly(path: Path, what: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxels and IJK→RAS of a plain 3-D scalar NIfTI-1 file (``.nii``/``.nii.gz``), read straight
    into their final array: SimpleITK's NIfTI reader holds the voxels twice while reading, which
    set the peak memory of a screening. The geometry still comes from SimpleITK (its reading of
    the sform/qform); voxels are stored with i fastest, so the file's order is the ``[k, j, i]``
    array's. None (the caller uses SimpleITK) for anything else: NIfTI-2, big-endian, scaled
    values, vectors, 4-D."""
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    _check_nifti(path, what)
    try:
        chunks = _file_chunks(path)
        head = b""
        while len(head) < 352 and (chunk := next(chunks, b"")):
            head += chunk
        if len(head) < 348 or struct.unpack("<i", head[:4])[0] != 348:
            return None
        dims = struct.unpack("<8h", head[40:56])
        datatype = struct.unpack("<h", head[70:72])[0]
        offset = int(struct.unpack("<f", head[108:112])[0])
        slope, inter = struct.unpack("<2f", head[112:120])
        if (dims[0] not in (3, 4) or (dims[0] == 4 and dims[4] != 1) or datatype not in _NIFTI_DTYPES
                or slope not in (0.0, 1.0) or inter != 0.0 or min(dims[1:4]) < 1):
            return None
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        with _quiet_itk():
            reader.ReadImageInformation()
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            return None
        array = np.empty((dims[3], dims[2], dims[1]), dtype=_NIFTI_DTYPES[datatype])
        target = memoryview(array).cast("B")
        filled = 0
        pending = head
        while len(pending) < offset and (chunk := next(chunks, b"")):
            pending += chunk
        pending = memoryview(pending)[offset:]
        while filled < array.nbytes:
            take = min(len(pending), array.nbytes - filled)
            target[filled:filled + take] = pending[:take]
            filled += take
            if filled < array.nbytes:
                pending = memoryview(next(chunks, b""))
                if not len(pending):
                    raise InputError(f"cannot read {what} file {path}: the voxel data is truncated")
    except RuntimeError as error:
        raise InputError(f"cannot read {what} file {path}: {_itk_reason(error)}") from None
    except (OSError, zlib.error) as error:
        raise InputError(f"cannot read {what} file {path}: {getattr(error, 'strerror', None) or error}") from None
    return array, _sitk_ijk_to_ras(reader)


def _as_3d_scalar(image: sitk.Image, path: Path, what: str) -> sitk.Image:
    """Check that an image is 3-D and scalar (a 4-D image with one time point is reduced)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} values per voxel (vector or colour image);"
            " a scalar 3-D volume is needed"
        )
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
    if dimension != 3:
        size = "x".join(str(n) for n in image.GetSize())
        raise InputError(f"{what} {path} is a {dimension}-D image ({size}); a 3-D volume is needed")
    return image


class _ImageBuffer(np.ndarray):
    """A read-only NumPy view of a SimpleITK image's own buffer that keeps the image alive, so a
    volume already stored in the wanted type is not copied (a 512x512x1000 label map is 250 MB).
    Views and slices of it keep it alive through their ``base``."""

    _image = None


def _buffer_of(image: sitk.Image) -> np.ndarray:
    view = sitk.GetArrayViewFromImage(image).view(_ImageBuffer)
    view._image = image
    view.flags.writeable = False
    return view


def _all_integral(array: np.ndarray) -> bool:
    """True when every value of a float array is finite and a whole number (scans in slabs)."""
    flat = array.reshape(-1)
    for start in range(0, flat.size, _SLAB_VOXELS):
        chunk = flat[start : start + _SLAB_VOXELS]
        if not np.all(np.isfinite(chunk)) or not np.array_equal(chunk, np.floor(chunk)):
            return False
    return True


def _ct_array(view: np.ndarray, reuse: bool = False) -> np.ndarray:
    """CT voxels as ``int16`` when they are whole numbers in its range, else ``float32``; with
    ``reuse``, an ``int16`` array is returned as it is instead of copied."""
    if reuse and view.dtype == np.int16 and view.size:
        return view
    if view.size == 0:
        return np.array(view, dtype=np.float32)
    if np.issubdtype(view.dtype, np.integer) or view.dtype == bool:
        low, high = int(view.min()), int(view.max())
        if _INT16_MIN <= low and high <= _INT16_MAX:
            return np.array(view, dtype=np.int16)
        return np.array(view, dtype=np.float32)
    if _all_integral(view):
        low, high = float(view.min()), float(view.max())
        if _INT16_MIN <= low and high <= _INT16_MAX:
            return np.array(view, dtype=np.int16)
    return np.array(view, dtype=np.float32)


def _label_array(view: np.ndarray, path, what: str = "segmentation", reuse: bool = False) -> np.ndarray:
    """Label ids in the smallest suitable integer type (uint8, uint16, int32); with ``reuse``, an
    array already of that type is returned as it is instead of copied.

    Raises InputError for non-integer, negative or huge values: such a file is not a label map."""
    if view.dtype == bool:
        return np.array(view, dtype=np.uint8)
    if view.size == 0:
        return np.array(view, dtype=np.uint8)
    if not np.issubdtype(view.dtype, np.integer):
        if not np.issubdtype(view.dtype, np.floating) or not _all_integral(view):
            raise InputError(
                f"{what} {path} has non-integer voxel values; a label map must hold whole-number label ids"
            )
    low, high = view.min(), view.max()
    if low < 0:
        raise InputError(
            f"{what} {path} has negative voxel values (minimum {low:g}); a label map holds label ids >= 0"
            " (is this a CT image?)"
        )
    for dtype, limit in ((np.uint8, 256), (np.uint16, 65536), (np.int32, np.iinfo(np.int32).max + 1)):
        if high < limit:
            if reuse and view.dtype == dtype:
                return view
            return np.array(view, dtype=dtype)
    raise InputError(f"{what} {path} has label values up to {high:g}, too large for label ids")


# ------------------------------------------------------------------------------------------------
# CT
# ------------------------------------------------------------------------------------------------


def read_ct(path, series_uid: str | None = None) -> Volume:
    """Read a CT volume in Hounsfield units.

    Args:
        path: a NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``) or MetaImage
            (``.mha``/``.mhd``) file, a folder holding a DICOM series, or one file of a DICOM
            series (the whole series it belongs to is read).
        series_uid: SeriesInstanceUID to read when the DICOM folder holds several series.

    Returns:
        A :class:`Volume` with HU values (rescale slope/intercept applied) as ``int16`` when they
        are whole numbers within the ``int16`` range, otherwise ``float32``; geometry as IJK→RAS
        in mm.

    Raises:
        InputError: missing, unreadable or corrupt input; an image that is not a 3-D scalar volume
            or has a single slice; a DICOM folder with no series, or with several and no
            ``series_uid``; DICOM slices that are unevenly spaced, duplicated or gantry-tilted.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"CT file not found: {path}")
    if path.is_dir():
        image = _read_dicom_series(path, series_uid)
    elif not path.is_file():
        raise InputError(f"CT path {path} is not a regular file (a device, pipe or socket)")
    elif _has_dicom_preamble(path) or path.suffix.lower() == ".dcm":
        image = _read_dicom_series(path.parent, series_uid, member=path)
    else:
        direct = _read_nifti_directly(path, "CT")
        if direct is not None:
            array, ijk_to_ras = direct
            _check_single_slice(array.shape, path)
            return Volume(_ct_array(array, reuse=True), _check_grid(ijk_to_ras, path, "CT"))
        image = _read_image_file(path, "CT")
    image = _as_3d_scalar(image, path, "CT")
    _check_single_slice(sitk.GetArrayViewFromImage(image).shape, path)
    ijk_to_ras = _check_grid(_sitk_ijk_to_ras(image), path, "CT")
    array = _ct_array(_buffer_of(image), reuse=True)
    del image
    return Volume(array, ijk_to_ras)


def _has_dicom_preamble(path: Path) -> bool:
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
            if any(entry.is_file() and _has_dicom_preamble(Path(entry.path)) for entry in entries):
                return True
    except OSError:
        return False
    try:  # DICOM files without the Part 10 preamble: let GDCM decide
        with _quiet_itk():
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


def _read_dicom_series(folder: Path, series_uid: str | None, member: Path | None = None) -> sitk.Image:
    """Read one DICOM series from ``folder`` (the one holding ``member`` when given)."""
    with _quiet_itk():
        return _read_dicom_series_quietly(folder, series_uid, member)


def _read_dicom_series_quietly(folder: Path, series_uid: str | None, member: Path | None) -> sitk.Image:
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as error:
        raise InputError(f"cannot scan DICOM folder {folder}: {_itk_reason(error)}") from None
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
        _check_declared_size(folder, "DICOM series", (*size[:2], len(files) * (size[2] if len(size) > 2 else 1)),
                             _component_bytes(first.GetPixelID()) * max(1, first.GetNumberOfComponents()))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read DICOM series {uid or '(no UID)'} in {folder}: {_itk_reason(error)}") from None
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


# ------------------------------------------------------------------------------------------------
# Label maps
# ------------------------------------------------------------------------------------------------

LABEL_MAP_CONVENTIONS: tuple[str, ...] = ("totalsegmentator", "verse", "vertebrae_body")
"""Label conventions that Slicer segments can be mapped to (see :func:`read_labelmap`)."""


def convention_ids(convention: str) -> dict[str, int]:
    """Map TotalSegmentator class name (= Slicer segment ID) → label id in a convention."""
    if convention == "totalsegmentator":
        return {name: label for label, name in levels.TOTAL_CLASS_NAMES.items()}
    if convention == "verse":
        ids = {f"vertebrae_{level}": label for level, label in levels.VERSE_VERTEBRA_IDS.items()}
        ids.update({f"vertebrae_{level}": label for label, level in levels.VERSE_EXTRA_IDS.items()})
        return ids
    if convention == "vertebrae_body":
        return {"vertebrae_body": levels.BODY_LABEL, "intervertebral_discs": levels.DISC_LABEL}
    raise InputError(f"unknown label convention {convention!r}; use one of {', '.join(LABEL_MAP_CONVENTIONS)}")


def read_labelmap(path, reference: Volume | None = None, convention: str = "totalsegmentator") -> Volume:
    """Read a label map, optionally resampled onto a reference grid.

    Args:
        path: a NIfTI, NRRD or MetaImage label map (voxel values are used as they are), or a 3D
            Slicer segmentation (``.seg.nrrd``/``.seg.nhdr``, or any ``.nrrd`` with
            ``Segment0_ID`` in its header), 3-D (one layer) or 4-D (several layers).
        reference: when given and its grid differs, the label map is resampled onto it by
            nearest neighbour in physical (RAS) space; see :func:`resample_labelmap`.
        convention: label ids that Slicer segments are mapped to: ``totalsegmentator`` (``total``
            task ids), ``verse`` (VerSe ids, vertebrae only) or ``vertebrae_body`` (1 = bodies,
            2 = discs). Plain label-map files are not remapped.

    Slicer segments are matched by segment ID equal to a TotalSegmentator class name (e.g.
    ``vertebrae_L1``); failing that, by their terminology (SNOMED CT code of the segmented
    property type, with its left/right modifier, or a type meaning such as ``L1 vertebra``). The
    segment name is never used on its own, and a segment whose name names a different structure
    than its terminology is dropped. Unmatched segments are dropped with a :class:`LabelMapWarning`.
    Where segments of different layers overlap, the segment of the higher layer wins (also
    reported with a warning).

    Returns:
        A :class:`Volume` of integer label ids (``uint8`` when the largest id is below 256, else
        ``uint16`` or ``int32``), IJK→RAS in mm.

    Raises:
        InputError: missing or unreadable file, not a 3-D scalar image, non-integer or negative
            values, unknown convention, or a label map that does not overlap the reference.
    """
    known = convention_ids(convention)
    path = _require_file(path, "segmentation")
    if _is_segmentation_nrrd(path):
        labelmap = _read_segmentation_nrrd(path, known, convention)
    else:
        direct = _read_nifti_directly(path, "segmentation")
        if direct is not None:
            ijk_to_ras = _check_grid(direct[1], path, "segmentation")
            labelmap = Volume(_label_array(direct[0], path, reuse=True), ijk_to_ras)
        else:
            image = _as_3d_scalar(_read_image_file(path, "segmentation"), path, "segmentation")
            ijk_to_ras = _check_grid(_sitk_ijk_to_ras(image), path, "segmentation")
            labelmap = Volume(_label_array(_buffer_of(image), path, reuse=True), ijk_to_ras)
    if reference is not None:
        labelmap = resample_labelmap(labelmap, reference, name=f"segmentation {path}")
    return labelmap


def resample_labelmap(labelmap: Volume, reference: Volume, name: str = "segmentation") -> Volume:
    """Resample a label map onto ``reference``'s grid by nearest neighbour in physical space.

    For each reference voxel centre (RAS, mm) the label voxel whose centre is nearest along each
    of the label grid's axes is taken (continuous label index rounded half up); reference voxels
    outside the label grid get 0. Exact with respect to both 4x4 matrices, whatever their
    orientations (RAS, LPS, permuted, oblique). When the label grid equals the reference grid up
    to axis flips, permutations and whole-voxel shifts, the labels are copied by array indexing;
    otherwise SimpleITK's nearest-neighbour resampler runs slab by slab of the reference.

    Raises:
        InputError: the label map has labels but none lands inside the reference grid (different
            patient or wrong file).
    """
    if labelmap.same_grid(reference, tol=1e-4):  # 1e-4 mm: nearest neighbour is the identity
        return Volume(labelmap.array, reference.ijk_to_ras)
    not_overlapping = InputError(f"{name} does not overlap the CT (different patient or wrong file?)")
    low_a, high_a = _bounds(labelmap)
    low_b, high_b = _bounds(reference)
    if np.any(high_a < low_b) or np.any(high_b < low_a):
        raise not_overlapping
    out = _resample_by_indexing(labelmap, reference)
    if out is None:
        out = _resample_by_sitk(labelmap, reference)
    if not out.any() and labelmap.array.any():
        raise not_overlapping
    return Volume(out, reference.ijk_to_ras)


def _bounds(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    corners = geometry.grid_corners_ras(volume.ijk_to_ras, volume.shape)
    return corners.min(axis=0), corners.max(axis=0)


def _resample_by_indexing(labelmap: Volume, reference: Volume) -> np.ndarray | None:
    """Copy labels when reference voxel centres fall exactly on label voxel centres by a signed
    axis permutation plus a whole-voxel shift; None when the grids are not related that way."""
    ref_to_label = np.linalg.inv(labelmap.ijk_to_ras) @ reference.ijk_to_ras
    linear, shift = ref_to_label[:3, :3], ref_to_label[:3, 3]
    permutation = np.rint(linear)
    if not (np.all(np.abs(permutation).sum(axis=0) == 1) and np.all(np.abs(permutation).sum(axis=1) == 1)):
        return None
    error = np.abs(linear - permutation).max() * max(reference.shape) + np.abs(shift - np.rint(shift)).max()
    if error > 1e-3:
        return None
    shift = np.rint(shift).astype(int)
    n_ref = reference.shape[::-1]  # sizes along i, j, k
    n_lab = labelmap.shape[::-1]
    out = np.zeros(reference.shape, dtype=labelmap.array.dtype)
    ref_slices, lab_slices, lab_axes = [None] * 3, [None] * 3, [None] * 3
    for a in range(3):  # reference ijk axis
        b = int(np.argmax(np.abs(permutation[:, a])))  # label ijk axis it runs along
        sign, t = int(permutation[b, a]), int(shift[b])
        if sign > 0:  # label index = r + t
            r0, r1 = max(0, -t), min(n_ref[a], n_lab[b] - t)
            lab = slice(r0 + t, r1 + t)
        else:  # label index = t - r
            r0, r1 = max(0, t - n_lab[b] + 1), min(n_ref[a], t + 1)
            stop = t - r1
            lab = slice(t - r0, stop if stop >= 0 else None, -1)
        if r0 >= r1:
            return out
        ref_slices[2 - a], lab_slices[2 - a], lab_axes[2 - a] = slice(r0, r1), lab, 2 - b
    aligned = labelmap.array.transpose(lab_axes)
    out[tuple(ref_slices)] = aligned[tuple(lab_slices)]
    return out


def _resample_by_sitk(labelmap: Volume, reference: Volume) -> np.ndarray:
    """Nearest-neighbour resampling with SimpleITK, a slab of reference slices at a time."""
    source = volume_to_sitk(labelmap)
    spacing, direction, _ = _lps_geometry(reference.ijk_to_ras)
    ijk_to_lps = geometry.LPS_TO_RAS @ reference.ijk_to_ras
    nk, nj, ni = reference.shape
    out = np.zeros(reference.shape, dtype=labelmap.array.dtype)
    slab = max(1, _SLAB_VOXELS // (ni * nj))
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        origin = ijk_to_lps[:3, :3] @ np.array([0.0, 0.0, k0]) + ijk_to_lps[:3, 3]
        with _quiet_itk():
            resampled = sitk.Resample(
                source,
                [ni, nj, k1 - k0],
                sitk.Transform(),
                sitk.sitkNearestNeighbor,
                tuple(origin),
                spacing,
                direction,
                0,
                source.GetPixelID(),
            )
        out[k0:k1] = sitk.GetArrayViewFromImage(resampled)
    return out


# ------------------------------------------------------------------------------------------------
# NRRD and Slicer segmentations (.seg.nrrd)
# ------------------------------------------------------------------------------------------------

_NRRD_TYPES = {
    np.dtype("i1"): ("signed char", "int8", "int8_t"),
    np.dtype("u1"): ("uchar", "unsigned char", "uint8", "uint8_t"),
    np.dtype("i2"): ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    np.dtype("u2"): ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    np.dtype("i4"): ("int", "signed int", "int32", "int32_t"),
    np.dtype("u4"): ("uint", "unsigned int", "uint32", "uint32_t"),
    np.dtype("i8"): ("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t"),
    np.dtype("u8"): ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    np.dtype("f4"): ("float",),
    np.dtype("f8"): ("double",),
}
_NRRD_DTYPE = {name: dtype for dtype, names in _NRRD_TYPES.items() for name in names}
_NRRD_SPACE_TO_RAS = {
    "left-posterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "lps": np.diag([-1.0, -1.0, 1.0]),
    "right-anterior-superior": np.eye(3),
    "ras": np.eye(3),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
    "las": np.diag([-1.0, 1.0, 1.0]),
}
_HEADER_LIMIT = 16 << 20


def _read_nrrd_header(path: Path, what: str = "segmentation") -> tuple[dict[str, str], dict[str, str], int]:
    """Parse a NRRD header: (fields with lower-case names, ``key:=value`` pairs, byte offset of
    the attached data)."""
    fields: dict[str, str] = {}
    pairs: dict[str, str] = {}
    with open(path, "rb") as f:
        magic = f.readline(64)
        if not magic.startswith(b"NRRD000"):
            raise InputError(f"{what} file {path} is not a NRRD file")
        while True:
            raw = f.readline(_HEADER_LIMIT)
            if not raw or f.tell() > _HEADER_LIMIT:
                break  # detached header: no blank line before the end
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:
                break
            if line.startswith("#"):
                continue
            if ":=" in line:
                key, value = line.split(":=", 1)
                pairs[key] = value
            elif ": " in line:
                key, value = line.split(": ", 1)
                fields[key.strip().lower()] = value.strip()
        return fields, pairs, f.tell()


def _is_segmentation_nrrd(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".seg.nrrd", ".seg.nhdr")):
        return True
    if name.endswith((".nrrd", ".nhdr")):
        try:
            return "Segment0_ID" in _read_nrrd_header(path)[1]
        except (InputError, OSError):
            return False
    return False


def _inflate(handle, kind: str, want: int) -> bytes:
    """Up to ``want`` bytes inflated from a gzip (or zlib; several gzip members are read in turn)
    or bzip2 stream read from ``handle``: the stream is never inflated further than that, so a
    small file that inflates to a huge one costs neither memory nor time."""
    if kind == "bz2":
        make = bz2.BZ2Decompressor
    else:
        def make():
            return zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, detected
    out = bytearray()
    inflater = make()
    while len(out) < want:
        compressed = handle.read(_READ_CHUNK_BYTES)
        if not compressed:
            break
        while compressed and len(out) < want:
            if kind == "bz2":
                out += inflater.decompress(compressed, want - len(out))
                compressed = b""
                while not inflater.eof and not inflater.needs_input and len(out) < want:
                    out += inflater.decompress(b"", want - len(out))
                if inflater.eof:
                    compressed, inflater = inflater.unused_data, make()
            else:
                out += inflater.decompress(compressed, want - len(out))
                if inflater.eof:  # another member may follow
                    compressed, inflater = inflater.unused_data, make()
                else:
                    compressed = inflater.unconsumed_tail
    return bytes(out)


def _parse_vector(text: str) -> np.ndarray:
    """A NRRD vector ``(x,y,z)``; ValueError when it is not one."""
    return np.array([float(v) for v in text.strip().strip("()").split(",")], dtype=float)


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Read a NRRD file with up to one non-spatial axis.

    Returns ``(array, ijk_to_ras, pairs)``; ``array`` is indexed ``[layer, k, j, i]`` (one layer
    for a 3-D file), ``pairs`` holds the ``key:=value`` header lines."""
    try:
        fields, pairs, offset = _read_nrrd_header(path)
    except OSError as error:
        raise InputError(f"cannot read segmentation file {path}: {error.strerror or error}") from None

    def bad(reason: str) -> InputError:
        return InputError(f"cannot read segmentation file {path}: {reason}")

    try:
        dtype = _NRRD_DTYPE[fields["type"].lower()]
        dimension = int(fields["dimension"])
        sizes = [int(v) for v in fields["sizes"].split()]
    except (KeyError, ValueError):
        raise bad("the NRRD header lacks a valid type, dimension or sizes field") from None
    if len(sizes) != dimension or any(n < 1 for n in sizes):
        raise bad("the NRRD sizes do not match its dimension")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if fields.get("endian", "little").lower() == "big" else "<")
    _check_nrrd_geometry(fields, path, "segmentation")

    # geometry: which axes are spatial, their steps and the origin
    space = fields.get("space", "left-posterior-superior").lower()
    if space not in _NRRD_SPACE_TO_RAS:
        raise bad(f"NRRD space {fields.get('space')!r} is not supported (use left-posterior-superior)")
    try:
        tokens = re.findall(r"none|\([^)]*\)", fields["space directions"])  # present: checked above
        if len(tokens) != dimension:
            raise bad("the NRRD space directions do not match its dimension")
        spatial = [axis for axis, token in enumerate(tokens) if token != "none"]
        vectors = [_parse_vector(tokens[axis]) for axis in spatial]
        if len(spatial) != 3 or dimension - len(spatial) > 1 or any(v.size != 3 for v in vectors):
            raise bad("a segmentation must have three spatial axes and at most one layer axis")
        origin = _parse_vector(fields["space origin"]) if "space origin" in fields else np.zeros(3)
    except ValueError:
        raise bad("the NRRD space directions, spacings or space origin are not numbers") from None
    if origin.size != 3:
        raise bad("the NRRD space origin is not a point in 3-D space")
    to_ras = _NRRD_SPACE_TO_RAS[space]
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = to_ras @ np.stack(vectors, axis=1)
    ijk_to_ras[:3, 3] = to_ras @ origin
    _check_grid(ijk_to_ras, path, "segmentation")

    # data: the declared size is checked first, and no more than it is read or inflated
    count = math.prod(sizes)  # Python ints: np.prod would count in a 32-bit int on Windows with numpy 1.x
    nbytes = _check_declared_size(path, "segmentation", sizes, dtype.itemsize)
    data_file = fields.get("data file", fields.get("datafile"))
    data_path = _checked_data_file(path, data_file, "segmentation", "NRRD") if data_file else None
    encoding = fields.get("encoding", "raw").lower()
    try:
        line_skip = int(fields.get("line skip", fields.get("lineskip", 0)))
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", 0)))
    except ValueError:
        raise bad("the NRRD line skip or byte skip is not a whole number") from None
    if line_skip < 0 or byte_skip < -1:
        raise bad("the NRRD line skip or byte skip is negative")
    if byte_skip == -1 and encoding != "raw":
        raise bad("NRRD byte skip -1 is only valid with raw encoding")
    try:
        with open(data_path or path, "rb") as f:
            if data_path is None:
                f.seek(offset)
            for _ in range(line_skip):
                f.readline(_HEADER_LIMIT)
            if encoding == "raw":
                if byte_skip == -1:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(f.tell() - nbytes, 0))
                else:
                    f.seek(byte_skip, os.SEEK_CUR)
                payload = f.read(nbytes)
            elif encoding in ("gzip", "gz", "bzip2", "bz2"):
                payload = _inflate(f, "bz2" if encoding.startswith("bz") else "gzip", byte_skip + nbytes)[byte_skip:]
            elif encoding in ("ascii", "text", "txt"):
                text = f.read(max_volume_bytes() + 1)
                if len(text) > max_volume_bytes():
                    raise bad(f"its ASCII voxel data is larger than {_gib(max_volume_bytes())} (set"
                              f" {MAX_VOLUME_BYTES_VARIABLE} to read it)")
                values = np.array(text.split(), dtype=float)
                payload = values.astype(dtype).tobytes() if values.size == count else b""
            else:
                raise bad(f"NRRD encoding {encoding!r} is not supported")
    except (OSError, zlib.error, EOFError, ValueError) as error:
        raise bad(f"the voxel data is corrupt or missing ({error})") from None
    if len(payload) < nbytes:
        raise bad(f"the voxel data is truncated ({len(payload)} of {nbytes} bytes)")
    # NRRD's first axis varies fastest, so numpy's axis order is the reverse of NRRD's
    array = np.frombuffer(payload, dtype=dtype, count=count).reshape(sizes[::-1])
    if dimension == 4:
        layer_axis = next(axis for axis in range(4) if axis not in spatial)
        array = np.moveaxis(array, 3 - layer_axis, 0)
    else:
        array = array[None]
    return array, ijk_to_ras, pairs


# SNOMED CT codes (segmented property type, optional modifier) of the structures this product
# uses, as TotalSegmentator's Slicer extension writes them in segment terminology.
_LEFT, _RIGHT = "7771000", "24028007"
_SNOMED_STRUCTURES: dict[tuple[str, str | None], str] = {
    ("54735007", None): "sacrum",
    ("15825003", None): "aorta",
    ("2748008", None): "spinal_cord",
    ("244849004", _LEFT): "autochthon_left",
    ("244849004", _RIGHT): "autochthon_right",
    ("68455001", _LEFT): "iliopsoas_left",
    ("68455001", _RIGHT): "iliopsoas_right",
    ("3572006", None): "vertebrae_body",
}
_SNOMED_VERTEBRAE = {
    "C1": "14806007", "C2": "39976000", "C3": "113205007", "C4": "5329002", "C5": "36978003",
    "C6": "36054005", "C7": "87391001", "T1": "64864005", "T2": "53733008", "T3": "1626008",
    "T4": "73071006", "T5": "56401006", "T6": "45296009", "T7": "62487009", "T8": "11068009",
    "T9": "82687006", "T10": "7610001", "T11": "12989004", "T12": "23215003", "L1": "66794005",
    "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003",
}
_SNOMED_STRUCTURES.update({(code, None): f"vertebrae_{level}" for level, code in _SNOMED_VERTEBRAE.items()})
_VERTEBRA_MEANING = re.compile(r"^\s*([CTLS])\s*(\d{1,2})\s+vertebra\s*$", re.IGNORECASE)


def vertebra_from_text(text: str) -> str | None:
    """``vertebrae_L1`` for a text such as ``L1 vertebra``; None otherwise."""
    match = _VERTEBRA_MEANING.match(text or "")
    if not match:
        return None
    level = f"{match.group(1).upper()}{int(match.group(2))}"
    return f"vertebrae_{level}" if level in levels.LEVEL_INDEX or level in ("L6", "T13") else None


def structure_from_terminology(entry: str) -> str | None:
    """TotalSegmentator class name named by a Slicer terminology entry
    (``context~category~type~typeModifier~anatomicContext~region~regionModifier``, each code as
    ``scheme^value^meaning``); None when it names none of the structures this product knows."""
    parts = entry.split("~")
    if len(parts) < 3:
        return None
    type_code = parts[2].split("^")
    modifier = parts[3].split("^") if len(parts) > 3 else []
    code = type_code[1].strip() if len(type_code) > 1 else ""
    modifier_code = modifier[1].strip() if len(modifier) > 1 and modifier[1].strip() else None
    if (code, modifier_code) in _SNOMED_STRUCTURES:
        return _SNOMED_STRUCTURES[(code, modifier_code)]
    if modifier_code is None or modifier_code not in (_LEFT, _RIGHT):
        meaning = type_code[2] if len(type_code) > 2 else ""
        return vertebra_from_text(meaning)
    return None


def _segment_terminology(pairs: dict[str, str], index: int) -> str:
    """A segment's terminology entry: the ``Segment<N>_Terminology`` key, or the
    ``TerminologyEntry`` tag in ``Segment<N>_Tags`` (``key:value|key:value|``)."""
    entry = pairs.get(f"Segment{index}_Terminology", "")
    if entry:
        return entry
    for tag in pairs.get(f"Segment{index}_Tags", "").split("|"):
        key, _, value = tag.partition(":")
        if key == "TerminologyEntry":
            return value
    return ""


_GENERIC_SEGMENT_ID = re.compile(r"^(?:Segment|Label)_(\d+)$")


def segment_structure(segment_id: str, name: str, terminology: str, label_value: int | None,
                      known: dict[str, int]) -> tuple[str | None, str]:
    """(class name or None, reason when None) of one segment, by the product's one matching rule.

    In this order: the segment ID is a class name of ``known`` (``vertebrae_L1``); else its
    terminology names a structure (SNOMED CT code or a type meaning such as ``L1 vertebra``), unless
    the segment's name names another structure; else the ID is the generic one that Slicer gives a
    label map loaded as a segmentation without names (``Segment_<n>``, or ``Label_<n>`` from the
    Segmentations module's import) with ``n`` equal to the segment's label value, and ``n`` is an
    id of ``known``: a TotalSegmentator NIfTI loaded with "Add data" keeps its label values. The
    display name alone never decides, because users rename segments freely.
    """
    segment_id = (segment_id or "").strip()
    if segment_id in known:
        return segment_id, ""
    structure = structure_from_terminology(terminology) if terminology else None
    if structure is not None:
        name = (name or "").strip()
        named = name if name in known or name in levels.TOTAL_CLASS_NAMES.values() else vertebra_from_text(name)
        if named is not None and named != structure:
            return None, f"its name names {named} but its terminology {structure}"
        return structure, ""
    generic = _GENERIC_SEGMENT_ID.match(segment_id)
    if generic and label_value is not None and int(generic.group(1)) == int(label_value):
        by_id = {label: cls for cls, label in known.items()}
        if int(label_value) in by_id:
            return by_id[int(label_value)], ""
    return None, "no matching segment ID, terminology or label value"


def _segment_structure(pairs: dict[str, str], index: int, known: dict[str, int]) -> tuple[str | None, str]:
    """(class name or None, reason when None) for segment ``index`` of a ``.seg.nrrd`` header."""
    try:
        label_value = int(pairs.get(f"Segment{index}_LabelValue", ""))
    except ValueError:
        label_value = None
    return segment_structure(pairs.get(f"Segment{index}_ID", ""), pairs.get(f"Segment{index}_Name", ""),
                             _segment_terminology(pairs, index), label_value, known)


def _segment_indices(pairs: dict[str, str]) -> list[int]:
    indices = set()
    for key in pairs:
        match = re.match(r"^Segment(\d+)_ID$", key)
        if match:
            indices.add(int(match.group(1)))
    return sorted(indices)


def _read_segmentation_nrrd(path: Path, known: dict[str, int], convention: str) -> Volume:
    """Read a Slicer ``.seg.nrrd`` into one label volume in the ids of ``convention``."""
    layers, ijk_to_ras, pairs = _read_nrrd(path)
    if not (np.issubdtype(layers.dtype, np.integer) or _all_integral(layers)):
        raise InputError(f"segmentation {path} has non-integer voxel values; a label map must hold label ids")
    indices = _segment_indices(pairs)
    if not indices:  # a plain NRRD label map that happens to be named .seg.nrrd
        if layers.shape[0] != 1:
            raise InputError(f"segmentation {path} has {layers.shape[0]} layers but no segment descriptions")
        return Volume(_label_array(layers[0], path), ijk_to_ras)

    lookups: dict[int, dict[int, int]] = {}
    dropped = []
    for index in indices:
        structure, reason = _segment_structure(pairs, index, known)
        segment = pairs.get(f"Segment{index}_ID", f"Segment{index}")
        if structure is None or structure not in known:
            dropped.append(f"{segment} ({reason or f'no {convention} label id for {structure}'})")
            continue
        try:
            layer = int(pairs.get(f"Segment{index}_Layer", index))
            value = int(pairs.get(f"Segment{index}_LabelValue", 1))
        except ValueError:
            dropped.append(f"{segment} (invalid layer or label value)")
            continue
        if not 0 <= layer < layers.shape[0] or value <= 0:
            dropped.append(f"{segment} (layer {layer} or label value {value} not in the file)")
            continue
        lookups.setdefault(layer, {})[value] = known[structure]
    if dropped:
        shown = ", ".join(dropped[:12]) + (f" and {len(dropped) - 12} more" if len(dropped) > 12 else "")
        warnings.warn(f"{path.name}: {len(dropped)} segment(s) not used: {shown}", LabelMapWarning, stacklevel=3)

    largest = max((label for table in lookups.values() for label in table.values()), default=0)
    dtype = np.uint8 if largest < 256 else np.uint16 if largest < 65536 else np.int32
    out = np.zeros(layers.shape[1:], dtype=dtype)
    overlap = 0
    for layer in sorted(lookups):
        data = layers[layer]
        if data.dtype.kind == "f":
            data = data.astype(np.int64)
        table = lookups[layer]
        lut = np.zeros(max(int(data.max()), max(table)) + 1, dtype=dtype)
        for value, label in table.items():
            lut[value] = label
        data = np.where((data >= 0) & (data < lut.size), data, 0) if data.min() < 0 else data
        painted = lut[data]
        hit = painted > 0
        overlap += int(np.count_nonzero(hit & (out > 0)))
        out[hit] = painted[hit]
    if overlap:
        warnings.warn(
            f"{path.name}: segments of different layers overlap in {overlap} voxels; the higher layer was kept",
            LabelMapWarning,
            stacklevel=3,
        )
    return Volume(out, ijk_to_ras)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

_WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def _extension(path: Path, allowed) -> str:
    name = path.name.lower()
    for extension in allowed:
        if name.endswith(extension):
            return extension
    raise InputError(f"cannot write {path}: the file name must end with one of {', '.join(allowed)}")


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File name endings of the image formats read here (a Slicer ``.seg.nrrd`` is an image too)."""


def split_image_suffix(name: str) -> tuple[str, str] | None:
    """``(stem, suffix)`` of an image file name (``"ct.nii.gz"`` → ``("ct", ".nii.gz")``; the
    suffix compared case-insensitively, ``.seg.nrrd`` kept whole); None for other names."""
    lower = name.lower()
    for suffix in (".seg.nrrd", *IMAGE_SUFFIXES):
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def atomic_write_text(path, text: str) -> None:
    """Write a text file (UTF-8) atomically with :func:`atomic_write`."""
    path = Path(path)
    atomic_write(path, path.suffix, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def atomic_write(path: Path, extension: str, write) -> None:
    """Call ``write(temporary_path)`` for a hidden file next to ``path`` (same extension, so
    SimpleITK still picks the format), flush it to disk, then move it over ``path``.

    ``write`` creates the file itself, so it gets the usual permissions (umask), not the 0600
    of :func:`tempfile.mkstemp`."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: the folder is not writable")
    stem = path.name[: -len(extension)]
    temporary = str(folder / f".{stem}.tmp-{secrets.token_hex(6)}{extension}")
    try:
        with _quiet_itk():
            write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        else:
            reason = _itk_reason(error).replace(temporary, str(path))
        raise InputError(f"cannot write {path}: {reason}") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_volume(path, volume: Volume, compress: bool = True) -> None:
    """Write a volume as NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``) or MetaImage (``.mha``),
    chosen by the file name, atomically.

    The RAS geometry is stored as the files expect it: SimpleITK writes LPS origin and direction,
    which NIfTI's writer turns into RAS qform and sform (both code 1, scanner). NIfTI stores the
    matrix in single precision (about 1e-5 mm at 500 mm from the origin); NRRD and MetaImage in
    double precision. NIfTI cannot store a sheared grid: such a volume raises :class:`InputError`
    unless written as NRRD or MetaImage. ``compress`` gzips the voxel data of NRRD and MetaImage
    files; NIfTI compression follows the name (``.nii.gz`` compressed, ``.nii`` not).
    """
    path = Path(path).expanduser()
    extension = _extension(path, _WRITE_EXTENSIONS)
    if extension.startswith(".nii"):
        directions = geometry.direction_cosines(volume.ijk_to_ras)
        if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-6):
            raise InputError(f"cannot write {path}: NIfTI cannot store a sheared voxel grid; use .nrrd")
    image = volume_to_sitk(volume)
    atomic_write(path, extension, lambda temporary: sitk.WriteImage(image, temporary, bool(compress)))


def _segment_color(label: int) -> tuple[float, float, float]:
    """A stable, distinct-looking colour for a label id (golden-angle hue walk)."""
    hue = (label * 0.618033988749895) % 1.0
    sector, fraction = int(hue * 6), hue * 6 - int(hue * 6)
    high, low = 0.9, 0.3
    rising, falling = low + (high - low) * fraction, high - (high - low) * fraction
    return [
        (high, rising, low), (falling, high, low), (low, high, rising),
        (low, falling, high), (rising, low, high), (high, low, falling),
    ][sector % 6]


_SNOMED_MEANINGS = {
    "54735007": "Sacrum",
    "15825003": "Aorta",
    "2748008": "Spinal cord",
    "244849004": "Deep muscle of back",
    "68455001": "Iliopsoas muscle",
    "3572006": "Vertebral body",
}
_SNOMED_MEANINGS.update({code: f"{level} vertebra" for level, code in _SNOMED_VERTEBRAE.items()})


def terminology_for(name: str) -> str | None:
    """Slicer terminology entry for the TotalSegmentator class names this product uses."""
    for (code, modifier), structure in _SNOMED_STRUCTURES.items():
        if structure == name:
            meaning = _SNOMED_MEANINGS[code]
            modifier_text = f"SCT^{modifier}^{'Left' if modifier == _LEFT else 'Right'}" if modifier else "^^"
            return (
                "Segmentation category and type - 3D Slicer General Anatomy list"
                f"~SCT^123037004^Anatomical Structure~SCT^{code}^{meaning}~{modifier_text}"
                "~Anatomic codes - DICOM master list~^^~^^"
            )
    return None


def write_segmentation_nrrd(path, labelmap: Volume, segment_names: dict[int, str]) -> None:
    """Write a label map as a 3D Slicer segmentation (``.seg.nrrd``, one layer), atomically.

    Args:
        path: output file, ending in ``.seg.nrrd`` (or ``.nrrd``).
        labelmap: integer label ids on any grid (IJK→RAS, mm); stored in LPS as Slicer does.
        segment_names: label value → segment ID, e.g. ``{31: "vertebrae_L1"}``. The ID is also the
            segment name; TotalSegmentator class names get their SNOMED CT terminology. Voxels
            whose label is not listed are written as 0.

    The file holds ``Segment<N>_ID/Name/LabelValue/Layer/Color/Extent/Tags`` for every listed
    label and the ``Segmentation_*`` keys Slicer reads, gzip-compressed, so that Slicer opens it
    as a segmentation and :func:`read_labelmap` maps it back by segment ID.
    """
    path = Path(path).expanduser()
    extension = _extension(path, (".seg.nrrd", ".nrrd"))
    labels = sorted(int(v) for v in segment_names)
    if any(v <= 0 for v in labels):
        raise ValueError("segment label values must be positive")
    source = labelmap.array
    if source.dtype.kind not in "iub":
        raise ValueError("write_segmentation_nrrd needs an integer label map")
    dtype = np.dtype("u1") if not labels or labels[-1] < 256 else np.dtype("<u2")
    if labels and labels[-1] >= 65536:
        raise ValueError("segment label values must be below 65536")
    keep = np.isin(source, labels)
    data = np.where(keep, source, 0).astype(dtype)

    ijk_to_lps = geometry.LPS_TO_RAS @ labelmap.ijk_to_ras
    nk, nj, ni = labelmap.shape

    def vector(values) -> str:
        return "(" + ",".join(repr(float(v)) for v in values) + ")"

    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {'unsigned char' if dtype.itemsize == 1 else 'unsigned short'}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {ni} {nj} {nk}",
        "space directions: " + " ".join(vector(ijk_to_lps[:3, axis]) for axis in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: gzip",
        f"space origin: {vector(ijk_to_lps[:3, 3])}",
    ]
    boxes = ndimage.find_objects(data) if data.any() else []
    for index, value in enumerate(labels):
        name = " ".join(str(segment_names[value]).split())  # no line breaks in a header value
        box = boxes[value - 1] if value <= len(boxes) else None
        if box is not None:
            k, j, i = box
            extent = f"{i.start} {i.stop - 1} {j.start} {j.stop - 1} {k.start} {k.stop - 1}"
        else:
            extent = "0 -1 0 -1 0 -1"
        terminology = terminology_for(name)
        tags = "Segmentation.Status:inprogress|" + (f"TerminologyEntry:{terminology}|" if terminology else "")
        color = " ".join(f"{c:.6g}" for c in _segment_color(value))
        lines += [
            f"Segment{index}_Color:={color}",
            f"Segment{index}_ColorAutoGenerated:=0",
            f"Segment{index}_Extent:={extent}",
            f"Segment{index}_ID:={name}",
            f"Segment{index}_LabelValue:={value}",
            f"Segment{index}_Layer:=0",
            f"Segment{index}_Name:={name}",
            f"Segment{index}_NameAutoGenerated:=0",
            f"Segment{index}_Tags:={tags}",
        ]
    lines += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    header = ("\n".join(lines) + "\n\n").encode("utf-8")
    payload = gzip.compress(np.ascontiguousarray(data).tobytes(), compresslevel=6)

    def write(temporary: str) -> None:
        with open(temporary, "xb") as f:
            f.write(header)
            f.write(payload)

    atomic_write(path, extension, write)
