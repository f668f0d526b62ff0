"""The :class:`Volume` (a voxel array and its grid) and the rules every volume read meets, whatever
its format. No SimpleITK here.

A volume's array is indexed ``[k, j, i]`` (slice, row, column, exactly as SimpleITK's
``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` give it) and its 4x4 IJK→RAS matrix is in
millimetres (see :mod:`.geometry`); the library sees RAS only.

Refused with one sentence (:class:`~.errors.InputError`):

* a voxel size (the length of a voxel axis in the final geometry, any format) that is not a
  finite number between :data:`MIN_VOXEL_SIZE_MM` and :data:`MAX_VOXEL_SIZE_MM`;
* non-finite numbers in the grid, and a degenerate (flat) voxel grid;
* a label map with non-integer, negative or huge values (:func:`label_array`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import geometry
from ..errors import InputError

MIN_VOXEL_SIZE_MM = 1e-3
MAX_VOXEL_SIZE_MM = 1e3
"""Voxel sizes outside ``[MIN_VOXEL_SIZE_MM, MAX_VOXEL_SIZE_MM]`` are header errors, not scans."""
SLAB_VOXELS = 16_000_000
"""Voxels processed at once when scanning or resampling large volumes (bounds temporary memory)."""
_INT16_MIN, _INT16_MAX = -32768, 32767


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
# Voxel sizes and grids
# ------------------------------------------------------------------------------------------------


def number_list(values) -> str:
    """Numbers as ``1, 2.5, nan`` for messages."""
    return ", ".join(f"{float(v):g}" for v in values)


def plausible_voxel_sizes(sizes) -> bool:
    """Whether every voxel size (mm) is a finite number between :data:`MIN_VOXEL_SIZE_MM` and
    :data:`MAX_VOXEL_SIZE_MM`: the one rule for files (here) and volumes given in memory
    (``exam_inputs.check_ct``)."""
    return all(math.isfinite(v) and MIN_VOXEL_SIZE_MM <= v <= MAX_VOXEL_SIZE_MM for v in map(float, sizes))


def check_voxel_sizes(sizes, path: Path, what: str, source: str = "") -> None:
    """Refuse voxel sizes (mm) that are not finite numbers in the plausible range; ``source`` says
    where in the header they were found (``" in the NIfTI header's pixdim"``)."""
    sizes = [float(v) for v in sizes]
    if plausible_voxel_sizes(sizes):
        return
    raise InputError(
        f"{what} file {path} has an invalid voxel spacing ({number_list(sizes)} mm{source}); each voxel size must"
        f" be a number between {MIN_VOXEL_SIZE_MM:g} and {MAX_VOXEL_SIZE_MM:g} mm"
    )


def check_grid(ijk_to_ras: np.ndarray, path: Path, what: str) -> np.ndarray:
    """The IJK→RAS matrix (mm) as a float array, after refusing a voxel grid that no measurement
    can stand on: non-finite numbers, voxel sizes out of range, or axes that are (nearly) parallel."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    if not np.all(np.isfinite(matrix)):
        raise InputError(
            f"{what} file {path} has non-finite numbers (NaN or infinity) in its voxel grid or position"
            f" (origin {number_list(matrix[:3, 3])}), so its geometry is unknown"
        )
    sizes = np.linalg.norm(matrix[:3, :3], axis=0)
    check_voxel_sizes(sizes, path, what)
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-6 * float(np.prod(sizes)):
        raise InputError(f"{what} file {path} has a degenerate voxel grid (two of its axes are parallel),"
                         " so its geometry is unknown")
    return matrix


# ------------------------------------------------------------------------------------------------
# Voxel types
# ------------------------------------------------------------------------------------------------


def all_integral(array: np.ndarray) -> bool:
    """True when every value of a float array is finite and a whole number (scans in slabs of
    :data:`SLAB_VOXELS`)."""
    flat = array.reshape(-1)
    for start in range(0, flat.size, SLAB_VOXELS):
        chunk = flat[start : start + SLAB_VOXELS]
        if not np.all(np.isfinite(chunk)) or not np.array_equal(chunk, np.floor(chunk)):
            return False
    return True


def ct_array(view: np.ndarray, reuse: bool = False) -> np.ndarray:
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
    if all_integral(view):
        low, high = float(view.min()), float(view.max())
        if _INT16_MIN <= low and high <= _INT16_MAX:
            return np.array(view, dtype=np.int16)
    return np.array(view, dtype=np.float32)


def label_array(view: np.ndarray, path, what: str = "segmentation", reuse: bool = False) -> np.ndarray:
    """Label ids in the smallest suitable integer type (uint8, uint16, int32); with ``reuse``, an
    array already of that type is returned as it is instead of copied.

    Raises InputError for non-integer, negative or huge values: such a file is not a label map."""
    if view.dtype == bool:
        return np.array(view, dtype=np.uint8)
    if view.size == 0:
        return np.array(view, dtype=np.uint8)
    if not np.issubdtype(view.dtype, np.integer):
        if not np.issubdtype(view.dtype, np.floating) or not all_integral(view):
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
