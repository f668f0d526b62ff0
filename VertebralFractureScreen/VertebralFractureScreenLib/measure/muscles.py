"""Paraspinal muscles per vertebral level: volume, attenuation and intramuscular fat (SPEC §4).

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: the CT in HU, the TotalSegmentator
``total`` label map (autochthon 86/87, iliopsoas 88/89), the grid's 4x4 IJK→RAS matrix (mm), and
the morphometry of the vertebrae (:func:`.morphometry.measure_heights`).

**Level slabs** (:func:`level_slabs`). A level's slab is the space between the mid-planes of the
discs above and below its vertebra. The mid-plane of the disc between vertebra A (above) and B
(below), from the morphometry's frames and height lines:

* its position is halfway between the two bodies' endplates where they protrude most: for each
  body, the largest extent of its superior (B) or inferior (A) endplate along its own
  cranio-caudal axis over the Ha, Hm and Hp lines. The rims, not the middle of the endplates,
  bound the disc space, so a central depression (biconcave fracture, Schmorl's node) or an
  anterior wedge does not pull the plane into the fractured body (with the Hm points a 35 %
  biconcave fracture moved its planes by 2 mm);
* its normal is the spine's axis across the disc, the secant from B's middle to A's (for a
  circular arc parallel to the tangent halfway between the bodies; a body's middle stays on its
  axis when a fracture deforms it). Where both bodies were sampled at most
  :data:`~.morphometry.THICK_VOXEL_MM` along their antero-posterior axes, the middles are their
  axis points (:attr:`.morphometry.VertebraHeights.axis_point_ras`: between the CT-fitted walls
  at the Hm line's mid-height) and the secant alone is the normal. Otherwise each middle is the
  Hm line's midpoint (walls from the mask) averaged with the axis point where the CT placed one,
  and the secant is averaged with the mean of the two vertebrae's own cranio-caudal axes (from
  the centre line through the body centroids). On the morphometry benchmark's 35 spines (noise
  10–30 HU) the angle to the phantom's plane, median / p90 / max: 1 mm 0.13 / 0.49 / 1.02° and
  0.7x0.7x3 mm 0.13 / 0.51 / 0.90° (with the mask's midpoints and the axes there too: 0.28 /
  0.77 / 1.24 and 0.26 / 0.78 / 1.09°), 3 mm 0.36 / 0.89 / 1.98° (with the mask's midpoints
  alone: 0.40 / 1.04 / 2.95°). At 3 mm in-plane voxels the CT-fitted walls alone would have
  halved the noise-free planes' errors, but each wall fit carries the noise into the two planes
  of its body with opposite signs, and the slab between them thickens or thins where the
  autochthon lies (per-level volume errors 6.1 → 9.9 % at 20 HU on the attenuation phantoms);
  the mask's midpoints do not move with the noise but are off by up to half a voxel. Averaged,
  on the attenuation benchmark's 3 mm spines (noise 0–30 HU) the per-level volume error's median
  went 2.0–3.0 → 0.9–1.8 % (upright) and 1.5–2.1 → 1.3–1.9 % (rotated), its maximum 7.1 → 5.3 %
  and 6.2 → 7.0 % (lower at 0–20 HU, higher at 30 HU). The axes alone are 2.3–2.9° off at worst,
  since body centroids do not lie on the centre line of a wedged body. A degree moves the plane
  by 1 mm 55 mm behind the spine, where the autochthon lies.

``Testing/benchmarks/bench_attenuation.py`` prints how far the planes lie from the phantom's.

A voxel is in the slab when its centre ``x`` satisfies ``(x - p_below)·n_below >= 0`` and
``(x - p_above)·n_above < 0``, so adjacent slabs share their plane and no voxel counts twice.
A plane whose neighbouring vertebra is missing (not segmented, not adjacent in the level
sequence) or cut by the field of view (its endplates and axis cannot be trusted) is not measured:
it is extrapolated from the vertebra's own endplate (half the other disc's height beyond it, or
:data:`DEFAULT_HALF_DISC_MM`, normal to the vertebra's own axis) and the level is flagged, never
silently treated as complete.

**Metrics** (:func:`measure_muscles`) per muscle and slab, on the voxels of the muscle's label.
A voxel cut by a slab plane counts with the share of its volume on each side (the convolution of
its edges projected on the plane's normal), so a plane parallel to thick slices does not move
whole slices from one level to the next. SPEC §4:

* ``volume_ml``: voxel volume times the voxels (shares) in the slab;
* ``mean_hu``: mean HU of the voxels within −29…150 HU;
* ``imat_fraction``: share of the voxels within −190…−30 HU.

Both HU metrics are biased by partial volume: a voxel that is part fat and part muscle is counted
as muscle with a lowered HU (down to −29) or as fat, and the mask's edge voxels mix with whatever
surrounds the muscle. On the phantom (fat in 3–7 mm spheres) ``mean_hu`` reads 3–4 HU low at
1 mm voxels and 10–13 HU low at 3 mm. Two companions estimate the tissue values themselves:

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
  mm across reach into it from the neighbour beside it; leaving the edge out altogether weights
  the row by its interior only, which in a thin row (the 1 ml of iliopsoas at T12) misses the fat
  that lies near its surface. On the attenuation benchmark the largest per-level error went
  0.025 → 0.011 at 1 mm and 0.045 → 0.035 at 0.7x0.7x3 mm (there only the in-plane neighbours
  stand in), the L1–L5 totals' 0.006 → 0.003 and 0.004 → 0.002. With 3 mm neighbours the edge
  is left out, as before: standing in with them made 3 mm rows worse (0.044 → 0.056), their
  interior lying deeper than the fat that reaches the edge.

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
from ..geometry import LabelGridMap, partial_volume_share, unit, voxel_spacing, voxel_volume_ml
from .morphometry import THICK_VOXEL_MM

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

DEFAULT_HALF_DISC_MM = 4.0
"""Half a disc's height (mm) used to extrapolate a slab plane when neither disc of a vertebra can
be measured."""

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

SLAB_REACH_MM = 150.0
"""Muscle voxels farther than this (mm) from the line through a slab's plane points are not
assigned to that slab (adjacent slab planes, a few degrees apart, cross only farther away)."""


# ------------------------------------------------------------------------------------------------
# Slabs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SlabPlane:
    """A slab limit: the plane through ``point`` (RAS mm) with unit ``normal`` pointing cranially.
    ``between`` names the vertebrae above and below it; ``measured`` is False for an extrapolated
    plane."""

    point: np.ndarray
    normal: np.ndarray
    between: tuple[str | None, str | None]
    measured: bool = True

    def signed_distance(self, ras: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of ``(N, 3)`` RAS points, positive cranially."""
        return (np.asarray(ras, dtype=float) - self.point) @ self.normal

    def to_dict(self) -> dict:
        return {"point": [float(x) for x in self.point], "normal": [float(x) for x in self.normal],
                "between": list(self.between), "measured": self.measured}


