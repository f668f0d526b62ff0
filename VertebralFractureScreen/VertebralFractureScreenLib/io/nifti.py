"""NIfTI (``.nii``, ``.nii.gz``): header checks and the direct reader.

The header is checked before any voxel is read, because ITK silently repairs some broken headers
(a NaN, zero or negative voxel size becomes 1 mm) and prints others' problems on stderr. Refused
with one sentence (:class:`~.errors.InputError`):

* a voxel size (``pixdim[1..3]``) that is not a finite number between
  :data:`~.volume.MIN_VOXEL_SIZE_MM` and :data:`~.volume.MAX_VOXEL_SIZE_MM`;
* neither a qform nor an sform (both codes 0): the orientation in the patient is unknown (ITK
  would assume one); a degenerate sform used alone;
* a non-finite quaternion, ``qoffset`` or ``srow`` (sform) in a transform that is used (its code
  is above 0), an infinite value scaling, a ``vox_offset`` that is not a whole finite number of
  bytes past the header, dimensions that are not 1..7 positive sizes, an unknown datatype, no
  NIfTI magic (Analyze 7.5);
* a declared volume over :func:`~.files.max_volume_bytes`, and a file (or gzip stream) shorter
  than its header says: ITK would fill the missing voxels with garbage.

Values: ``scl_slope``/``scl_inter`` are applied by SimpleITK; the direct reader takes only
unscaled files.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .files import check_declared_size, file_chunks, itk_reason
from .sitk_bridge import quiet_itk, sitk_ijk_to_ras
from .volume import MIN_VOXEL_SIZE_MM, check_voxel_sizes, number_list

_NIFTI_BYTES_PER_VOXEL = {
    2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16,
    1792: 16, 2048: 32, 2304: 4,
}
"""Bytes per voxel of each NIfTI datatype code."""
_NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 256: np.int8, 512: np.uint16}
"""NIfTI-1 datatype codes read directly (little-endian, no scaling)."""


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
    check_voxel_sizes(info.pixdim[1 : min(ndim, 3) + 1], path, what, " in the NIfTI header's pixdim")
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
            raise bad(f"a non-finite {name} in its NIfTI header ({number_list(values)}), so its position in space"
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
    nbytes = check_declared_size(path, what, sizes, _NIFTI_BYTES_PER_VOXEL[info.datatype])
    return int(offset) + nbytes


def check_nifti(path: Path, what: str) -> None:
    """Check a ``.nii``/``.nii.gz`` header (see :func:`_check_nifti_header`) and raise when the file
    is shorter than the header says; files with other names are left alone.

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
    with contextlib.closing(file_chunks(path)) as chunks:
        for chunk in chunks:
            total += len(chunk)
            if total >= stop:
                break
    return total


def read_nifti_directly(path: Path, what: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxels (``[k, j, i]``) and IJK→RAS (mm) of a plain 3-D scalar NIfTI-1 file
    (``.nii``/``.nii.gz``), read straight into their final array, after :func:`check_nifti`.

    SimpleITK's NIfTI reader holds the voxels twice while reading; this reader holds them once.
    The geometry still comes from SimpleITK (its reading of the sform/qform); voxels are stored
    with i fastest, so the file's order is the ``[k, j, i]`` array's. None (the caller uses
    SimpleITK) for anything else: other file names, NIfTI-2, big-endian, scaled values, vectors,
    4-D. ``what`` names the file in messages (``"CT"``, ``"segmentation"``)."""
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    check_nifti(path, what)
    try:
        chunks = file_chunks(path)
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
        with quiet_itk():
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
        raise InputError(f"cannot read {what} file {path}: {itk_reason(error)}") from None
    except (OSError, zlib.error) as error:
        raise InputError(f"cannot read {what} file {path}: {getattr(error, 'strerror', None) or error}") from None
    return array, sitk_ijk_to_ras(reader)
