"""The partial-volume model of the voxels around an endplate (or a wall) and its least squares.

A bony surface ``w(v)`` in a vertebra's local frame (mm; ``w`` along the surface's normal axis,
``v`` across it) separates an outside tissue (the disc, or the soft tissue beyond a wall) from
the body. Each voxel's HU is modelled as its exact partial-volume mix of three tissues:

    ``HU = a·(1 - inside) + t·(inside - plate) + P·plate``

with ``inside`` the share of the voxel's volume beyond the surface (into the body) and ``plate``
the share within the cortical plate, ``cortex_mm`` thick just inside the surface; the shares come
from a box kernel along the surface's normal (:func:`.geometry.partial_volume_share`). ``a`` (the
outside tissue), ``t`` (trabecular bone) and ``P`` (the plate) are HU; for a fixed surface the
model is linear in them, so every candidate surface costs one small linear least-squares
problem (:func:`solve_linear`). The model is exact for a plane at any orientation to the grid,
which is what lets the fits place a surface to a fraction of a voxel.

This module holds the model, its linear algebra, the plane fit used for the walls
(:func:`fit_plane`) and the residual of an endplate as a function of the plate's HU
(:func:`plate_hu_residuals`); :mod:`.endplate_fit` fits a whole endplate profile with it.
"""

from __future__ import annotations

import numpy as np

from ..geometry import partial_volume_share, unit
from .frames import VertebraFrame

PLANE_SLOPES = np.arange(-0.3, 0.3 + 1e-9, 0.1)
"""Slopes (mm per mm) around its guess at which :func:`fit_plane` tries a plane."""


def surface_kernel(frame: VertebraFrame, slope: float, ijk_to_ras: np.ndarray):
    """The partial-volume share (:func:`.geometry.partial_volume_share`) of a surface rising by
    ``slope`` (mm of ``w`` per mm of ``v`` in ``frame``) as a function of a voxel centre's depth
    beyond it (mm along its normal ``cc - slope·ap``): the box kernel depends on the normal's
    direction to the grid, so every fit takes it from its surface's slope."""
    return partial_volume_share(unit(frame.cc - slope * frame.ap), ijk_to_ras)


