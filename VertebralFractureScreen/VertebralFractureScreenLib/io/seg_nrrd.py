"""3D Slicer segmentation files (``.seg.nrrd``): recognised, read into one label map, written.

Reading maps each segment to a label id of a convention by :func:`~.labels.segment_structure`
(segment ID, then terminology, never the display name alone). Segments that cannot be mapped are
dropped, and where segments of different layers overlap the higher layer wins: both are reported
with :class:`~.labels.LabelMapWarning` through the standard :mod:`warnings` module. Writing is
atomic (:func:`~.files.atomic_write`). Geometry is IJK→RAS in mm; the file stores LPS, as Slicer
does. No SimpleITK here.
"""

from __future__ import annotations

import gzip
import re
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import geometry
from ..errors import InputError
from .files import atomic_write, file_extension
from .labels import LabelMapWarning, segment_color, segment_structure, terminology_for
from .nrrd import read_nrrd, read_nrrd_header
from .volume import Volume, all_integral, label_array


def is_segmentation_nrrd(path: Path) -> bool:
    """True for a ``.seg.nrrd``/``.seg.nhdr`` name, or a ``.nrrd``/``.nhdr`` file whose header holds
    ``Segment0_ID``."""
    name = path.name.lower()
    if name.endswith((".seg.nrrd", ".seg.nhdr")):
        return True
    if name.endswith((".nrrd", ".nhdr")):
        try:
            return "Segment0_ID" in read_nrrd_header(path)[1]
        except (InputError, OSError):
            return False
    return False


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


def read_segmentation_nrrd(path: Path, known: dict[str, int], convention: str) -> Volume:
    """Read a Slicer ``.seg.nrrd`` into one label volume in the ids of ``convention`` (``known``
    is :func:`~.labels.convention_ids` of it); a NRRD without segment descriptions is read as a
    plain label map."""
    layers, ijk_to_ras, pairs = read_nrrd(path)
    if not (np.issubdtype(layers.dtype, np.integer) or all_integral(layers)):
        raise InputError(f"segmentation {path} has non-integer voxel values; a label map must hold label ids")
    indices = _segment_indices(pairs)
    if not indices:  # a plain NRRD label map that happens to be named .seg.nrrd
        if layers.shape[0] != 1:
            raise InputError(f"segmentation {path} has {layers.shape[0]} layers but no segment descriptions")
        return Volume(label_array(layers[0], path), ijk_to_ras)

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
    as a segmentation and :func:`.images.read_labelmap` maps it back by segment ID.
    """
    path = Path(path).expanduser()
    extension = file_extension(path, (".seg.nrrd", ".nrrd"))
    labels = sorted(int(v) for v in segment_names)
    data = _listed_labels(labelmap, labels)
    lines = _geometry_lines(labelmap, data.dtype)
    boxes = ndimage.find_objects(data) if data.any() else []
    for index, value in enumerate(labels):
        box = boxes[value - 1] if value <= len(boxes) else None
        lines += _segment_lines(index, value, segment_names[value], box)
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


def _listed_labels(labelmap: Volume, labels: list[int]) -> np.ndarray:
    """The label map with every label not in ``labels`` (sorted, positive, below 65536) set to 0,
    as uint8, or little-endian uint16 when a label needs it: the smallest type Slicer reads back."""
    if any(v <= 0 for v in labels):
        raise ValueError("segment label values must be positive")
    source = labelmap.array
    if source.dtype.kind not in "iub":
        raise ValueError("write_segmentation_nrrd needs an integer label map")
    dtype = np.dtype("u1") if not labels or labels[-1] < 256 else np.dtype("<u2")
    if labels and labels[-1] >= 65536:
        raise ValueError("segment label values must be below 65536")
    keep = np.isin(source, labels)
    return np.where(keep, source, 0).astype(dtype)


def _nrrd_vector(values) -> str:
    """A NRRD vector ``(x,y,z)`` with every float written exactly (``repr``)."""
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def _geometry_lines(labelmap: Volume, dtype: np.dtype) -> list[str]:
    """The NRRD header's fields up to the segment keys: type, sizes (i, j, k) and the grid in LPS,
    the space Slicer writes its segmentations in (the library's IJK→RAS is converted)."""
    ijk_to_lps = geometry.LPS_TO_RAS @ labelmap.ijk_to_ras
    nk, nj, ni = labelmap.shape
    return [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {'unsigned char' if dtype.itemsize == 1 else 'unsigned short'}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {ni} {nj} {nk}",
        "space directions: " + " ".join(_nrrd_vector(ijk_to_lps[:3, axis]) for axis in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: gzip",
        f"space origin: {_nrrd_vector(ijk_to_lps[:3, 3])}",
    ]


def _segment_lines(index: int, value: int, segment_name, box) -> list[str]:
    """The ``Segment<index>_*`` header keys of label ``value``: its ID and name (one line), colour,
    terminology tag, and extent (i, j, k voxel bounds from the ``ndimage.find_objects`` ``box``;
    the empty extent ``0 -1 0 -1 0 -1`` when the label has no voxel)."""
    name = " ".join(str(segment_name).split())  # no line breaks in a header value
    if box is not None:
        k, j, i = box
        extent = f"{i.start} {i.stop - 1} {j.start} {j.stop - 1} {k.start} {k.stop - 1}"
    else:
        extent = "0 -1 0 -1 0 -1"
    terminology = terminology_for(name)
    tags = "Segmentation.Status:inprogress|" + (f"TerminologyEntry:{terminology}|" if terminology else "")
    color = " ".join(f"{c:.6g}" for c in segment_color(value))
    return [
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
