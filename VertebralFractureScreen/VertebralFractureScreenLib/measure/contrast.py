"""Contrast phase of an exam from the aorta's attenuation (SPEC §4).

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: the CT in HU, the TotalSegmentator
``total`` label map and the grid's 4x4 IJK→RAS matrix (mm).

**Contrast** (:func:`measure_contrast`). Mean HU of the aorta's central lumen (TotalSegmentator
id 52): voxels whose centre is at least :data:`AORTA_CORE_MM` plus one voxel spacing from the
mask's outline, so partial volume with the wall and the surrounding fat does not bias it;
``contrast_enhanced`` when above 150 HU. HU metrics (:mod:`.attenuation`, :mod:`.muscles`) are
reported as measured with the flag beside them.

The contrast phase (arterial, portal venous, ...) is :mod:`.phase`'s, which crops its labels as
here (:func:`label_box`, :func:`thinned_crop`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .. import levels as lv
from ..geometry import distance_transform_edt, find_label_boxes, voxel_spacing

AORTA_CORE_MM = 2.0
"""The aorta's central region keeps voxels at least this far (plus one voxel spacing) inside."""

CONTRAST_THRESHOLD_HU = 150.0
"""Aorta mean HU above which the exam is ``contrast_enhanced`` (SPEC §4)."""

_AORTA_MIN_CORE_VOXELS = 10


@dataclass
class ContrastResult:
    """Contrast phase of one exam: ``aorta_hu`` mean HU of the aorta's central lumen (None without
    an aorta label), ``aorta_voxels`` voxels averaged, ``contrast_enhanced`` ``aorta_hu > 150``
    (None when unknown), ``warnings``."""

    aorta_hu: float | None = None
    aorta_voxels: int = 0
    contrast_enhanced: bool | None = None
    threshold_hu: float = CONTRAST_THRESHOLD_HU
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_contrast(
    ct: np.ndarray,
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    *,
    aorta_label: int = lv.TOTAL_AORTA,
    threshold_hu: float = CONTRAST_THRESHOLD_HU,
    core_mm: float = AORTA_CORE_MM,
    label_boxes: list | None = None,
) -> ContrastResult:
    """Contrast phase from the aorta (TotalSegmentator ``total`` id 52 by default).

    The mean HU is taken over the aorta's central lumen: voxels whose centre lies at least
    ``core_mm`` plus the largest voxel spacing inside the mask (Euclidean distance in mm to the
    nearest voxel outside it, on the grid's own orthogonal axes). Slices of 1 mm or thinner are
    thinned to about 2 mm apart first (the mean needs no more; speed). A thin aorta without such a core
    falls back to its central half (distance at least half the largest distance), with a warning.
    The image border is not treated as the aorta's wall (an aorta cut by the field of view keeps
    its end slices). Without an aorta label the result is None with a warning. ``label_boxes``:
    ``ndimage.find_objects(labels)`` when the caller has it already."""
    result = ContrastResult(threshold_hu=threshold_hu)
    if label_boxes is None and np.issubdtype(labels.dtype, np.integer):  # one pass, no full-size temporary
        label_boxes = find_label_boxes(labels, aorta_label)
    box = label_box(label_boxes, aorta_label)
    if box is None:
        result.warnings.append(f"no aorta (label {aorta_label}) in the segmentation: contrast phase unknown")
        return result
    values, central_half = lumen_core_values(ct, labels, ijk_to_ras, aorta_label, box, core_mm=core_mm)
    if central_half:
        result.warnings.append("aorta too thin for its central lumen at this voxel size: mean over its central half")
    result.aorta_voxels = int(values.size)
    result.aorta_hu = float(values.mean())
    result.contrast_enhanced = bool(result.aorta_hu > threshold_hu)
    return result


def label_box(label_boxes: list | None, label: int) -> tuple[slice, ...] | None:
    """The box of ``label`` in ``label_boxes`` (``ndimage.find_objects`` of the map), None when the
    label is absent or there are no boxes."""
    if not label_boxes or len(label_boxes) < label:
        return None
    return label_boxes[label - 1]


def thinned_crop(box: tuple[slice, ...], shape, ijk_to_ras: np.ndarray, *,
                 in_plane: bool = False) -> tuple[tuple[slice, ...], np.ndarray]:
    """The slices ``[k, j, i]`` of ``box`` grown by one voxel (within the grid ``shape``), with only
    every m-th slice of slices 1 mm or thinner (about 2 mm apart: a median or a mean needs no more;
    with ``in_plane`` the rows and columns too), and the voxel size in mm along ``(k, j, i)`` of
    that crop (each thinned axis's spacing m times the grid's). The grid of the kept voxels is still
    orthogonal, so a distance map on it is Euclidean in mm."""
    lo = np.maximum(np.array([s.start for s in box], dtype=np.intp) - 1, 0)
    hi = np.minimum(np.array([s.stop for s in box], dtype=np.intp) + 1, np.asarray(shape, dtype=np.intp))
    spacing_kji = voxel_spacing(np.asarray(ijk_to_ras, dtype=float))[::-1].copy()
    steps = [max(1, int(2.0 // spacing_kji[axis])) if axis == 0 or in_plane else 1 for axis in range(3)]
    spacing_kji *= steps
    return tuple(slice(lo[axis], hi[axis], steps[axis]) for axis in range(3)), spacing_kji


def lumen_core_values(ct: np.ndarray, labels: np.ndarray, ijk_to_ras: np.ndarray, label: int,
                      box: tuple[slice, ...], *, core_mm: float = AORTA_CORE_MM) -> tuple[np.ndarray, bool]:
    """HU (float64) of a vessel's central lumen: the voxels of ``label`` (within its ``box``, on the
    :func:`thinned_crop`) whose centre lies at least ``core_mm`` plus the crop's largest voxel size
    inside the mask (Euclidean distance in mm to the nearest voxel outside it), so partial volume
    with the wall and the fat around it leaves them alone. A vessel too thin for such a core (fewer
    than 10 voxels) gives its central half instead (distance at least half the largest): the
    second value is then True. The image border is not the vessel's wall: a vessel cut by the
    field of view keeps its end slices."""
    slices, spacing_kji = thinned_crop(box, labels.shape, ijk_to_ras)
    mask = labels[slices] == label
    distance = distance_transform_edt(mask, sampling=spacing_kji)  # scipy's, with less memory
    core = distance >= core_mm + float(spacing_kji.max())
    central_half = int(core.sum()) < _AORTA_MIN_CORE_VOXELS
    if central_half:
        core = distance >= 0.5 * float(distance.max())
    return ct[slices][core].astype(np.float64), central_half