@dataclass
class LevelSlab:
    """The slab of one level, between ``below`` and ``above``; ``complete`` False with ``flags``
    when a plane was extrapolated or the vertebra is incomplete."""

    level: str
    below: SlabPlane
    above: SlabPlane
    complete: bool = True
    flags: list[str] = field(default_factory=list)

    @property
    def axis(self) -> np.ndarray:
        """Unit vector along the slab (mean of its planes' normals, pointing cranially)."""
        return unit(self.below.normal + self.above.normal)

    @property
    def thickness_mm(self) -> float:
        """Distance (mm) between the planes' points along :attr:`axis`."""
        return float((self.above.point - self.below.point) @ self.axis)


def _rim_point(h, which: int) -> np.ndarray | None:
    """Where a body's superior (``which = 0``) or inferior (1) endplate protrudes most along its own
    cranio-caudal axis, over the three measured height lines: the point on the axis through the
    body's centroid at that height (RAS mm); None without height lines."""
    lines = h.height_lines_ras or {}
    if h.frame is None or not lines:
        return None
    centre, cc = np.asarray(h.frame.centre, dtype=float), unit(np.asarray(h.frame.cc, dtype=float))
    offsets = [float((np.asarray(line[which], dtype=float) - centre) @ cc) for line in lines.values()]
    offsets = [x for x in offsets if np.isfinite(x)]
    if not offsets:
        return None
    return centre + (max(offsets) if which == 0 else min(offsets)) * cc


