"""Paraspinal muscles per vertebral level: volume, attenuation and intramuscular fat (SPEC §4).

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: the CT in HU, the TotalSegmentator
``total`` label map (autochthon 86/87, iliopsoas 88/89), the grid's 4x4 IJK→RAS matrix (mm), and
the morphometry of the vertebrae (:func:`.morphometry.measure_heights`), whose disc mid-planes
bound each level's slab (:mod:`.level_slabs`: definition, flags of extrapolated planes).

**Metrics** (:func:`measure_muscles`) per muscle and slab, on the voxels of the muscle's label.
A voxel cut by a slab plane counts with the share of its volume on each side
(:func:`.level_slabs.slab_shares`), so a plane parallel to thick slices does not move whole slices
from one level to the next. SPEC §4:

* ``volume_ml``: voxel volume times the voxels (shares) in the slab;
* ``mean_hu``: mean HU of the voxels within −29…150 HU;
* ``imat_fraction``: share of the voxels within −190…−30 HU.

Both HU metrics are biased by partial volume: a voxel that is part fat and part muscle is counted
as muscle with a lowered HU (down to −29) or as fat, and the mask's edge voxels mix with whatever
surrounds the muscle. Two companions estimate the tissue values themselves:

* ``lean_hu``: mean HU of the voxels within −29…150 HU whose six face neighbours are also voxels
  of the muscle within −29…150 HU. Voxels touching fat or the muscle's edge are left out, so
  partly-fat voxels drop out while voxels of lean muscle with diffuse (sub-voxel) fat infiltration
  stay and still lower it;
* ``fat_fraction``: linear unmixing, ``(lean_hu - mean) / (lean_hu - fat_hu)``. ``fat_hu`` is
  the mean of the exam's pure fat voxels inside the muscles (fat-range voxels whose face
  neighbours are too), or :data:`DEFAULT_FAT_HU` when there are too few. ``mean`` is the mean HU
  (what partial volume preserves) of the muscle's interior voxels (six face neighbours in the
  muscle) within −190…150 HU and of its edge voxels, each edge voxel standing in with the mean HU
  of those of its face neighbours along the axes whose spacing is at most
  :data:`RIM_NEIGHBOUR_MAX_MM` (left out when it has none). An edge voxel's own HU mixes with
  whatever surrounds the muscle (fat, bone, or the phantom's 0 HU tissue), but fat pockets a few
  mm across reach into it from the neighbour beside it; leaving the edge out altogether would
  weight a thin row by its interior only and miss the fat near its surface. Neighbours along
  coarser axes lie deeper than that fat and do not stand in.

What partial volume leaves of the SPEC metrics, and what standing in changed, is in
``docs/validation.md`` ("Bone attenuation, contrast and muscles on phantoms").

**Field of view.** A level is ``complete = False`` with a flag when a slab plane had to be
extrapolated (``no_vertebra_above`` / ``no_vertebra_below``, ``vertebra_above_incomplete`` /
``vertebra_below_incomplete``), when its vertebra is incomplete (``vertebra_incomplete``), or
when the slab runs out of the image where the muscle is (``cut_by_field_of_view``: a muscle voxel
of the slab lies on the image's border, or on the border of the segmentation's own grid when that
is smaller, and the voxel beyond it would still be in the slab). The lumbar total is flagged when any
of its levels is incomplete or missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import levels as lv
from ..geometry import voxel_spacing, voxel_volume_ml
from .level_slabs import (  # noqa: F401  SlabPlane, lumbar_length_mm, slab_length_mm: re-exported
    LevelSlab, SlabPlane, grid_indices, level_slabs, lumbar_length_mm, runs_out_of_grid, slab_length_mm, slab_shares)

MUSCLE_LABELS: dict[str, int] = {
    "autochthon_left": lv.TOTAL_AUTOCHTHON_LEFT,
    "autochthon_right": lv.TOTAL_AUTOCHTHON_RIGHT,
    "iliopsoas_left": lv.TOTAL_ILIOPSOAS_LEFT,
    "iliopsoas_right": lv.TOTAL_ILIOPSOAS_RIGHT,
}
"""TotalSegmentator class name → ``total`` id of the muscles measured."""

LEAN_RANGE_HU = (-29.0, 150.0)
"""HU range of muscle tissue for ``mean_hu`` (inclusive)."""

FAT_RANGE_HU = (-190.0, -30.0)
"""HU range of intramuscular fat for ``imat_fraction`` (inclusive)."""

LUMBAR = "lumbar"

MIN_GUARDED_VOXELS = 10
"""Fewer partial-volume-guarded lean voxels than this: ``lean_hu`` falls back to ``mean_hu``
(flag ``lean_hu_unguarded``)."""

DEFAULT_FAT_HU = -100.0
"""HU of pure fat used for ``fat_fraction`` when the exam's muscles hold fewer than
:data:`MIN_PURE_FAT_VOXELS` pure fat voxels (typical adipose tissue at 120 kV: −120 to −80 HU)."""

MIN_PURE_FAT_VOXELS = 50

RIM_NEIGHBOUR_MAX_MM = 2.0
"""Largest spacing (mm) along which an interior voxel stands in for a neighbouring voxel on the
muscle's edge in ``fat_fraction``'s unmixing (see the module docstring)."""


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


@dataclass
class MuscleMeasurement:
    """One muscle in one level slab (``level`` a vertebra name, or ``"lumbar"`` for the L1–L5
    total). Voxels cut by a slab plane count with the share of their volume inside the slab.

    SPEC §4 metrics: ``volume_ml`` volume of the muscle's label in the slab; ``mean_hu`` mean HU
    of its voxels within −29…150 HU (NaN when none); ``imat_fraction`` share of its voxels within
    −190…−30 HU.

    Partial-volume-robust companions (see the module docstring): ``lean_hu`` mean HU of the
    voxels within −29…150 HU whose six face neighbours are muscle voxels within that range too;
    ``fat_fraction`` fat volume fraction by linear unmixing of the voxels' mean HU between
    ``lean_hu`` and the exam's fat HU ``fat_reference_hu`` (edge voxels standing in with their
    interior neighbours' HU).

    ``mean_hu_se`` and ``lean_hu_se``: standard errors (HU) of ``mean_hu`` and ``lean_hu``, the SD of
    the voxels they average over the square root of their number (NaN below two voxels). They say
    how much the noise moves the mean: a lower bound where the reconstruction correlates
    neighbouring voxels' noise, and blind to partial volume's bias (sub-voxel fat lowers
    ``lean_hu`` by a few HU at 3 mm voxels whatever the noise).

    ``voxels``: voxel count (shares summed); ``complete`` False when the slab is only partly
    measured, ``flags`` say why; a muscle whose label is nowhere in the segmentation is
    ``not_segmented`` with a NaN volume (unknown, not 0 ml)."""

    muscle: str
    level: str
    volume_ml: float
    mean_hu: float
    imat_fraction: float
    lean_hu: float = float("nan")
    fat_fraction: float = float("nan")
    mean_hu_se: float = float("nan")
    lean_hu_se: float = float("nan")
    voxels: float = 0.0
    fat_reference_hu: float = float("nan")
    complete: bool = True
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_CHUNK_VOXELS = 8_000_000
"""Voxels scanned at once when looking for the muscles (bounds the temporary memory)."""
_CLASS_CHUNK_VOXELS = 500_000
"""Voxels of a muscle's box classified at once (:func:`voxel_classes`; bounds the temporary
memory)."""


def _muscle_voxels(labels: np.ndarray, ids: np.ndarray, k_range: tuple[int, int] | None = None):
    """Flat indices (sorted) and label ids of the voxels of any of ``ids``: one pass over the
    volume for the ids at least their minimum, then a filter on those."""
    lowest = int(ids.min())
    plane = labels.shape[1] * labels.shape[2]
    chunk = max(1, _CHUNK_VOXELS // plane)  # slabs of slices: no whole-volume temporary
    flats, kept = [], []
    k_first, k_stop = k_range if k_range is not None else (0, labels.shape[0])
    for k0 in range(k_first, k_stop, chunk):
        part = labels[k0:min(k0 + chunk, k_stop)].reshape(-1)
        flat = np.flatnonzero(part >= lowest) if lowest > 0 else np.arange(part.size)
        values = part[flat]
        keep = np.isin(values, ids)
        flats.append((flat[keep] + k0 * plane).astype(np.int32 if labels.size < 2**31 else np.int64))
        kept.append(values[keep])
    if not flats:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=labels.dtype)
    return np.concatenate(flats), np.concatenate(kept)


def _face_interior(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` whose six face neighbours are in ``mask`` too (the array's border counts
    as outside)."""
    out = mask.copy()
    for axis in range(3):
        n = mask.shape[axis]
        if n < 3:
            return np.zeros_like(mask)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        out[tuple(hi)] &= mask[tuple(lo)]
        out[tuple(lo)] &= mask[tuple(hi)]
        edge = [slice(None)] * 3
        edge[axis] = 0
        out[tuple(edge)] = False
        edge[axis] = n - 1
        out[tuple(edge)] = False
    return out


