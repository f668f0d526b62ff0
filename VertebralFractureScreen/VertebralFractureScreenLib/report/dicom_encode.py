"""DICOM Part 10 files written fast: pydicom writes the header, this module the bulk.

A SEG of 2000 frames has 2000 per-frame functional group items, a TID 1500 SR of a whole spine
about 4500 content datasets: pydicom's writer takes seconds for either (about 40 µs an element),
more than the 3 s the issue sets for all the objects. The bulk is simple (ASCII text, a few
numeric types, nested sequences), so it is encoded here in Explicit VR Little Endian, with defined
lengths, as PS3.5 §7.1.2 (data elements), §7.5 (sequences and items) define it, and appended after
the header that pydicom writes (file meta information, patient and study attributes in the CT's
character set). The files are read back by dciodvfy, dcmqi, highdicom and pydicom in the tests.

pydicom is imported here only (optional).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .dicom_series import dicom_packages

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_LONG_VRS = frozenset({"OB", "OW", "SQ", "UN", "UT", "UC", "UR", "OF", "OD", "OL", "OV", "SV", "UV"})
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_ITEM = b"\xfe\xff\x00\xe0"


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element with a defined length; odd values padded (NUL for UI and OB, else space)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in _LONG_VRS:
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def sequence(tag: int, items) -> bytes:
    """A sequence of defined length whose items are the given encoded datasets."""
    return element(tag, "SQ", b"".join(_ITEM + struct.pack("<I", len(item)) + item for item in items))


def _text(value) -> str:
    return getattr(value, "original_string", None) or str(value)


def _value(vr: str, value) -> bytes:
    """The bytes of a non-sequence value; text must be ASCII (UnicodeEncodeError otherwise)."""
    if value is None or value == "":
        return b""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    if vr in _BINARY:
        return struct.pack(f"<{len(values)}{_BINARY[vr]}", *values)
    if vr == "AT":
        return b"".join(struct.pack("<HH", int(tag) >> 16, int(tag) & 0xFFFF) for tag in values)
    if vr in ("OB", "OW", "UN"):
        return bytes(value)
    return "\\".join(_text(v) for v in values).encode("ascii")


def encode_dataset(ds) -> bytes:
    """A pydicom dataset's elements, in tag order, in Explicit VR Little Endian (ASCII text only:
    UnicodeEncodeError otherwise)."""
    parts = []
    for elem in ds:
        if elem.VR == "SQ":
            parts.append(sequence(elem.tag, [encode_dataset(item) for item in elem.value]))
        else:
            parts.append(element(elem.tag, elem.VR, _value(elem.VR, elem.value)))
    return b"".join(parts)


def write_part10(path, ds, *, fast_from: int | None = None, tail: bytes = b"") -> None:
    """Write ``ds`` to ``path`` as a Part 10 file in Explicit VR Little Endian: pydicom writes the
    file meta information and the elements below tag ``fast_from`` (all of them without it), this
    module the elements from ``fast_from`` on (pydicom does, when they hold non-ASCII text), then
    ``tail``: already encoded elements whose tags follow every element of ``ds``."""
    pydicom, _ = dicom_packages()
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    head, bulk = ds, b""
    if fast_from is not None:
        head, late = pydicom.Dataset(), pydicom.Dataset()
        for elem in ds:
            (late if elem.tag >= fast_from else head).add(elem)
        try:
            bulk = encode_dataset(late)
        except UnicodeEncodeError:
            head, bulk = ds, b""
    ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    with open(path, "wb") as raw:
        raw.write(b"\0" * 128 + b"DICM")
        fp = DicomFileLike(raw)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        write_dataset(fp, head)
        raw.write(bulk)
        raw.write(tail)
