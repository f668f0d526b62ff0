"""The trabecular ROI of a vertebral body: where the bone's attenuation is read (SPEC §4).

Inputs are arrays on one voxel grid, indexed ``[k, j, i]``: a vertebra label map
(``totalsegmentator`` or ``verse`` ids), optionally the ``vertebrae_body`` map (1 = bodies), the
grid's 4x4 IJK→RAS matrix (mm), and the vertebra's morphometry
(:func:`.morphometry.measure_heights`), whose frame and endplate points place the ROI. Every
limit is a distance in millimetres in the vertebra's own frame, so the ROI does not depend on how
the anatomy lies on the voxel grid. :mod:`.attenuation` reads the CT in it.

**Trabecular ROI** (:func:`trabecular_roi_mask`). In the vertebra's frame (``u`` left-right,
``v`` antero-posterior, positive anterior, ``w`` cranio-caudal; mm) the body's anterior and
posterior walls ``v_ant``, ``v_post`` and its superior and inferior endplates ``top(v)``,
``bottom(v)`` come from the morphometry's height lines (Ha, Hm, Hp at 15/50/85 % of the depth;
the endplates are piecewise linear in ``v`` through those three points, extended linearly to the
walls). A voxel belongs to the ROI when it lies in the body mask and

* its centre is in the central half of the body height: ``bottom + H/4 <= w <= top - H/4`` with
  ``H = top(v) - bottom(v)``;
* it is at least ``margin_mm`` (3 mm) from the endplates, the anterior wall and the body's outline
  (lateral walls); the posterior fifth of the depth is excluded (basivertebral vein).

"At least 3 mm" holds for the whole voxel, not its centre, and allows for where the surface really
is: each clearance is ``margin_mm`` plus half the voxel's footprint along the surface normal (its
own extent) plus :data:`SURFACE_UNCERTAINTY` of that again (where a surface found on that grid may
really lie). With 3 mm slices the ROI keeps ``3 + 1.5 + 0.75`` mm from the endplates; it shrinks
rather than reaching the cortex, and ``roi_small`` says when fewer than
:data:`.attenuation.ROI_MIN_VOXELS` voxels or :data:`.attenuation.ROI_MIN_ML` ml remain (small
thoracic bodies at 3 mm). The endplates are also checked on the mask: the body must still be there
``clearance`` above and below each ROI voxel (a depressed endplate can dip between the three
measured points). The lateral outline is
the body's cross-section over the central half of its height (the mask's interpolated occupancy,
on a 0.5 mm grid in the ``u, v`` plane, each column sampled between its own endplates); its
distance map gives the lateral clearance, so kidney-shaped, wedged and small thoracic bodies are
handled alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .. import levels as lv
from ..geometry import ras_to_ijk_points, voxel_extent_along, voxel_spacing

ROI_MARGIN_MM = 3.0
"""Minimum distance (mm) of the ROI from the cortical surface and the endplates (SPEC §4)."""

POSTERIOR_EXCLUDED = 0.2
"""Fraction of the body depth excluded at the posterior wall (basivertebral vein)."""

SURFACE_UNCERTAINTY = 0.5
"""How far a surface found on the grid (the morphometry's endplates and walls, the mask's
outline) may lie from the true one, as a fraction of half the voxel's footprint along its normal;
the clearances allow for it on top of the voxel's own half-footprint. On the phantom suite (1 mm
to 3 mm voxels, rotated, fractured) every ROI voxel stayed at least 3.3 mm from the true surface
with 0.5; with 0 some came within 2.7 mm."""

OUTLINE_STEP_MM = 0.5
"""Grid step (mm) of the body's cross-section used for the lateral clearance."""


# ------------------------------------------------------------------------------------------------
# Geometry helpers
# ------------------------------------------------------------------------------------------------


def _crop_around(ras_points: np.ndarray, ijk_to_ras: np.ndarray, shape_kji, pad: int = 1):
    """Slices ``(k, j, i)`` of the voxels whose centres can lie in the box spanned by
    ``ras_points`` (plus ``pad`` voxels), clipped to the grid, and the crop's IJK→RAS; None when
    the box misses the grid."""
    ijk = ras_to_ijk_points(ijk_to_ras, ras_points)
    size = np.array(shape_kji[::-1])
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - pad, 0, size)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + pad + 1, 0, size)
    if np.any(hi <= lo):
        return None, None
    crop_to_ras = np.asarray(ijk_to_ras, dtype=float).copy()
    crop_to_ras[:3, 3] += crop_to_ras[:3, :3] @ lo
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])), crop_to_ras