def _middle_point(h) -> np.ndarray | None:
    """Midpoint of a body's Hm line (mid-height at mid-depth, RAS mm); None without it."""
    lines = h.height_lines_ras or {}
    if h.frame is None or "hm" not in lines:
        return None
    point = 0.5 * (np.asarray(lines["hm"][0], dtype=float) + np.asarray(lines["hm"][1], dtype=float))
    return point if np.all(np.isfinite(point)) else None


def _fitted_axis_point(h) -> np.ndarray | None:
    """A body's axis point between its CT-fitted walls
    (:attr:`.morphometry.VertebraHeights.axis_point_ras`); None when the CT did not place it."""
    if not h.axis_point_from_ct:
        return None
    point = np.asarray(h.axis_point_ras, dtype=float)
    return point if np.all(np.isfinite(point)) else None


def _ct_axis_point(h) -> np.ndarray | None:
    """The CT-fitted axis point (:func:`_fitted_axis_point`) when the body was sampled at most
    :data:`~.morphometry.THICK_VOXEL_MM` along its antero-posterior axis; None otherwise."""
    return _fitted_axis_point(h) if h.voxel_extent_mm[1] <= THICK_VOXEL_MM else None


def _thick_middle_point(h) -> np.ndarray:
    """A body's middle for the slab normal where its voxels are thick along the antero-posterior
    axis: the Hm line's midpoint (walls from the mask), averaged with the axis point between the
    CT-fitted walls when there is one."""
    middle, point = _middle_point(h), _fitted_axis_point(h)
    return middle if point is None else 0.5 * (middle + point)


def level_slabs(heights: Sequence, levels: Sequence[str] | None = None) -> list[LevelSlab]:
    """Slabs of the vertebrae in ``heights`` (a :func:`.morphometry.measure_heights` result),
    cranial to caudal; ``levels`` restricts which levels get a slab (all vertebrae still bound
    their neighbours' slabs). S1 gets no slab (it is not a free vertebra). Definition in the
    module docstring."""
    usable = [h for h in heights if _middle_point(h) is not None and _rim_point(h, 0) is not None
              and _rim_point(h, 1) is not None]
    usable.sort(key=lambda h: lv.level_position(h.level))
    by_position = {lv.level_position(h.level): h for h in usable}

    planes: dict[tuple[str, str], SlabPlane] = {}

    def disc_plane(upper, lower) -> SlabPlane:
        """The disc's mid-plane, made once so that the two slabs it bounds share it."""
        if (upper.level, lower.level) in planes:
            return planes[(upper.level, lower.level)]
        point = 0.5 * (_rim_point(upper, 1) + _rim_point(lower, 0))
        fine = _ct_axis_point(upper), _ct_axis_point(lower)
        if fine[0] is not None and fine[1] is not None:
            normal = unit(fine[0] - fine[1])
        else:
            secant = unit(_thick_middle_point(upper) - _thick_middle_point(lower))
            axes = unit(np.asarray(upper.frame.cc, dtype=float) + np.asarray(lower.frame.cc, dtype=float))
            normal = unit(secant + axes)
        planes[(upper.level, lower.level)] = SlabPlane(point, normal, (upper.level, lower.level))
        return planes[(upper.level, lower.level)]

    slabs = []
    for h in usable:
        if h.level == "S1" or (levels is not None and h.level not in levels):
            continue
        position = lv.level_position(h.level)
        flags = []
        neighbours = {}
        for side, offset in (("above", -1), ("below", 1)):
            other = by_position.get(position + offset)
            if other is None:
                flags.append(f"no_vertebra_{side}")
            elif not other.complete:
                flags.append(f"vertebra_{side}_incomplete")
                other = None  # a cut vertebra's endplates and axis cannot be trusted
            neighbours[side] = other
        above = disc_plane(neighbours["above"], h) if neighbours["above"] is not None else None
        below = disc_plane(h, neighbours["below"]) if neighbours["below"] is not None else None
        cc = unit(np.asarray(h.frame.cc, dtype=float))
        top, bottom = _rim_point(h, 0), _rim_point(h, 1)
        if above is None:
            half = below.signed_distance(bottom[None])[0] if below is not None else DEFAULT_HALF_DISC_MM
            above = SlabPlane(top + cc * max(half, 0.0), cc, (None, h.level), measured=False)
        if below is None:
            half = -above.signed_distance(top[None])[0] if above.measured else DEFAULT_HALF_DISC_MM
            below = SlabPlane(bottom - cc * max(half, 0.0), cc, (h.level, None), measured=False)
        if not h.complete:
            flags.append("vertebra_incomplete")
        slabs.append(LevelSlab(h.level, below, above, complete=not flags, flags=flags))
    return slabs


