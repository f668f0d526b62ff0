"""Level slabs: the space between the mid-planes of the discs above and below each vertebra, where
the paraspinal muscles are measured level by level (SPEC §4), and which voxels lie in them.

Inputs: the morphometry of the vertebrae (:func:`.morphometry.measure_heights`: each body's frame,
height lines and axis point, RAS mm) and, for the voxels, arrays on one grid indexed ``[k, j, i]``
(or their flat indices) with the grid's 4x4 IJK→RAS matrix (mm).

**Disc mid-plane** (:func:`level_slabs`) between vertebra A (above) and B (below), from the
morphometry's frames and height lines:

* its position is halfway between the two bodies' endplates where they protrude most: for each
  body, the largest extent of its superior (B) or inferior (A) endplate along its own
  cranio-caudal axis over the Ha, Hm and Hp lines. The rims, not the middle of the endplates,
  bound the disc space, so a central depression (biconcave fracture, Schmorl's node) or an
  anterior wedge does not pull the plane into the fractured body;
* its normal is the spine's axis across the disc, the secant from B's middle to A's (for a
  circular arc parallel to the tangent halfway between the bodies; a body's middle stays on its
  axis when a fracture deforms it). Where both bodies were sampled at most
  :data:`~.morphometry.THICK_VOXEL_MM` along their antero-posterior axes, the middles are their
  axis points (:attr:`.morphometry.VertebraHeights.axis_point_ras`: between the CT-fitted walls
  at the Hm line's mid-height) and the secant alone is the normal. Otherwise each middle is the
  Hm line's midpoint (walls from the mask) averaged with the axis point where the CT placed one,
  and the secant is averaged with the mean of the two vertebrae's own cranio-caudal axes (from
  the centre line through the body centroids): at coarse voxels each CT wall fit carries the
  noise into both planes of its body with opposite signs, while the mask's midpoints do not move
  with the noise but are off by up to half a voxel. A degree of tilt moves the plane by 1 mm
  55 mm behind the spine, where the autochthon lies.

The planes' errors on the phantoms, and what each choice above changed, are in ``docs/validation.md``
("Muscles: the slab planes and edge voxels, figure by figure");
``Testing/benchmarks/bench_attenuation.py`` prints how far the planes lie from the phantom's.

**Slab.** A voxel is in the slab when its centre ``x`` satisfies ``(x - p_below)·n_below >= 0``
and ``(x - p_above)·n_above < 0``, so adjacent slabs share their plane and no voxel counts twice;
:func:`slab_shares` gives a voxel cut by a plane the share of its volume on each side instead.
A plane whose neighbouring vertebra is missing (not segmented, not adjacent in the level
sequence) or cut by the field of view (its endplates and axis cannot be trusted) is not measured:
it is extrapolated from the vertebra's own endplate (half the other disc's height beyond it, or
:data:`DEFAULT_HALF_DISC_MM`, normal to the vertebra's own axis) and the level is flagged, never
silently treated as complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import levels as lv
from ..geometry import LabelGridMap, partial_volume_share, unit
from .morphometry import THICK_VOXEL_MM

DEFAULT_HALF_DISC_MM = 4.0
"""Half a disc's height (mm) used to extrapolate a slab plane when neither disc of a vertebra can
be measured."""

SLAB_REACH_MM = 150.0
"""Voxels farther than this (mm) from the line through a slab's plane points are not
assigned to that slab (adjacent slab planes, a few degrees apart, cross only farther away)."""

_SHARE_CHUNK_VOXELS = 250_000
"""Voxels whose slab shares :func:`slab_shares` computes at once (bounds the temporary memory)."""


# ------------------------------------------------------------------------------------------------
# Slabs from the morphometry
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
# Voxels in slabs
# ------------------------------------------------------------------------------------------------


def grid_indices(flat: np.ndarray, shape_kji, index_type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, k)`` of flat indices on a grid of ``shape_kji``, in ``index_type``, from arithmetic
    in the flat indices' own integer type (np.unravel_index would make three int64 arrays)."""
    plane = shape_kji[1] * shape_kji[2]
    k = (flat // plane).astype(index_type)
    rest = flat % plane
    return (rest % shape_kji[2]).astype(index_type), (rest // shape_kji[2]).astype(index_type), k


def slab_shares(flat: np.ndarray, shape_kji, index_type, slabs: Sequence[LevelSlab], ijk_to_ras: np.ndarray):
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
            i, j, k = grid_indices(flat[start:min(start + _SHARE_CHUNK_VOXELS, last)], shape_kji, index_type)
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
        i, j, k = grid_indices(flat[rows], shape_kji, index_type)
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


def runs_out_of_grid(ijk: tuple[np.ndarray, np.ndarray, np.ndarray], shape_kji, voxel: np.ndarray,
                     slab_of: np.ndarray, slabs: Sequence[LevelSlab], ijk_to_ras: np.ndarray,
                     label_grid: tuple | None = None) -> np.ndarray:
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