def _axis_coordinate(row: np.ndarray, origin: np.ndarray, crop_to_ras: np.ndarray, shape_kji) -> np.ndarray:
    """``row · (x - origin)`` (mm, float32) at every voxel centre ``x`` of a crop, ``(k, j, i)``."""
    steps = (row @ crop_to_ras[:3, :3]).astype(np.float32)
    nk, nj, ni = shape_kji
    offset = np.float32(row @ (crop_to_ras[:3, 3] - origin))
    return ((np.arange(ni, dtype=np.float32) * steps[0])[None, None, :]
            + (np.arange(nj, dtype=np.float32) * steps[1])[None, :, None]
            + (np.arange(nk, dtype=np.float32) * steps[2] + offset)[:, None, None])


def _linear_through(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise-linear function through knots ``(xs, ys)`` (``xs`` increasing), continued
    linearly beyond the first and last knots."""
    x = np.asarray(x, dtype=float)
    y = np.interp(x, xs, ys)
    left, right = x < xs[0], x > xs[-1]
    if left.any():
        y[left] = ys[0] + (x[left] - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    if right.any():
        y[right] = ys[-1] + (x[right] - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return y


@dataclass
class _BodyLimits:
    """Walls and endplates of a body in its frame (mm): ``v_ant``, ``v_post``, the lateral
    centre ``u_mid`` and ``width``, and the endplates as knots ``(v_knots, top_knots,
    bottom_knots)`` with ``v_knots`` increasing."""

    u_mid: float
    width: float
    v_ant: float
    v_post: float
    v_knots: np.ndarray
    top_knots: np.ndarray
    bottom_knots: np.ndarray

    def top(self, v):
        return _linear_through(v, self.v_knots, self.top_knots)

    def bottom(self, v):
        return _linear_through(v, self.v_knots, self.bottom_knots)


def _limits_from_lines(heights) -> _BodyLimits | None:
    """Body limits from the morphometry's height lines (all of Ha, Hm, Hp needed)."""
    lines = heights.height_lines_ras or {}
    if not all(key in lines for key in ("ha", "hm", "hp")):
        return None
    frame = heights.frame
    top = {key: frame.to_local(np.asarray(lines[key][0], dtype=float)[None])[0] for key in ("ha", "hm", "hp")}
    bottom = {key: frame.to_local(np.asarray(lines[key][1], dtype=float)[None])[0] for key in ("ha", "hm", "hp")}
    v_ha, v_hm, v_hp = top["ha"][1], top["hm"][1], top["hp"][1]
    if not (np.isfinite([v_ha, v_hm, v_hp]).all() and v_hp < v_hm < v_ha):
        return None
    depth = (v_ha - v_hp) / 0.70
    width = heights.width_mm if np.isfinite(heights.width_mm) and heights.width_mm > 0 else depth * 1.4
    order = ("hp", "hm", "ha")
    return _BodyLimits(
        u_mid=float(top["hm"][0]), width=float(width), v_ant=float(v_ha + 0.15 * depth),
        v_post=float(v_hp - 0.15 * depth), v_knots=np.array([top[k][1] for k in order]),
        top_knots=np.array([top[k][2] for k in order]), bottom_knots=np.array([bottom[k][2] for k in order]))


def _limits_from_mask(frame, mask: np.ndarray, crop_to_ras: np.ndarray) -> _BodyLimits | None:
    """Body limits from the mask alone (robust percentiles of its voxels' local coordinates)."""
    if mask.sum() < 20:
        return None
    index = np.nonzero(mask)
    ijk = np.stack([index[2], index[1], index[0]], axis=1).astype(float)
    local = frame.to_local(ijk @ crop_to_ras[:3, :3].T + crop_to_ras[:3, 3])
    u_lo, u_hi = np.percentile(local[:, 0], [1, 99])
    v_lo, v_hi = np.percentile(local[:, 1], [1, 99])
    central = np.abs(local[:, 0] - 0.5 * (u_lo + u_hi)) <= 0.15 * (u_hi - u_lo)
    w = local[central, 2] if central.sum() >= 10 else local[:, 2]
    w_lo, w_hi = np.percentile(w, [1, 99])
    depth = v_hi - v_lo
    knots = v_hi - np.array([0.85, 0.50, 0.15]) * depth
    return _BodyLimits(float(0.5 * (u_lo + u_hi)), float(u_hi - u_lo), float(v_hi), float(v_lo), knots,
                       np.full(3, w_hi), np.full(3, w_lo))


def _in_plane_half_footprint(frame, ijk_to_ras: np.ndarray) -> float:
    """Largest half-footprint (mm) of a voxel along any direction in the frame's ``u, v`` plane."""
    angles = np.linspace(0.0, np.pi, 37)
    directions = np.cos(angles)[:, None] * frame.lr[None, :] + np.sin(angles)[:, None] * frame.ap[None, :]
    edges = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    return 0.5 * float(np.abs(directions @ edges).sum(axis=1).max())




# ------------------------------------------------------------------------------------------------
# Trabecular ROI
# ------------------------------------------------------------------------------------------------


def trabecular_roi_mask(
    heights,
    labels: np.ndarray,
    ijk_to_ras: np.ndarray,
    *,
    label: int | None = None,
    body_labels: np.ndarray | None = None,
    margin_mm: float = ROI_MARGIN_MM,
) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None, list[str]]:
    """The trabecular ROI of one vertebra as a boolean mask on a crop of the grid.

    ``heights``: the vertebra's :class:`~.morphometry.VertebraHeights` (its frame and height lines
    place the ROI); ``labels``: vertebra label map; ``label``: its id (default ``heights.label``);
    ``body_labels``: optional ``vertebrae_body`` map. Returns ``(slices, mask, flags)`` where
    ``mask`` has the shape of ``labels[slices]``; ``(None, None, flags)`` when there is no ROI.
    Definition in the module docstring."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
    label = heights.label if label is None else label
    frame = heights.frame
    if frame is None:
        return None, None, ["not_measured"]

    body_mask = functools.partial(body_voxels, labels, label, body_labels)
    limits, flags = _body_limits(heights, ijk_to_ras, labels.shape, body_mask)
    if limits is None:
        return None, None, flags
    reach = _roi_reach(frame, limits, ijk_to_ras, margin_mm)
    if reach is None:
        return None, None, flags + ["roi_empty"]
    slices, crop_to_ras = _crop_around(reach.crop_corners(frame), ijk_to_ras, labels.shape)
    if slices is None:
        return None, None, flags + ["roi_empty"]
    mask = body_mask(slices)
    if not mask.any():
        return None, None, flags + ["roi_empty"]
    ras_to_crop = np.linalg.inv(crop_to_ras)
    mask_f = mask.astype(np.float32)
    outline_distance = _outline_distance(frame, limits, reach, mask_f, ras_to_crop)
    if outline_distance is None:
        return None, None, flags + ["roi_empty"]
    roi = _roi_voxels(frame, limits, reach, mask, mask_f, crop_to_ras, ras_to_crop, outline_distance)
    if roi is None:
        return None, None, flags + ["roi_empty"]
    return slices, roi, flags


def body_voxels(labels: np.ndarray, label: int, body_labels, slices) -> np.ndarray:
    """The vertebra's body in the crop ``slices`` of the label map: its ``label``, within the
    ``vertebrae_body`` map's bodies when that map is given (else the whole label)."""
    mask = labels[slices] == label
    if body_labels is not None:
        mask &= body_labels[slices] == lv.BODY_LABEL
    return mask