def slab_length_mm(slab: LevelSlab, heights: Sequence) -> float:
    """Length (mm) of a level's slab along its vertebra's cranio-caudal axis through the middle of
    the body: the distance between the two planes on that line. NaN without the body's middle."""
    h = next((h for h in heights if h.level == slab.level), None)
    middle = None if h is None else _middle_point(h)
    if middle is None:
        return float("nan")
    cc = unit(np.asarray(h.frame.cc, dtype=float))
    along = [float((plane.point - middle) @ plane.normal / (cc @ plane.normal)) for plane in (slab.above, slab.below)]
    return along[0] - along[1]


def lumbar_length_mm(heights: Sequence) -> float | None:
    """Length (mm) of the L1–L5 slabs along the spine (sum of :func:`slab_length_mm`), the
    denominator that makes lumbar muscle volumes comparable between body sizes; None unless all
    five slabs are complete."""
    slabs = level_slabs(heights, levels=lv.LUMBAR_LEVELS)
    if [s.level for s in slabs] != list(lv.LUMBAR_LEVELS) or not all(s.complete for s in slabs):
        return None
    length = sum(slab_length_mm(s, heights) for s in slabs)
    return float(length) if np.isfinite(length) else None


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
_SHARE_CHUNK_VOXELS = 250_000
"""Voxels whose slab shares :func:`_slab_shares` computes at once (bounds the temporary memory)."""
_CLASS_CHUNK_VOXELS = 500_000
"""Voxels of a muscle's box classified at once (:func:`_voxel_classes`; bounds the temporary
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


def _voxel_classes(ct: np.ndarray, labels: np.ndarray, kji: tuple[np.ndarray, np.ndarray, np.ndarray],
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
    """:func:`_voxel_classes` of some voxels of one muscle (sorted by ``k``): guarded lean, pure fat
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