def _hu_classes(hu: np.ndarray) -> np.ndarray:
    """0 for other HU, 1 within :data:`LEAN_RANGE_HU`, 2 within :data:`FAT_RANGE_HU` (uint8); one
    table lookup for whole-number CTs."""
    if hu.dtype == np.int16:
        values = np.arange(65536, dtype=np.uint16).view(np.int16)
        table = _hu_classes(values.astype(np.float32))
        return table[hu.view(np.uint16)]
    out = np.zeros(hu.shape, dtype=np.uint8)
    out[(hu >= LEAN_RANGE_HU[0]) & (hu <= LEAN_RANGE_HU[1])] = 1
    out[(hu >= FAT_RANGE_HU[0]) & (hu <= FAT_RANGE_HU[1])] = 2
    return out


def voxel_classes(ct: np.ndarray, labels: np.ndarray, kji: tuple[np.ndarray, np.ndarray, np.ndarray],
                   values: np.ndarray, ids: np.ndarray, spacing_kji: Sequence[float]):
    """Per muscle voxel (indices ``kji``, sorted by ``k``, label ``values``): lean voxels guarded
    against partial volume (:func:`_face_interior` of its muscle's lean voxels), pure fat voxels
    (fat-range voxels whose face neighbours are fat-range voxels of the muscle), and the HU each
    voxel contributes to ``fat_fraction``'s unmixing (float32, NaN where it contributes none): an
    interior voxel (face neighbours in the muscle) within −190…150 HU its own, an edge voxel the
    mean of such interior face neighbours along the axes whose spacing ``spacing_kji`` (mm, k, j, i)
    is at most :data:`RIM_NEIGHBOUR_MAX_MM`. The image border is not the muscle's edge, but
    nothing is known beyond it: voxels there are neither guarded lean nor pure fat.

    Each muscle is processed a few slices at a time (:data:`_CLASS_CHUNK_VOXELS` voxels of its box
    at most), each part on the crop of its voxels' box grown by one voxel in-plane and two slices
    along ``k``: two slices reach every neighbour of a part's voxels and every neighbour's
    neighbours, so the classes are those of the muscle's whole box. Offsets and flat indices in
    the crops are ``np.intp`` whatever the type of ``kji`` (int16 in :func:`measure_muscles`: an
    int16 index times a stride overflows)."""
    k, j, i = kji
    guard = np.zeros(len(values), dtype=bool)
    pure_fat = np.zeros(len(values), dtype=bool)
    unmix_hu = np.full(len(values), np.nan, dtype=np.float32)
    fill_axes = [axis for axis in range(3) if spacing_kji[axis] <= RIM_NEIGHBOUR_MAX_MM]
    for label in ids:
        where = np.flatnonzero(values == label)
        if not len(where):
            continue
        slices = k[where]
        plane = (int(j[where].max()) - int(j[where].min()) + 3) * (int(i[where].max()) - int(i[where].min()) + 3)
        step = max(1, _CLASS_CHUNK_VOXELS // plane)
        starts = np.arange(int(slices[0]), int(slices[-1]) + 1, step)
        bounds = np.searchsorted(slices, starts.astype(slices.dtype), side="left").tolist() + [len(where)]
        for first, last in zip(bounds[:-1], bounds[1:]):
            if first < last:
                part = where[first:last]
                guard[part], pure_fat[part], unmix_hu[part] = _part_classes(ct, labels, [a[part] for a in kji],
                                                                            label, fill_axes)
    return guard, unmix_hu, pure_fat


def _part_classes(ct: np.ndarray, labels: np.ndarray, kji: list[np.ndarray], label: int, fill_axes: list[int]):
    """:func:`voxel_classes` of some voxels of one muscle (sorted by ``k``): guarded lean, pure fat
    and the unmixing HU, from the crop around them."""
    kk, jj, ii = kji
    lo = np.maximum(np.array([int(kk[0]) - 2, int(jj.min()) - 1, int(ii.min()) - 1]), 0)
    hi = np.minimum(np.array([int(kk[-1]) + 3, int(jj.max()) + 2, int(ii.max()) + 2]), labels.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask = labels[crop] == label
    hu = ct[crop].reshape(-1)
    classes = _hu_classes(hu).reshape(mask.shape)
    strides = np.array([mask.shape[1] * mask.shape[2], mask.shape[2], 1], dtype=np.intp)
    local = [axis.astype(np.intp) - start for axis, start in zip(kji, lo)]
    at = local[0] * strides[0] + local[1] * strides[1] + local[2]  # flat indices in the crop
    guard = _face_interior(mask & (classes == 1)).reshape(-1)[at]
    pure_fat = _face_interior(mask & (classes == 2)).reshape(-1)[at]
    interior = _face_interior(mask).reshape(-1)
    unmixable = interior & (classes.reshape(-1) > 0)  # within -190..150 HU
    contribution = np.where(unmixable[at], hu[at].astype(np.float32), np.float32(np.nan))
    edge = np.flatnonzero(~interior[at]) if fill_axes else ()
    if len(edge):
        # Mean HU of the edge voxels' unmixable face neighbours along the close axes. A
        # neighbour beyond the crop points back at the edge voxel, which is not unmixable.
        counts = np.zeros(len(edge), dtype=np.float32)
        sums = np.zeros(len(edge), dtype=np.float32)
        for axis in fill_axes:
            position = local[axis][edge]
            for step in (-1, 1):
                inside = (position + step >= 0) & (position + step < mask.shape[axis])
                beside = np.where(inside, at[edge] + step * strides[axis], at[edge])
                take = unmixable[beside]
                counts += take
                sums += np.where(take, hu[beside], 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            contribution[edge] = np.where(counts > 0, sums / counts, np.float32(np.nan))
    return guard, pure_fat, contribution


_SUMS = ("count", "lean_count", "lean_sum", "lean_squares", "lean_weights_sq", "fat_count", "guard_count",
         "guard_sum", "guard_squares", "guard_weights_sq", "unmix_count", "unmix_sum", "border")


def standard_error(weights: float, total: float, squares: float, weights_sq: float) -> float:
    """Standard error (HU) of a weighted mean ``total / weights`` from the weighted sums of the
    values (``total``), of their squares (``squares``) and of the squared weights
    (``weights_sq``): the weighted SD over the square root of the effective number of voxels
    ``weights² / weights_sq`` (the voxels cut by a slab plane count with their share). NaN below
    two effective voxels."""
    if not weights > 0 or not weights_sq > 0:
        return float("nan")
    n_effective = weights * weights / weights_sq
    if n_effective < 2.0:
        return float("nan")
    mean = total / weights
    variance = max(squares / weights - mean * mean, 0.0) * n_effective / (n_effective - 1.0)
    return float(np.sqrt(variance / n_effective))


def _row(name: str, level: str, sums: dict, cells, voxel_ml: float, fat_hu: float, flags: list[str]):
    """A :class:`MuscleMeasurement` from the summed statistics of one or more (slab, muscle) cells
    (the volume unknown, NaN, for a muscle ``not_segmented``)."""
    total = {key: float(np.sum(sums[key][cells])) for key in _SUMS}
    count = total["count"]
    mean_hu = total["lean_sum"] / total["lean_count"] if total["lean_count"] > 0 else float("nan")
    mean_hu_se = standard_error(total["lean_count"], total["lean_sum"], total["lean_squares"],
                                 total["lean_weights_sq"])
    if total["guard_count"] >= MIN_GUARDED_VOXELS:
        lean_hu = total["guard_sum"] / total["guard_count"]
        lean_hu_se = standard_error(total["guard_count"], total["guard_sum"], total["guard_squares"],
                                     total["guard_weights_sq"])
    else:
        lean_hu, lean_hu_se = mean_hu, mean_hu_se
        if count > 0:
            flags = flags + ["lean_hu_unguarded"]
    unmix_mean = total["unmix_sum"] / total["unmix_count"] if total["unmix_count"] > 0 else float("nan")
    if np.isfinite(lean_hu) and np.isfinite(unmix_mean) and lean_hu - fat_hu > 1.0:
        fat_fraction = float(np.clip((lean_hu - unmix_mean) / (lean_hu - fat_hu), 0.0, 1.0))
    else:
        fat_fraction = float("nan")
    return MuscleMeasurement(
        muscle=name, level=level, volume_ml=float("nan") if "not_segmented" in flags else count * voxel_ml,
        mean_hu=float(mean_hu), imat_fraction=total["fat_count"] / count if count > 0 else float("nan"), lean_hu=float(lean_hu),
        fat_fraction=fat_fraction, mean_hu_se=mean_hu_se, lean_hu_se=lean_hu_se, voxels=count,
        fat_reference_hu=float(fat_hu), complete=not flags, flags=flags)


def measure_muscles(
    ct: np.ndarray,
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    heights: Sequence,
    *,
    levels: Sequence[str] | None = None,
    muscles: dict[str, int] | None = None,
    lumbar_total: bool = True,
    fat_hu: float | None = None,
    label_boxes: list | None = None,
    slabs: Sequence[LevelSlab] | None = None,
    label_grid: tuple | None = None,
) -> list[MuscleMeasurement]:
    """Volume, attenuation and fat of each muscle in each level's slab (see the module docstring).

    ``ct``: HU ``[k, j, i]``; ``labels``: TotalSegmentator ``total`` map on the same grid;
    ``ijk_to_ras``: the grid (mm); ``heights``: :func:`.morphometry.measure_heights` result of the
    same exam; ``levels``: levels to report (default: every vertebra but S1); ``muscles``: class
    name → label id (default :data:`MUSCLE_LABELS`); ``fat_hu``: HU of pure fat for
    ``fat_fraction`` (default: measured in the exam's muscles, see :data:`DEFAULT_FAT_HU`).
    Returns rows level by level, cranial to caudal, muscles in the order of ``muscles``, then the
    lumbar totals (when ``lumbar_total`` and any L1–L5 slab exists). A muscle absent from a slab
    gives a row with zero volume and NaN HU; one absent from the whole label map, rows with a NaN
    volume, ``complete = False`` and the flag ``not_segmented``. ``label_boxes``: ``ndimage.find_objects(labels)``
    when the caller has it (then only the muscles' slices are scanned). ``slabs``: the level slabs
    to use instead of :func:`level_slabs` ``(heights, levels)`` (e.g. planes known otherwise).
    ``label_grid``: the segmentation's own ``(ijk_to_ras, shape)`` when it was resampled onto the
    CT's grid: a slab that runs out of it is flagged ``cut_by_field_of_view`` as at the CT's border."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    muscles = dict(MUSCLE_LABELS if muscles is None else muscles)
    slabs = level_slabs(heights, levels) if slabs is None else list(slabs)
    if not slabs or not muscles:
        return []
    names = list(muscles)
    ids = np.array([muscles[n] for n in names], dtype=labels.dtype)
    flat, values = _muscle_voxels(labels, ids, _muscle_slices(label_boxes, ids))
    position = np.zeros(int(ids.max()) + 1, dtype=np.int8)  # label id → index into ``names``
    for m in reversed(range(len(ids))):
        position[ids[m]] = m
    muscle_index = position[values]
    segmented = np.bincount(muscle_index, minlength=len(names)) > 0
    missing = {name for name, present in zip(names, segmented) if not present}
    index_type = np.int16 if max(labels.shape) < 2**15 else np.int32
    guard, unmix_hu, pure_fat = _classify_muscles(ct, labels, flat, values, ids, index_type,
                                                  voxel_spacing(ijk_to_ras)[::-1])
    del values
    ct_flat = ct.reshape(-1)
    if fat_hu is None:
        fat = flat[pure_fat]
        fat_hu = float(ct_flat[fat].astype(np.float32).mean()) if len(fat) >= MIN_PURE_FAT_VOXELS else DEFAULT_FAT_HU
        del fat
    del pure_fat
    voxel_ml = voxel_volume_ml(ijk_to_ras)
    sums = _slab_sums(ct_flat, flat, muscle_index, guard, unmix_hu, labels.shape, index_type, slabs, ijk_to_ras,
                      label_grid, len(names))
    return _rows_from_sums(names, missing, slabs, sums, voxel_ml, fat_hu, lumbar_total)


def _muscle_slices(label_boxes: list | None, ids: np.ndarray) -> tuple[int, int] | None:
    """The slices ``(first, stop)`` that hold any of the muscles ``ids``, from
    ``ndimage.find_objects(labels)`` (None without it: scan every slice)."""
    if label_boxes is None:
        return None
    boxes = [label_boxes[m - 1] for m in ids.tolist()  # Python ints: no wrap-around of m - 1
             if m - 1 < len(label_boxes) and label_boxes[m - 1] is not None]
    return (min(b[0].start for b in boxes), max(b[0].stop for b in boxes)) if boxes else (0, 0)


def _classify_muscles(ct: np.ndarray, labels: np.ndarray, flat: np.ndarray, values: np.ndarray, ids: np.ndarray,
                      index_type, spacing_kji):
    """:func:`voxel_classes` of the muscle voxels at ``flat`` (labels ``values``), each muscle's on
    crops of its own (their ``(k, j, i)`` made for it alone): guarded lean, unmixing HU, pure fat."""
    guard = np.zeros(len(flat), dtype=bool)
    pure_fat = np.zeros(len(flat), dtype=bool)
    unmix_hu = np.full(len(flat), np.nan, dtype=np.float32)
    for m, label in enumerate(ids):
        where = np.flatnonzero(values == label)
        if len(where):
            i, j, k = grid_indices(flat[where], labels.shape, index_type)
            guard[where], unmix_hu[where], pure_fat[where] = voxel_classes(
                ct, labels, (k, j, i), values[where], ids[m:m + 1], spacing_kji)
    return guard, unmix_hu, pure_fat


def _slab_sums(ct_flat: np.ndarray, flat: np.ndarray, muscle_index: np.ndarray, guard: np.ndarray,
               unmix_hu: np.ndarray, shape_kji, index_type, slabs: Sequence[LevelSlab], ijk_to_ras: np.ndarray,
               label_grid: tuple | None, n_muscles: int) -> dict:
    """The sums :data:`_SUMS` of each (slab, muscle) cell, ``slab * n_muscles + muscle``, from each
    slab's own voxels, slab by slab: each cell's sum runs over the same voxels in the same order
    as one pass over all slabs would."""
    sums = {key: np.zeros(len(slabs) * n_muscles) for key in _SUMS}
    for n, voxel, weight, ijk in slab_shares(flat, shape_kji, index_type, slabs, ijk_to_ras):
        key = muscle_index[voxel]
        hu = ct_flat[flat[voxel]]
        classes = _hu_classes(hu)
        hu = hu.astype(np.float32)
        lean, fat, slab_guard, slab_unmix = classes == 1, classes == 2, guard[voxel], unmix_hu[voxel]
        unmixed = np.isfinite(slab_unmix)

        def total(values=None, weights=weight):
            return np.bincount(key, weights=weights if values is None else weights * values, minlength=n_muscles)

        hu64 = hu.astype(np.float64)  # squares of HU summed over hundreds of thousands of voxels
        weight_sq = weight * weight
        lean_hu_values, guard_hu_values = np.where(lean, hu64, 0.0), np.where(slab_guard, hu64, 0.0)
        cells = slice(n * n_muscles, (n + 1) * n_muscles)
        for name, value in (
                ("count", total()), ("lean_count", total(lean)), ("lean_sum", total(lean_hu_values)),
                ("lean_squares", total(lean_hu_values * hu64)), ("lean_weights_sq", total(lean, weight_sq)),
                ("fat_count", total(fat)), ("guard_count", total(slab_guard)), ("guard_sum", total(guard_hu_values)),
                ("guard_squares", total(guard_hu_values * hu64)), ("guard_weights_sq", total(slab_guard, weight_sq)),
                ("unmix_count", total(unmixed)), ("unmix_sum", total(np.where(unmixed, slab_unmix, np.float32(0.0)))),
                ("border", np.bincount(key, minlength=n_muscles, weights=runs_out_of_grid(
                    ijk, shape_kji, np.arange(len(voxel)), np.full(len(voxel), n), slabs, ijk_to_ras, label_grid)))):
            sums[name][cells] = value
    return sums


def _rows_from_sums(names: list[str], missing: set[str], slabs: Sequence[LevelSlab], sums: dict, voxel_ml: float,
                    fat_hu: float, lumbar_total: bool) -> list[MuscleMeasurement]:
    """The rows of :func:`measure_muscles` from :func:`_slab_sums`: level by level, muscles in the
    order of ``names``, then (with ``lumbar_total``) each muscle's L1–L5 total."""
    rows = []
    lumbar: dict[str, list] = {name: [] for name in names}
    for n, slab in enumerate(slabs):
        for m, name in enumerate(names):
            cell = n * len(names) + m
            flags = list(slab.flags)
            if sums["border"][cell] > 0:
                flags.append("cut_by_field_of_view")
            if name in missing:
                flags.append("not_segmented")
            row = _row(name, slab.level, sums, [cell], voxel_ml, fat_hu, flags)
            rows.append(row)
            if slab.level in lv.LUMBAR_LEVELS:
                lumbar[name].append((slab.level, cell, row.complete))
    if lumbar_total:
        for name in names:
            parts = lumbar[name]
            if not parts:
                continue
            present = {level for level, _, _ in parts}
            flags = [f"missing_level_{level}" for level in lv.LUMBAR_LEVELS if level not in present]
            flags += [f"incomplete_level_{level}" for level, _, ok in parts if not ok and name not in missing]
            flags += ["not_segmented"] if name in missing else []
            rows.append(_row(name, LUMBAR, sums, [cell for _, cell, _ in parts], voxel_ml, fat_hu, flags))
    return rows


def muscle_summary(rows: Sequence[MuscleMeasurement]) -> dict:
    """Exam-level muscle summary (for ``exam.json``): ``lumbar`` holds the L1–L5 totals per muscle
    and per muscle group (left + right: ``autochthon``, ``iliopsoas``), each with ``volume_ml``,
    ``mean_hu``, ``imat_fraction``, ``lean_hu``, ``fat_fraction``, the standard errors
    ``mean_hu_se`` and ``lean_hu_se``, ``complete`` and ``flags``;
    ``levels`` the levels measured, ``incomplete_levels`` those with a flagged row, and
    ``fat_reference_hu`` the fat HU used for ``fat_fraction``."""
    lumbar = [r for r in rows if r.level == LUMBAR]
    levels = [r.level for r in rows if r.level != LUMBAR]
    out: dict = {
        "lumbar": {},
        "levels": sorted(set(levels), key=lv.level_position),
        "incomplete_levels": sorted({r.level for r in rows if r.level != LUMBAR and not r.complete},
                                    key=lv.level_position),
        "fat_reference_hu": rows[0].fat_reference_hu if rows else None,
    }
    keys = ("volume_ml", "mean_hu", "imat_fraction", "lean_hu", "fat_fraction", "mean_hu_se", "lean_hu_se", "voxels")
    for r in lumbar:
        out["lumbar"][r.muscle] = {key: getattr(r, key) for key in keys} | {"complete": r.complete,
                                                                              "flags": list(r.flags)}
    for group in ("autochthon", "iliopsoas"):
        sides = [r for r in lumbar if r.muscle.startswith(group + "_")]
        if len(sides) != 2:
            continue
        voxels = sum(r.voxels for r in sides)

        def weighted(attribute, weights):
            """(weight, value) of the sides with a positive weight and a finite ``attribute``."""
            return [(w, getattr(r, attribute)) for w, r in zip(weights, sides)
                    if w > 0 and np.isfinite(getattr(r, attribute))]

        def pooled(attribute, weights):
            pairs = weighted(attribute, weights)
            return float(sum(w * x for w, x in pairs) / sum(w for w, _ in pairs)) if pairs else float("nan")

        def pooled_se(attribute, weights):
            """Standard error of :func:`pooled` from the sides' (independent) standard errors."""
            pairs = weighted(attribute, weights)
            if len(pairs) < len(sides):
                return float("nan")
            return float(np.sqrt(sum((w * se) ** 2 for w, se in pairs)) / sum(w for w, _ in pairs))

        counts = [r.voxels for r in sides]
        lean_counts = [r.voxels * (1.0 - r.imat_fraction) if np.isfinite(r.imat_fraction) else 0.0 for r in sides]
        out["lumbar"][group] = {
            "volume_ml": sum(r.volume_ml for r in sides),
            "mean_hu": pooled("mean_hu", lean_counts),
            "imat_fraction": pooled("imat_fraction", counts),
            "lean_hu": pooled("lean_hu", lean_counts),
            "fat_fraction": pooled("fat_fraction", counts),
            "mean_hu_se": pooled_se("mean_hu_se", lean_counts),
            "lean_hu_se": pooled_se("lean_hu_se", lean_counts),
            "voxels": voxels,
            "complete": all(r.complete for r in sides),
            "flags": sorted({f for r in sides for f in r.flags}),
        }
    return out