def _body_limits(heights, ijk_to_ras: np.ndarray, shape_kji, body_mask) -> tuple[_BodyLimits | None, list[str]]:
    """The body's walls and endplates in its frame: from the height lines, else from the mask
    (``body_mask(slices)``) with the flag ``roi_limits_from_mask``; ``(None, ["roi_empty"])``
    without either."""
    limits = _limits_from_lines(heights)
    if limits is not None:
        return limits, []
    frame = heights.frame
    reach = 45.0
    corners = frame.to_ras(np.array([[a, b, c] for a in (-reach, reach) for b in (-reach, reach)
                                     for c in (-reach, reach)]))
    slices, crop_to_ras = _crop_around(corners, ijk_to_ras, shape_kji)
    limits = None if slices is None else _limits_from_mask(frame, body_mask(slices), crop_to_ras)
    if limits is None:
        return None, ["roi_empty"]
    return limits, ["roi_limits_from_mask"]


@dataclass
class _RoiReach:
    """Where the ROI may reach in the body's frame (mm): the clearances from the endplates
    (``clear_w``) and from the lateral outline (``clear_uv``), the antero-posterior range
    ``v_lo..v_hi``, the voxel's extent ``s_w`` along the cranio-caudal axis, and the box
    ``u_a..u_b``, ``v_a..v_b``, ``w_a..w_b`` that holds the body's cross-section over the ROI's
    heights with room for its outline."""

    clear_w: float
    clear_uv: float
    v_lo: float
    v_hi: float
    s_w: float
    u_a: float
    u_b: float
    v_a: float
    v_b: float
    w_a: float
    w_b: float

    def crop_corners(self, frame) -> np.ndarray:
        """The box's eight corners (RAS mm)."""
        return frame.to_ras(np.array([[u, v, w] for u in (self.u_a, self.u_b) for v in (self.v_a, self.v_b)
                                      for w in (self.w_a, self.w_b)]))