def _grid_indices(flat: np.ndarray, shape_kji, index_type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, k)`` of flat indices on a grid of ``shape_kji``, in ``index_type``, from arithmetic
    in the flat indices' own integer type (np.unravel_index would make three int64 arrays)."""
    plane = shape_kji[1] * shape_kji[2]
    k = (flat // plane).astype(index_type)
    rest = flat % plane
    return (rest % shape_kji[2]).astype(index_type), (rest // shape_kji[2]).astype(index_type), k


def _slab_shares(flat: np.ndarray, shape_kji, index_type, slabs: Sequence[LevelSlab], ijk_to_ras: np.ndarray):
    """Share of each voxel's volume in each slab, slab by slab. ``flat``: the voxels' flat indices
    on a grid of ``shape_kji`` (increasing). Yields, for each slab with voxels of a positive
    share, ``(slab index, voxel indices, shares, ijk)``: indices into ``flat`` (increasing,
    int32), shares (float32) and those voxels' ``(i, j, k)`` (``index_type``). A voxel cut by a
    slab plane is split between the slabs on either side in proportion to its volume on each
    side, so adjacent slabs share it exactly. Each slab looks only at the slices its part of space
    near the spine (radius :data:`SLAB_REACH_MM`) can reach."""
    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    k_row = ras_to_ijk[2, :3]
    k_scale = float(np.linalg.norm(k_row))
    edges = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    origin = np.asarray(ijk_to_ras, dtype=float)[:3, 3]
    plane_voxels = int(shape_kji[1]) * int(shape_kji[2])
    cdfs: dict[int, object] = {}

    def distance(plane: SlabPlane, i, j, k) -> np.ndarray:
        """Signed distance (mm) of voxels from ``plane``, from their indices."""
        a, b, c = (plane.normal @ edges).astype(np.float32)
        offset = np.float32(plane.normal @ (origin - plane.point))
        return a * i + b * j + c * k + offset

    for n, slab in enumerate(slabs):
        reach = []
        for plane in (slab.below, slab.above):
            k_centre = float(k_row @ plane.point + ras_to_ijk[2, 3])
            along = float(np.clip(plane.normal @ k_row / k_scale, -1.0, 1.0))
            half = 1.1 * SLAB_REACH_MM * k_scale * np.sqrt(1.0 - along * along)
            reach += [k_centre - half - 2.0, k_centre + half + 2.0]
        # Slices clipped to the index type's range; the first voxel at or after a slice is the
        # first whose flat index is at least the slice's first.
        limits = np.iinfo(index_type)
        bounds = np.clip([np.floor(min(reach)), np.ceil(max(reach))], limits.min, limits.max).astype(np.int64)
        first, last = (int(x) for x in np.searchsorted(flat, bounds * plane_voxels, side="left"))
        if first >= last:
            continue
        parts, shares = [], []
        for start in range(first, last, _SHARE_CHUNK_VOXELS):  # a bounded number of voxels at a time
            i, j, k = _grid_indices(flat[start:min(start + _SHARE_CHUNK_VOXELS, last)], shape_kji, index_type)
            share = None
            for plane, sign in ((slab.below, 1.0), (slab.above, -1.0)):
                if id(plane) not in cdfs:
                    cdfs[id(plane)] = partial_volume_share(plane.normal, ijk_to_ras)
                part = cdfs[id(plane)](sign * distance(plane, i, j, k))
                share = part if share is None else share + part - 1.0
            rows = np.flatnonzero(share > 1e-9)
            parts.append(start + rows)
            shares.append(share[rows])
        rows, share = np.concatenate(parts), np.concatenate(shares)
        if not len(rows):
            continue
        i, j, k = _grid_indices(flat[rows], shape_kji, index_type)
        # Near the spine only: adjacent slab planes, a few degrees apart, cross far from it. The
        # test runs only when the corners of the voxels' index box can lie farther away.
        axis = slab.axis
        centre = 0.5 * (slab.below.point + slab.above.point)
        box = [(int(a.min()), int(a.max())) for a in (i, j)] + [(int(k[0]), int(k[-1]))]
        corners = np.array([[a, b, c] for a in box[0] for b in box[1] for c in box[2]], dtype=float)
        offset = corners @ edges.T + (origin - centre)
        if np.max(np.einsum("ij,ij->i", offset, offset) - (offset @ axis) ** 2) > SLAB_REACH_MM ** 2:
            offset = np.stack([i, j, k], axis=1) @ edges.T + (origin - centre)
            along_axis = offset @ axis
            near = np.flatnonzero(np.einsum("ij,ij->i", offset, offset) - along_axis * along_axis
                                  <= SLAB_REACH_MM ** 2)
            rows, share, i, j, k = rows[near], share[near], i[near], j[near], k[near]
        if len(rows):
            yield n, rows.astype(np.int32), np.minimum(share, 1.0).astype(np.float32), (i, j, k)


def _runs_out(ijk: tuple[np.ndarray, np.ndarray, np.ndarray], shape_kji, voxel: np.ndarray, slab_of: np.ndarray,
              slabs: Sequence[LevelSlab], ijk_to_ras: np.ndarray, label_grid: tuple | None = None) -> np.ndarray:
    """For each (voxel, slab) pair: whether the voxel lies on the image's border and a voxel just
    beyond that border (outside the image) would have its centre in the same slab; with
    ``label_grid`` (the segmentation's own ``(ijk_to_ras, shape)`` before it was resampled onto
    the CT's), also where its nearest label voxel is on that grid's border and the label voxel
    beyond would be in the slab."""
    nk, nj, ni = shape_kji
    out = np.zeros(len(voxel), dtype=bool)
    m = np.asarray(ijk_to_ras, dtype=float)
    if label_grid is not None:
        label_map = LabelGridMap(m, label_grid)
        if not label_map.holds_box((slice(0, nk), slice(0, nj), slice(0, ni))):
            i, j, k = (a[voxel].astype(np.float64) for a in ijk)
            steps = label_map.label_ijk_to_ras[:3, :3]
            for axis, at in enumerate(label_map.nearest(i, j, k)):
                for edge, step in ((0, -1.0), (label_map.limits[axis] - 1, 1.0)):
                    on = np.flatnonzero(at == edge)
                    ras = np.stack([i[on], j[on], k[on]], axis=1) @ m[:3, :3].T + m[:3, 3] + step * steps[:, axis]
                    _mark_in_own_slab(out, on, ras, slab_of, slabs)
    # Only voxels on the image's border matter: look them up first (no float copies of all).
    border = np.flatnonzero((ijk[0][voxel] == 0) | (ijk[0][voxel] == ni - 1) | (ijk[1][voxel] == 0)
                            | (ijk[1][voxel] == nj - 1) | (ijk[2][voxel] == 0) | (ijk[2][voxel] == nk - 1))
    if not len(border):
        return out
    i, j, k = (a[voxel[border]].astype(float) for a in ijk)
    for axis, (values, n) in enumerate(((i, ni), (j, nj), (k, nk))):
        for edge, step in ((0, -1.0), (n - 1, 1.0)):
            on = np.flatnonzero(values == edge)
            beyond = np.stack([i[on], j[on], k[on]], axis=1)
            beyond[:, axis] += step
            _mark_in_own_slab(out, border[on], beyond @ m[:3, :3].T + m[:3, 3], slab_of, slabs)
    return out


def _mark_in_own_slab(out: np.ndarray, rows: np.ndarray, ras: np.ndarray, slab_of: np.ndarray,
                      slabs: Sequence[LevelSlab]) -> None:
    """Set ``out[rows[n]]`` where the point ``ras[n]`` (mm) lies in the slab of pair ``rows[n]``."""
    for n_slab in np.unique(slab_of[rows]):
        mine = slab_of[rows] == n_slab
        slab, x = slabs[n_slab], ras[mine]
        inside = (slab.below.signed_distance(x) >= 0) & (slab.above.signed_distance(x) < 0)
        out[rows[mine][inside]] = True


_SUMS = ("count", "lean_count", "lean_sum", "lean_squares", "lean_weights_sq", "fat_count", "guard_count",
         "guard_sum", "guard_squares", "guard_weights_sq", "unmix_count", "unmix_sum", "border")


def _standard_error(weights: float, total: float, squares: float, weights_sq: float) -> float:
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
    mean_hu_se = _standard_error(total["lean_count"], total["lean_sum"], total["lean_squares"],
                                 total["lean_weights_sq"])
    if total["guard_count"] >= MIN_GUARDED_VOXELS:
        lean_hu = total["guard_sum"] / total["guard_count"]
        lean_hu_se = _standard_error(total["guard_count"], total["guard_sum"], total["guard_squares"],
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
    k_range = None
    if label_boxes is not None:  # ``ndimage.find_objects(labels)``: scan only the muscles' slices
        boxes = [label_boxes[m - 1] for m in ids.tolist()  # Python ints: no wrap-around of m - 1
                 if m - 1 < len(label_boxes) and label_boxes[m - 1] is not None]
        k_range = (min(b[0].start for b in boxes), max(b[0].stop for b in boxes)) if boxes else (0, 0)
    flat, values = _muscle_voxels(labels, ids, k_range)
    position = np.zeros(int(ids.max()) + 1, dtype=np.int8)  # label id → index into ``names``
    for m in reversed(range(len(ids))):
        position[ids[m]] = m
    muscle_index = position[values]
    segmented = np.bincount(muscle_index, minlength=len(names)) > 0
    missing = {name for name, present in zip(names, segmented) if not present}
    # Each muscle's voxels classified on crops of its own (their (k, j, i) made for it alone).
    index_type = np.int16 if max(labels.shape) < 2**15 else np.int32
    spacing_kji = voxel_spacing(ijk_to_ras)[::-1]
    guard = np.zeros(len(flat), dtype=bool)
    pure_fat = np.zeros(len(flat), dtype=bool)
    unmix_hu = np.full(len(flat), np.nan, dtype=np.float32)
    for m, label in enumerate(ids):
        where = np.flatnonzero(values == label)
        if len(where):
            i, j, k = _grid_indices(flat[where], labels.shape, index_type)
            guard[where], unmix_hu[where], pure_fat[where] = _voxel_classes(
                ct, labels, (k, j, i), values[where], ids[m:m + 1], spacing_kji)
    del values
    ct_flat = ct.reshape(-1)
    if fat_hu is None:
        fat = flat[pure_fat]
        fat_hu = float(ct_flat[fat].astype(np.float32).mean()) if len(fat) >= MIN_PURE_FAT_VOXELS else DEFAULT_FAT_HU
        del fat
    del pure_fat
    voxel_ml = voxel_volume_ml(ijk_to_ras)

    # The sums of each slab's cells (one per muscle) from its own voxels, slab by slab: each
    # cell's sum runs over the same voxels in the same order as one pass over all slabs would.
    sums = {key: np.zeros(len(slabs) * len(names)) for key in _SUMS}
    for n, voxel, weight, ijk in _slab_shares(flat, labels.shape, index_type, slabs, ijk_to_ras):
        key = muscle_index[voxel]
        hu = ct_flat[flat[voxel]]
        classes = _hu_classes(hu)
        hu = hu.astype(np.float32)
        lean, fat, slab_guard, slab_unmix = classes == 1, classes == 2, guard[voxel], unmix_hu[voxel]
        unmixed = np.isfinite(slab_unmix)

        def total(values=None, weights=weight):
            return np.bincount(key, weights=weights if values is None else weights * values, minlength=len(names))

        hu64 = hu.astype(np.float64)  # squares of HU summed over hundreds of thousands of voxels
        weight_sq = weight * weight
        lean_hu_values, guard_hu_values = np.where(lean, hu64, 0.0), np.where(slab_guard, hu64, 0.0)
        cells = slice(n * len(names), (n + 1) * len(names))
        for name, value in (
                ("count", total()), ("lean_count", total(lean)), ("lean_sum", total(lean_hu_values)),
                ("lean_squares", total(lean_hu_values * hu64)), ("lean_weights_sq", total(lean, weight_sq)),
                ("fat_count", total(fat)), ("guard_count", total(slab_guard)), ("guard_sum", total(guard_hu_values)),
                ("guard_squares", total(guard_hu_values * hu64)), ("guard_weights_sq", total(slab_guard, weight_sq)),
                ("unmix_count", total(unmixed)), ("unmix_sum", total(np.where(unmixed, slab_unmix, np.float32(0.0)))),
                ("border", np.bincount(key, minlength=len(names), weights=_runs_out(
                    ijk, labels.shape, np.arange(len(voxel)), np.full(len(voxel), n), slabs, ijk_to_ras, label_grid)))):
            sums[name][cells] = value
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
