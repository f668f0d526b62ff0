"""Contrast phase of an exam from the aorta's attenuation (SPEC §4).

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: the CT in HU, the TotalSegmentator
``total`` label map and the grid's 4x4 IJK→RAS matrix (mm).

**Contrast** (:func:`measure_contrast`). Mean HU of the aorta's central lumen (TotalSegmentator
id 52): voxels whose centre is at least :data:`AORTA_CORE_MM` plus one voxel spacing from the
mask's outline, so partial volume with the wall and the surrounding fat does not bias it;
``contrast_enhanced`` when above 150 HU. HU metrics (:mod:`.attenuation`, :mod:`.muscles`) are
reported as measured with the flag beside them.
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
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    result = ContrastResult(threshold_hu=threshold_hu)
    if label_boxes is not None:
        box = label_boxes[aorta_label - 1] if len(label_boxes) >= aorta_label else None
    else:  # one pass, no full-size temporary
        box = (find_label_boxes(labels, aorta_label)[aorta_label - 1]
               if np.issubdtype(labels.dtype, np.integer) else None)
    if box is None:
        result.warnings.append(f"no aorta (label {aorta_label}) in the segmentation: contrast phase unknown")
        return result
    lo = np.maximum(np.array([s.start for s in box]) - 1, 0)
    hi = np.minimum(np.array([s.stop for s in box]) + 1, labels.shape)
    spacing_kji = voxel_spacing(ijk_to_ras)[::-1].copy()
    # Thin slices: every m-th slice is enough for a mean (slices about 2 mm apart); the grid of
    # the kept slices is still orthogonal, so the distance map on it is Euclidean in mm.
    m = max(1, int(2.0 // spacing_kji[0]))
    slices = (slice(lo[0], hi[0], m), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    spacing_kji[0] *= m
    mask = labels[slices] == aorta_label
    distance = distance_transform_edt(mask, sampling=spacing_kji)  # scipy's, with less memory
    core = distance >= core_mm + float(spacing_kji.max())
    if core.sum() < _AORTA_MIN_CORE_VOXELS:
        core = distance >= 0.5 * float(distance.max())
        result.warnings.append("aorta too thin for its central lumen at this voxel size: mean over its central half")
    values = ct[slices][core].astype(np.float64)
    result.aorta_voxels = int(values.size)
    result.aorta_hu = float(values.mean())
    result.contrast_enhanced = bool(result.aorta_hu > threshold_hu)
    return result