def _roi_reach(frame, limits: _BodyLimits, ijk_to_ras: np.ndarray, margin_mm: float) -> _RoiReach | None:
    """The clearances, the ROI's range and the crop's box (:class:`_RoiReach`); None when the
    clearances leave no room between the walls or between the endplates."""
    # Clearances (mm): the margin plus half the voxel's footprint along the surface normal (its own
    # extent) plus SURFACE_UNCERTAINTY of that (where a surface found on this grid may really be).
    allowance = 0.5 + 0.5 * SURFACE_UNCERTAINTY
    clear_w = margin_mm + allowance * voxel_extent_along(frame.cc, ijk_to_ras)
    clear_v = margin_mm + allowance * voxel_extent_along(frame.ap, ijk_to_ras)
    clear_uv = margin_mm + 2.0 * allowance * _in_plane_half_footprint(frame, ijk_to_ras)
    depth = limits.v_ant - limits.v_post
    v_lo = limits.v_post + max(POSTERIOR_EXCLUDED * depth, clear_v)
    v_hi = limits.v_ant - clear_v
    if not v_hi > v_lo:
        return None
    v_samples = np.linspace(v_lo, v_hi, 25)
    top, bottom = limits.top(v_samples), limits.bottom(v_samples)
    quarter = 0.25 * (top - bottom)
    w_hi_all = top - np.maximum(quarter, clear_w)
    w_lo_all = bottom + np.maximum(quarter, clear_w)
    if not np.any(w_hi_all >= w_lo_all):
        return None
    w_lo, w_hi = float(w_lo_all.min()), float(w_hi_all.max())

    # One crop holds the body's cross-section over the ROI's heights, with room for its outline.
    pad = 2.0 + float(voxel_spacing(ijk_to_ras).max())
    half_width = 0.5 * limits.width + pad
    s_w = voxel_extent_along(frame.cc, ijk_to_ras)
    v_samples = np.linspace(limits.v_post - pad, limits.v_ant + pad, 25)
    tops, bottoms = limits.top(v_samples), limits.bottom(v_samples)
    centre_band = (0.25 * tops + 0.75 * bottoms, 0.75 * tops + 0.25 * bottoms)
    w_a = min(w_lo - clear_w, float(centre_band[0].min())) - s_w
    w_b = max(w_hi + clear_w, float(centre_band[1].max())) + s_w
    return _RoiReach(clear_w, clear_uv, v_lo, v_hi, s_w, limits.u_mid - half_width, limits.u_mid + half_width,
                     limits.v_post - pad, limits.v_ant + pad, w_a, w_b)


