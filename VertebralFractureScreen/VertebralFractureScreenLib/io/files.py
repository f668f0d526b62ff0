"""File rules shared by every image format: the declared-size limit, bounded reading, file-name
suffixes and atomic writes. No SimpleITK here.

* A declared volume (voxels x bytes per voxel, as the header states it) larger than
  :func:`max_volume_bytes` is refused: 2**31 bytes (2 GiB) by default, or the whole number of
  bytes in the environment variable ``VFSCREEN_MAX_VOLUME_BYTES``. The check runs before anything
  is allocated or inflated, and compressed data is never inflated beyond the declared size
  (:func:`inflate`, :func:`file_chunks`), so a small compressed file that declares a huge volume
  (a "decompression bomb") costs neither memory nor time.
* Writers are atomic (:func:`atomic_write`): they write a temporary file in the destination
  folder and move it into place with :func:`os.replace`, so a crash never leaves a half-written
  file under the final name.
"""

from __future__ import annotations

import bz2
import math
import os
import re
import secrets
import zlib
from pathlib import Path

from ..errors import InputError

MAX_VOLUME_BYTES_DEFAULT = 2**31
"""Largest volume read by default, in bytes as its header declares it (voxels x bytes per voxel):
2 GiB, e.g. 1000 slices of 512x512 in 32 bits. ``VFSCREEN_MAX_VOLUME_BYTES`` overrides it."""
MAX_VOLUME_BYTES_VARIABLE = "VFSCREEN_MAX_VOLUME_BYTES"
READ_CHUNK_BYTES = 4 * 2**20
"""Bytes read (and, for compressed files, inflated) at a time."""

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File name endings of the image formats read here (a Slicer ``.seg.nrrd`` is an image too)."""


# ------------------------------------------------------------------------------------------------
# Declared-size limit
# ------------------------------------------------------------------------------------------------


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


def gib(nbytes: int) -> str:
    """A number of bytes in GiB for messages (``2 GiB``)."""
    return f"{nbytes / 2**30:.3g} GiB"


def check_declared_size(path: Path, what: str, sizes, bytes_per_voxel: int) -> int:
    """The declared size in bytes of a volume of ``sizes`` voxels; raises when it is over
    :func:`max_volume_bytes` (before anything is allocated or inflated)."""
    nbytes = math.prod(int(n) for n in sizes) * int(bytes_per_voxel)
    limit = max_volume_bytes()
    if nbytes > limit:
        size = "x".join(str(int(n)) for n in sizes)
        raise InputError(
            f"{what} file {path} declares a {size} volume of {gib(nbytes)}, too large to read (the limit is"
            f" {gib(limit)}; set {MAX_VOLUME_BYTES_VARIABLE} to a larger number of bytes if the file is genuine)"
        )
    return nbytes


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def require_file(path, what: str) -> Path:
    """``path`` (``~`` expanded) when it is a regular file; raises naming ``what`` otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} path is a folder, not a file: {path}")
    if not path.is_file():
        raise InputError(f"{what} path {path} is not a regular file (a device, pipe or socket)")
    return path


def itk_reason(error: Exception) -> str:
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


def file_chunks(path: Path):
    """The bytes of a file, gunzipped when it ends in ``.gz``, in chunks of at most
    :data:`READ_CHUNK_BYTES`, inflated with zlib directly; never the whole file in memory at once."""
    with open(path, "rb") as handle:
        if not path.name.lower().endswith(".gz"):
            while chunk := handle.read(READ_CHUNK_BYTES):
                yield chunk
            return
        inflater = zlib.decompressobj(wbits=31)
        while compressed := handle.read(4 * 2**20):
            while compressed:
                chunk = inflater.decompress(compressed, READ_CHUNK_BYTES)
                if chunk:
                    yield chunk
                if inflater.eof:  # another gzip member may follow
                    compressed = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=31)
                else:
                    compressed = inflater.unconsumed_tail


def inflate(handle, kind: str, want: int) -> bytes:
    """Up to ``want`` bytes inflated from a gzip (or zlib; several gzip members are read in turn)
    or bzip2 (``kind`` ``"bz2"``) stream read from ``handle``: the stream is never inflated further
    than that, so a small file that inflates to a huge one costs neither memory nor time."""
    if kind == "bz2":
        make = bz2.BZ2Decompressor
    else:
        def make():
            return zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, detected
    out = bytearray()
    inflater = make()
    while len(out) < want:
        compressed = handle.read(READ_CHUNK_BYTES)
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


# ------------------------------------------------------------------------------------------------
# File names
# ------------------------------------------------------------------------------------------------


def split_image_suffix(name: str) -> tuple[str, str] | None:
    """``(stem, suffix)`` of an image file name (``"ct.nii.gz"`` → ``("ct", ".nii.gz")``; the
    suffix compared case-insensitively, ``.seg.nrrd`` kept whole); None for other names."""
    lower = name.lower()
    for suffix in (".seg.nrrd", *IMAGE_SUFFIXES):
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def file_extension(path: Path, allowed) -> str:
    """The one of the ``allowed`` extensions that ``path``'s name ends with (compared in lower
    case, first match wins); raises :class:`InputError` when it ends with none of them."""
    name = path.name.lower()
    for extension in allowed:
        if name.endswith(extension):
            return extension
    raise InputError(f"cannot write {path}: the file name must end with one of {', '.join(allowed)}")


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------


def atomic_write_text(path, text: str) -> None:
    """Write a text file (UTF-8) atomically with :func:`atomic_write`."""
    path = Path(path)
    atomic_write(path, path.suffix, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def atomic_write(path: Path, extension: str, write) -> None:
    """Call ``write(temporary_path)`` for a hidden file next to ``path`` (same extension, so
    SimpleITK still picks the format), flush it to disk, then move it over ``path``.

    ``write`` creates the file itself, so it gets the usual permissions (umask), not the 0600
    of :func:`tempfile.mkstemp`. An ``OSError`` or ``RuntimeError`` (SimpleITK's) of ``write``
    becomes an :class:`InputError` naming ``path``, and the temporary file is removed."""
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
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        else:
            reason = itk_reason(error).replace(temporary, str(path))
        raise InputError(f"cannot write {path}: {reason}") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
