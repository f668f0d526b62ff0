"""NRRD (``.nrrd``, ``.nhdr``): header reading and checks, the detached-data rule (shared with
MetaImage, ``.mhd``/``.mha``), and a voxel reader for NRRD files with up to one non-spatial axis
(3D Slicer segmentations). No SimpleITK here.

Refused with one sentence (:class:`~.errors.InputError`), before ITK or this reader opens any
voxel data:

* a NRRD without ``space directions``: its orientation in the patient and its voxel size are
  unknown (ITK would assume one, and 1 mm steps); a space direction whose length is not a voxel
  size between :data:`~.volume.MIN_VOXEL_SIZE_MM` and :data:`~.volume.MAX_VOXEL_SIZE_MM`; a
  non-finite ``space origin`` (ITK turns a NaN direction into 1 mm and a NaN origin into 0);
* a NRRD (or MetaImage) whose detached data file is not a regular file in the header's folder or
  below it (absolute paths, ``..`` escaping that folder, links leading out of it, devices, FIFOs),
  or is split over several files;
* a declared volume over :func:`~.files.max_volume_bytes`; compressed data is inflated no further
  than the declared size.

Positions: ``space`` may be LPS (Slicer's, the default), RAS or LAS; the reader returns IJK→RAS
in mm.
"""

from __future__ import annotations

import math
import os
import re
import stat
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from .files import MAX_VOLUME_BYTES_VARIABLE, check_declared_size, gib, inflate, max_volume_bytes
from .volume import check_grid, check_voxel_sizes

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


def read_nrrd_header(path: Path, what: str = "segmentation") -> tuple[dict[str, str], dict[str, str], int]:
    """Parse a NRRD header: (fields with lower-case names, ``key:=value`` pairs, byte offset of
    the attached data). Raises :class:`InputError` when the file is not NRRD, ``OSError`` when it
    cannot be read."""
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
                check_voxel_sizes([step], path, what, f" for the NRRD space direction {token}")
    if "space origin" in fields:
        values = numbers(fields["space origin"])
        if values and not all(map(math.isfinite, values)):
            raise InputError(f"{what} file {path} has a non-finite space origin in its NRRD header"
                             f" ({fields['space origin']}), so its position in space is unknown")


# ------------------------------------------------------------------------------------------------
# Detached data (NRRD and MetaImage)
# ------------------------------------------------------------------------------------------------


def check_detached_data(path: Path, what: str) -> None:
    """For a NRRD or MetaImage header read by ITK: refuse a data file outside the header's folder
    and a declared size over the limit, before ITK opens anything (other files are left alone)."""
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        try:
            fields, _, _ = read_nrrd_header(path, what)
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
            check_declared_size(path, what, sizes, dtype.itemsize)
    elif name.endswith((".mhd", ".mha")):
        _check_metaimage_data_file(path, what)


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


# ------------------------------------------------------------------------------------------------
# Voxels
# ------------------------------------------------------------------------------------------------


def _parse_vector(text: str) -> np.ndarray:
    """A NRRD vector ``(x,y,z)``; ValueError when it is not one."""
    return np.array([float(v) for v in text.strip().strip("()").split(",")], dtype=float)