def _outline_distance(frame, limits: _BodyLimits, reach: _RoiReach, mask_f: np.ndarray,
                      ras_to_crop: np.ndarray) -> np.ndarray | None:
    """Lateral clearance: distance map (mm) of the body's cross-section, on a fine grid in the
    ``u, v`` plane over the crop's box (padded by one step); None when the section is empty. A
    column counts as inside when the body is there over the whole central half of its height
    (which follows a wedged or depressed endplate), so the endplates do not pass for walls."""
    step = OUTLINE_STEP_MM
    us = np.arange(reach.u_a, reach.u_b + 0.5 * step, step)
    vs = np.arange(reach.v_a, reach.v_b + 0.5 * step, step)
    uu, vv = np.meshgrid(us, vs, indexing="ij")
    mid = 0.5 * (limits.top(vv.ravel()) + limits.bottom(vv.ravel()))
    quarter_uv = 0.25 * (limits.top(vv.ravel()) - limits.bottom(vv.ravel()))
    n_w = max(3, int(np.ceil(2.0 * float(np.max(quarter_uv)) / max(1.0, 0.5 * reach.s_w))) + 1)
    plane = np.stack([uu.ravel(), vv.ravel(), np.zeros(uu.size)], axis=1)
    section = None
    for t in np.linspace(-1.0, 1.0, n_w):
        plane[:, 2] = mid + t * quarter_uv
        ijk = frame.to_ras(plane) @ ras_to_crop[:3, :3].T + ras_to_crop[:3, 3]
        occupancy = ndimage.map_coordinates(mask_f, ijk[:, ::-1].T, order=1, mode="constant", cval=0.0,
                                            prefilter=False)
        inside = occupancy.reshape(uu.shape) >= 0.5
        section = inside if section is None else section & inside
    parts, count = ndimage.label(section)
    if count == 0:
        return None
    centre_index = (int(round((limits.u_mid - reach.u_a) / step)),
                    int(round((0.5 * (reach.v_lo + reach.v_hi) - reach.v_a) / step)))
    keep = parts[centre_index]
    if keep == 0:
        keep = int(np.argmax(ndimage.sum_labels(section, parts, np.arange(1, count + 1)))) + 1
    section = np.pad(parts == keep, 1)
    return ndimage.distance_transform_edt(section, sampling=step) - 0.5 * step


def _roi_voxels(frame, limits: _BodyLimits, reach: _RoiReach, mask: np.ndarray, mask_f: np.ndarray,
                crop_to_ras: np.ndarray, ras_to_crop: np.ndarray, outline_distance: np.ndarray) -> np.ndarray | None:
    """The ROI on the crop: the body mask's voxels within the clearances (None when no voxel of
    the mask lies in the ROI's antero-posterior range)."""
    # Candidate voxels: body mask and AP range first (cheap), the rest on those voxels only.
    origin = frame.centre
    v = _axis_coordinate(frame.ap, origin, crop_to_ras, mask.shape)
    candidate = mask & (v >= reach.v_lo) & (v <= reach.v_hi)
    index = np.nonzero(candidate)
    if not len(index[0]):
        return None
    ijk = np.stack([index[2], index[1], index[0]], axis=1).astype(float)
    local = frame.to_local(ijk @ crop_to_ras[:3, :3].T + crop_to_ras[:3, 3])
    top_v, bottom_v = limits.top(local[:, 1]), limits.bottom(local[:, 1])
    quarter_v = 0.25 * (top_v - bottom_v)
    reach_w = np.maximum(quarter_v, reach.clear_w)
    keep = (local[:, 2] <= top_v - reach_w) & (local[:, 2] >= bottom_v + reach_w)
    grid_u = (local[:, 0] - reach.u_a) / OUTLINE_STEP_MM + 1.0  # +1: the pad
    grid_v = (local[:, 1] - reach.v_a) / OUTLINE_STEP_MM + 1.0
    lateral = ndimage.map_coordinates(outline_distance, np.stack([grid_u, grid_v]), order=1, mode="constant",
                                      cval=0.0, prefilter=False)
    keep &= lateral >= reach.clear_uv
    # The endplates between the height lines: the body mask must still be there ``clear_w`` above
    # and below the voxel (a depressed endplate can dip below the line through its three points).
    for sign in (1.0, -1.0):
        probe = local[keep].copy()
        probe[:, 2] += sign * reach.clear_w
        probe_ijk = frame.to_ras(probe) @ ras_to_crop[:3, :3].T + ras_to_crop[:3, 3]
        occupancy = ndimage.map_coordinates(mask_f, probe_ijk[:, ::-1].T, order=1, mode="constant", cval=0.0,
                                            prefilter=False)
        keep[np.flatnonzero(keep)[occupancy < 0.5]] = False
    roi = np.zeros(mask.shape, dtype=bool)
    roi[tuple(axis[keep] for axis in index)] = True
    return roi