def tissue_shares(cdf, depth: np.ndarray, cortex_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Each voxel's share ``inside`` the body and ``plate`` within the cortical plate of
    ``cortex_mm`` (mm) just inside the surface, for voxel centres ``depth`` (mm) inside it, from
    the share ``cdf`` (:func:`surface_kernel`): the two columns of the module's model."""
    inside = cdf(depth)
    return inside, inside - cdf(depth - cortex_mm)


def box_density(cdf, depth: np.ndarray, step: float = 0.01) -> np.ndarray:
    """Derivative of a partial-volume share (:func:`.geometry.partial_volume_share`) at
    ``depth`` (mm), by a central difference over ``step`` (mm): the share's kernel has no closed
    derivative, and the Jacobians of the endplate fits need one."""
    return (cdf(depth + step) - cdf(depth - step)) / (2.0 * step)


def tilt_shape(knots_v: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A profile's tilt: the line through ``-1`` at the first knot and ``+1`` at the last, at ``v``
    (mm, the profile's own axis); a move of the whole profile that a tilted endplate needs."""
    return 2.0 * (v - 0.5 * (knots_v[0] + knots_v[-1])) / max(knots_v[-1] - knots_v[0], 1e-6)


def natural_spline_basis(knots_v: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(len(v), len(knots_v))`` matrix whose product with knot values gives the natural cubic
    spline through them at ``v``, extended linearly beyond the end knots (its second derivative
    is zero there, so the extension is smooth). Lines are reproduced exactly. A profile is then
    linear in its knots, so a move of the knots moves every voxel's surface by a fixed column."""
    from scipy.interpolate import CubicSpline
    spline = CubicSpline(knots_v, np.eye(len(knots_v)), bc_type="natural")
    slope = spline.derivative()
    inner = np.clip(v, knots_v[0], knots_v[-1])
    return spline(inner) + (v - inner)[:, None] * slope(inner)


def solve_linear(columns: list[np.ndarray], target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares ``target ≈ Σ coef_i · columns_i`` for each row (candidate) of ``(K, N)``
    arrays, from the normal equations. Returns ``coef (K, m)`` and the residual sum of squares
    ``(K,)`` (inf where the system is singular). Batched over candidates because a line search
    evaluates dozens of surfaces at once."""
    m = len(columns)
    gram = np.empty((target.shape[0], m, m))
    columns = [np.broadcast_to(c, target.shape) for c in columns]
    for i, ci in enumerate(columns):
        for j in range(i, m):
            gram[:, i, j] = gram[:, j, i] = np.einsum("kn,kn->k", ci, columns[j])
    rhs = np.stack([np.einsum("kn,kn->k", c, target) for c in columns], axis=1)
    ok = np.abs(np.linalg.det(gram)) > 1e-9 * np.prod(np.diagonal(gram, axis1=1, axis2=2), axis=1)
    coef = np.zeros((target.shape[0], m))
    if ok.any():
        coef[ok] = np.linalg.solve(gram[ok], rhs[ok][..., None])[..., 0]
    residual = np.einsum("kn,kn->k", target, target) - (coef * rhs).sum(axis=1)  # |y|² − cᵀ Xᵀ y
    residual[~ok] = np.inf
    return coef, residual


def parabolic_minimum(values: np.ndarray, residual: np.ndarray) -> float:
    """Position of the smallest ``residual`` over equally spaced ``values``, refined by the
    parabola through it and its neighbours (unrefined at the grid's ends or beside an infinite
    residual): a grid search then places its minimum between grid points."""
    index = int(np.argmin(residual))
    best = float(values[index])
    if 0 < index < len(values) - 1 and np.all(np.isfinite(residual[index - 1:index + 2])):
        r0, r1, r2 = residual[index - 1:index + 2]
        curvature = r0 - 2 * r1 + r2
        if curvature > 0:
            best += 0.5 * (values[1] - values[0]) * (r0 - r2) / curvature
    return best


def tissue_model(values: np.ndarray, inside: np.ndarray, plate: np.ndarray, plate_hu: float | None,
                 disc_hu: float | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Columns and target of the linear least-squares problem of the module's model for voxel
    ``values`` (HU) with shares ``inside`` (beyond the surface) and ``plate`` (within the cortical
    plate): with ``plate_hu`` known,
    ``values - plate_hu·plate [- disc_hu·(1 - inside)] ≈ [a·(1 - inside)] + t·(inside - plate)``;
    with ``plate_hu`` None, ``values [- disc_hu] ≈ [a] + b·inside + c·plate``. The disc's term is
    a column (first) unless ``disc_hu`` fixes it; the trabecular (or plate) term is the last.
    Known HU move to the target so that only the unknown ones are solved for."""
    outside = 1.0 - inside
    if plate_hu is None:
        columns = ([] if disc_hu is not None else [np.ones_like(inside)]) + [inside, plate]
        return columns, values - (disc_hu if disc_hu is not None else 0.0)
    target = values - plate_hu * plate
    if disc_hu is not None:
        return [inside - plate], target - disc_hu * outside
    return [outside, inside - plate], target


def fit_plane(values: np.ndarray, local: np.ndarray, direction: int, edge_guess: float, v_centre: float,
              slope_guess: float, frame: VertebraFrame, ijk_to_ras: np.ndarray, cortex_mm: float,
              search: float, slopes: np.ndarray = PLANE_SLOPES) -> tuple[float, float, float]:
    """Outer surface of a plane bony surface, fitted to the CT values of the voxels around it.

    ``values`` are the HU of voxels whose centres have local coordinates ``local`` (N, 3, mm in
    ``frame``); ``direction`` is +1 when the body lies below the surface along ``frame.cc``, -1
    above. The surface is a plane ``w = e + g (v - v_centre)``; each voxel's HU is the module's
    model with ``HU = a + b·inside + c·plate`` (the plate's HU ``a + b + c`` free).
    ``a, b, c`` are solved by least squares for each ``(e, g)`` on a grid of 0.1 mm within
    ``search`` of ``edge_guess`` (``g`` at ``slope_guess + slopes``); the best fit wins, its ``e``
    refined by a parabola. Returns ``(e, g, plate HU)`` (mm, mm per mm, HU), or NaNs when no fit
    has a bright plate (``c > 0``) or fewer than 8 voxels are given. Used for the body's walls,
    which are nearly plane over the short stretch fitted."""
    if len(values) < 8:
        return float("nan"), float("nan"), float("nan")
    step = 0.1
    edges = edge_guess + np.arange(-search, search + 1e-9, step)
    best = (float("nan"), float("nan"), np.inf, float("nan"))
    for slope in slope_guess + np.asarray(slopes, dtype=float):
        cdf = surface_kernel(frame, slope, ijk_to_ras)
        scale = 1.0 / np.sqrt(1.0 + slope * slope)
        plane = local[:, 2] - slope * (local[:, 1] - v_centre)  # w measured along the plane's offset
        depth = direction * (edges[:, None] - plane[None, :]) * scale  # distance inside the body, mm
        inside, plate = tissue_shares(cdf, depth, cortex_mm)
        coef, residual = solve_linear([np.ones_like(inside), inside, plate], np.broadcast_to(values, inside.shape))
        residual[~(coef[:, 2] > 0)] = np.inf
        index = int(np.argmin(residual))
        if residual[index] < best[2]:
            best = (parabolic_minimum(edges, residual), float(slope), float(residual[index]), float(coef[index].sum()))
    return best[0], best[1], best[3]


def plate_hu_residuals(values: np.ndarray, local: np.ndarray, direction: int, knots_v: np.ndarray,
                       knots: np.ndarray, frame: VertebraFrame, ijk_to_ras: np.ndarray, cortex_mm: float,
                       search: float, plate_hus: np.ndarray, tilt_search: float = 0.0) -> np.ndarray:
    """Residual sum of squares (HU²) of one endplate's model (disc and trabecular HU free) for each
    plate HU in ``plate_hus``, minimised over shifts of the profile ``knots`` (``w`` at
    ``knots_v``, local mm; a natural spline through them) within ``search`` mm and tilts moving
    its end knots by up to ``tilt_search`` mm (0.1 mm steps). Returns an array like ``plate_hus``.
    ``direction`` is +1 for a superior endplate, -1 for an inferior one.

    The plate's HU ``P`` enters the model linearly, so one set of sums per shift gives the
    residual of every ``P``: for ``y' = y - P·plate`` the 2x2 normal equations of
    ``a·(1 - inside) + t·(inside - plate)``. That makes the exam's joint fit of ``P`` over all
    its endplates cheap."""
    order = np.argsort(knots_v)
    kv, kw = np.asarray(knots_v, dtype=float)[order], np.asarray(knots, dtype=float)[order]
    v, w = local[:, 1], local[:, 2]
    slopes = np.diff(kw) / np.diff(kv)
    segment = np.clip(np.searchsorted(kv, v) - 1, 0, len(kv) - 2)
    cdf = surface_kernel(frame, float(np.mean(slopes)), ijk_to_ras)
    steps = np.arange(-search, search + 1e-9, 0.1)
    tilts = np.arange(-tilt_search, tilt_search + 1e-9, 0.1) if tilt_search > 0 else np.zeros(1)
    moves = (steps[:, None, None] + tilts[None, :, None] * tilt_shape(kv, v)[None, None, :]).reshape(-1, len(v))
    surface = natural_spline_basis(kv, v) @ kw
    depth = (direction / np.sqrt(1.0 + slopes[segment] ** 2)) * (surface[None, :] + moves - w[None, :])
    inside, plate = tissue_shares(cdf, depth, cortex_mm)
    disc, bone = 1.0 - inside, inside - plate
    y = values.astype(float)
    s_dd, s_db, s_bb = (disc * disc).sum(axis=1), (disc * bone).sum(axis=1), (bone * bone).sum(axis=1)
    s_dp, s_bp, s_pp = (disc * plate).sum(axis=1), (bone * plate).sum(axis=1), (plate * plate).sum(axis=1)
    s_dy, s_by, s_py, s_yy = disc @ y, bone @ y, plate @ y, y @ y
    P = np.asarray(plate_hus, dtype=float)[None, :]
    # y' = y - P·plate, per shift (rows) and plate HU (columns)
    t_d = s_dy[:, None] - P * s_dp[:, None]
    t_b = s_by[:, None] - P * s_bp[:, None]
    tt = s_yy - 2.0 * P * s_py[:, None] + P * P * s_pp[:, None]
    det = s_dd * s_bb - s_db * s_db
    ok = det > 1e-9 * np.maximum(s_dd * s_bb, 1e-12)
    det = np.where(ok, det, 1.0)[:, None]
    a = (s_bb[:, None] * t_d - s_db[:, None] * t_b) / det
    t = (s_dd[:, None] * t_b - s_db[:, None] * t_d) / det
    rss = tt - a * t_d - t * t_b
    rss[~ok] = np.inf
    return rss.min(axis=0)