def _unreadable(path: Path, reason: str) -> InputError:
    """The one sentence :func:`read_nrrd` raises for a file it cannot read."""
    return InputError(f"cannot read segmentation file {path}: {reason}")


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Read a NRRD file with up to one non-spatial axis (messages name it a segmentation).

    Returns ``(array, ijk_to_ras, pairs)``; ``array`` is indexed ``[layer, k, j, i]`` (one layer
    for a 3-D file), ``ijk_to_ras`` is in mm, ``pairs`` holds the ``key:=value`` header lines.
    The header is checked in full (type, sizes, geometry, declared size) before any voxel is
    read, so a hostile file is refused before it costs memory or time."""
    try:
        fields, pairs, offset = read_nrrd_header(path)
    except OSError as error:
        raise _unreadable(path, f"{error.strerror or error}") from None
    dtype, sizes = _nrrd_voxel_layout(fields, path)
    _check_nrrd_geometry(fields, path, "segmentation")
    ijk_to_ras, spatial = _nrrd_ijk_to_ras(fields, path, len(sizes))
    check_grid(ijk_to_ras, path, "segmentation")
    count = math.prod(sizes)  # Python ints: np.prod would count in a 32-bit int on Windows with numpy 1.x
    nbytes = check_declared_size(path, "segmentation", sizes, dtype.itemsize)
    payload = _nrrd_payload(fields, path, offset, dtype, count, nbytes)
    # NRRD's first axis varies fastest, so numpy's axis order is the reverse of NRRD's
    array = np.frombuffer(payload, dtype=dtype, count=count).reshape(sizes[::-1])
    if len(sizes) == 4:
        layer_axis = next(axis for axis in range(4) if axis not in spatial)
        array = np.moveaxis(array, 3 - layer_axis, 0)
    else:
        array = array[None]
    return array, ijk_to_ras, pairs


def _nrrd_voxel_layout(fields: dict[str, str], path: Path) -> tuple[np.dtype, list[int]]:
    """The voxel type (with the header's byte order) and the ``sizes`` (NRRD axis order, fastest
    first, one per dimension, each at least 1) of a NRRD header."""
    try:
        dtype = _NRRD_DTYPE[fields["type"].lower()]
        dimension = int(fields["dimension"])
        sizes = [int(v) for v in fields["sizes"].split()]
    except (KeyError, ValueError):
        raise _unreadable(path, "the NRRD header lacks a valid type, dimension or sizes field") from None
    if len(sizes) != dimension or any(n < 1 for n in sizes):
        raise _unreadable(path, "the NRRD sizes do not match its dimension")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if fields.get("endian", "little").lower() == "big" else "<")
    return dtype, sizes


def _nrrd_ijk_to_ras(fields: dict[str, str], path: Path, dimension: int) -> tuple[np.ndarray, list[int]]:
    """The IJK→RAS matrix (mm) of a NRRD header whose ``space directions`` were checked, and its
    spatial axes (NRRD order): exactly three, plus at most one ``none`` axis (the layers). The
    header's ``space`` (LPS, RAS or LAS) is turned into RAS, the frame of the whole library."""
    space = fields.get("space", "left-posterior-superior").lower()
    if space not in _NRRD_SPACE_TO_RAS:
        raise _unreadable(path, f"NRRD space {fields.get('space')!r} is not supported (use left-posterior-superior)")
    try:
        tokens = re.findall(r"none|\([^)]*\)", fields["space directions"])  # present: checked before
        if len(tokens) != dimension:
            raise _unreadable(path, "the NRRD space directions do not match its dimension")
        spatial = [axis for axis, token in enumerate(tokens) if token != "none"]
        vectors = [_parse_vector(tokens[axis]) for axis in spatial]
        if len(spatial) != 3 or dimension - len(spatial) > 1 or any(v.size != 3 for v in vectors):
            raise _unreadable(path, "a segmentation must have three spatial axes and at most one layer axis")
        origin = _parse_vector(fields["space origin"]) if "space origin" in fields else np.zeros(3)
    except ValueError:
        raise _unreadable(path, "the NRRD space directions, spacings or space origin are not numbers") from None
    if origin.size != 3:
        raise _unreadable(path, "the NRRD space origin is not a point in 3-D space")
    to_ras = _NRRD_SPACE_TO_RAS[space]
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = to_ras @ np.stack(vectors, axis=1)
    ijk_to_ras[:3, 3] = to_ras @ origin
    return ijk_to_ras, spatial


def _nrrd_skips(fields: dict[str, str], path: Path, encoding: str) -> tuple[int, int]:
    """The header's ``line skip`` and ``byte skip`` (-1: the data are the file's last bytes, raw
    encoding only), checked."""
    try:
        line_skip = int(fields.get("line skip", fields.get("lineskip", 0)))
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", 0)))
    except ValueError:
        raise _unreadable(path, "the NRRD line skip or byte skip is not a whole number") from None
    if line_skip < 0 or byte_skip < -1:
        raise _unreadable(path, "the NRRD line skip or byte skip is negative")
    if byte_skip == -1 and encoding != "raw":
        raise _unreadable(path, "NRRD byte skip -1 is only valid with raw encoding")
    return line_skip, byte_skip


def _nrrd_payload(fields: dict[str, str], path: Path, offset: int, dtype: np.dtype, count: int,
                  nbytes: int) -> bytes:
    """The ``nbytes`` bytes of voxel data (``count`` voxels of ``dtype``), from the attached data at
    ``offset`` or the detached data file, decoded; no more than ``nbytes`` is read or inflated, so
    a small file that claims or inflates to a huge one costs neither memory nor time."""
    data_file = fields.get("data file", fields.get("datafile"))
    data_path = _checked_data_file(path, data_file, "segmentation", "NRRD") if data_file else None
    encoding = fields.get("encoding", "raw").lower()
    line_skip, byte_skip = _nrrd_skips(fields, path, encoding)
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
                payload = inflate(f, "bz2" if encoding.startswith("bz") else "gzip", byte_skip + nbytes)[byte_skip:]
            elif encoding in ("ascii", "text", "txt"):
                payload = _ascii_payload(f, path, dtype, count)
            else:
                raise _unreadable(path, f"NRRD encoding {encoding!r} is not supported")
    except (OSError, zlib.error, EOFError, ValueError) as error:
        raise _unreadable(path, f"the voxel data is corrupt or missing ({error})") from None
    if len(payload) < nbytes:
        raise _unreadable(path, f"the voxel data is truncated ({len(payload)} of {nbytes} bytes)")
    return payload


def _ascii_payload(f, path: Path, dtype: np.dtype, count: int) -> bytes:
    """ASCII voxel values read from ``f`` as the bytes of ``count`` voxels of ``dtype`` (empty when
    the count differs); text over :func:`~.files.max_volume_bytes` is refused unread."""
    text = f.read(max_volume_bytes() + 1)
    if len(text) > max_volume_bytes():
        raise _unreadable(path, f"its ASCII voxel data is larger than {gib(max_volume_bytes())} (set"
                                f" {MAX_VOLUME_BYTES_VARIABLE} to read it)")
    values = np.array(text.split(), dtype=float)
    return values.astype(dtype).tobytes() if values.size == count else b""
