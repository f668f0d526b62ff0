"""The sagittal picture plane of the QC picture: a reformat of the CT along the spine.

:func:`spine_reformat` samples the CT on a surface through the spine's centre line (a cubic
spline through the vertebral body centres, parameterised by arc length and extended straight
beyond the end vertebrae) and returns a :class:`SpineReformat`: the image in HU and the mapping
between RAS millimetres and image pixels (both ways). Two geometries:

- ``"curved"`` (default), a *projected curved planar reformat*: image coordinates are
  millimetres in the spine's best sagittal plane (spanned by the mean antero-posterior axis and
  the chord from the first to the last body centre); the surface sampled is that plane shifted,
  row by row, left or right so that it passes through the centre line. Sagittal curvature
  (lordosis, kyphosis) is shown as it is and in-plane lengths are true; a scoliosis is followed
  sideways, so every body is cut through its mid-sagittal plane (heights appear shortened by
  the cosine of the vertebra's coronal tilt only).
- ``"straightened"``: rows are arc length along the centre line, columns the offset along each
  point's own antero-posterior axis (from the vertebrae's frames, orthogonalised to the
  tangent). The bodies stand in one straight column, but lengths at an offset ``a`` from the
  centre line are scaled by ``1 / (1 + κ a)`` for a curvature ``κ``: in a lordosis the anterior
  heights look a few per cent shorter and the posterior ones longer (about 6 % each way at
  14 mm from the centre line of a lumbar lordosis), which mimics a wedge. Used on request, or
  when the centre line turns back along its chord (the curved geometry needs it to progress
  monotonically from the first to the last centre).

Only the strip of the CT around the surface is read (trilinear interpolation,
``scipy.ndimage.map_coordinates`` on a view of the bounding box of the sample points; the CT is
never copied or converted as a whole). An optional thin slab (``slab_mm``) averages a few
surfaces across the left-right direction to reduce noise.

:func:`scan_sagittal_axis` gives the scan's own cranio-caudal axis, for a scan too short to carry a
centre line (the QC picture then samples the scan's own sagittal plane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline


def _unit_rows(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


@dataclass
class _CentreLine:
    """The centre line sampled every ``step`` mm of arc length ``s`` (0 at the first centre,
    increasing caudally), with unit caudal tangents and antero-posterior / right axes."""

    s: np.ndarray
    points: np.ndarray
    tangent: np.ndarray  # caudal
    ap: np.ndarray
    lr: np.ndarray
    s_centres: np.ndarray


def _centre_line(centres: np.ndarray, ap: np.ndarray, cc0: np.ndarray | None, extend_mm: float,
                 step: float) -> _CentreLine:
    """Cubic spline (natural) through the centres in the chord-length parameter, resampled by arc
    length, extended straight along the end tangents by ``extend_mm``."""
    n = len(centres)
    if n == 1:
        caudal = -_unit_rows(np.asarray(cc0 if cc0 is not None else (0.0, 0.0, 1.0), float))
        arc_dense = np.array([0.0])
        pts_dense = centres.copy()
        tan_dense = caudal[None, :]
        s_centres = np.array([0.0])
    else:
        chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(centres, axis=0), axis=1))])
        count = max(2, int(math.ceil(chord[-1] / 0.1)) + 1)
        tt = np.linspace(0.0, chord[-1], count)
        if n == 2:
            pts_dense = centres[0] + np.outer(tt / chord[-1], centres[1] - centres[0])
            tan_dense = np.repeat(_unit_rows(centres[1] - centres[0])[None, :], count, axis=0)
        else:
            spline = CubicSpline(chord, centres, bc_type="natural", axis=0)
            pts_dense = spline(tt)
            tan_dense = _unit_rows(spline(tt, 1))
        arc_dense = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts_dense, axis=0), axis=1))])
        s_centres = np.interp(chord, tt, arc_dense)
    length = arc_dense[-1]
    s = np.arange(-extend_mm, length + extend_mm + 0.5 * step, step)
    inside = (s >= 0.0) & (s <= length)
    points = np.empty((len(s), 3))
    tangent = np.empty((len(s), 3))
    for d in range(3):
        points[inside, d] = np.interp(s[inside], arc_dense, pts_dense[:, d])
        tangent[inside, d] = np.interp(s[inside], arc_dense, tan_dense[:, d])
    before, after = s < 0.0, s > length
    points[before] = pts_dense[0] + np.outer(s[before], tan_dense[0])
    tangent[before] = tan_dense[0]
    points[after] = pts_dense[-1] + np.outer(s[after] - length, tan_dense[-1])
    tangent[after] = tan_dense[-1]
    tangent = _unit_rows(tangent)
    ap_s = np.stack([np.interp(s, s_centres, ap[:, d]) for d in range(3)], axis=1)
    ap_s = _unit_rows(ap_s - np.sum(ap_s * tangent, axis=1, keepdims=True) * tangent)
    lr_s = np.cross(tangent, ap_s)  # lr = ap x cc with cc = -tangent
    return _CentreLine(s, points, tangent, ap_s, lr_s, s_centres)


@dataclass
class SpineReformat:
    """A sagittal reformat along the spine.

    ``image``: float32 HU, shape ``(rows, cols)``, NaN outside the CT; row 0 is cranial, column 0
    anterior (radiological sagittal convention: the patient faces left). ``pixel_mm``: the side
    of the square pixels. Pixel ``(row, col)`` has its centre at ``(col, row) * pixel_mm`` in the
    picture's millimetre coordinates. ``mode``: ``"curved"`` or ``"straightened"`` (see the
    module docstring). ``slab_mm``: thickness averaged across the surface."""

    image: np.ndarray
    pixel_mm: float
    mode: str
    slab_mm: float
    _curve: _CentreLine = field(repr=False)
    _plane: dict | None = field(default=None, repr=False)
    _a_left: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def image_to_ras(self, rows, cols, offset_mm=0.0) -> np.ndarray:
        """RAS (mm) of continuous pixel coordinates, ``offset_mm`` to the patient's right of the
        sampled surface. Broadcasts; returns shape ``(..., 3)``."""
        rows, cols, offset = np.broadcast_arrays(np.asarray(rows, float), np.asarray(cols, float),
                                                 np.asarray(offset_mm, float))
        px = self.pixel_mm
        if self._plane is None:
            c = self._curve
            s = c.s[0] + rows * px
            a = self._a_left - cols * px
            point = _interp_rows(c.points, c.s, s, extrapolate=True)
            ap = _interp_rows(c.ap, c.s, s)
            lr = _interp_rows(c.lr, c.s, s)
            return point + a[..., None] * ap + offset[..., None] * lr
        p = self._plane
        y = p["y_top"] - rows * px
        x = p["x_left"] - cols * px
        t = np.interp(y, p["y_curve"], p["t_curve"])
        return (p["origin"] + x[..., None] * p["ap"] + y[..., None] * p["si"]
                + (t + offset)[..., None] * p["lr"])

    def ras_to_image(self, ras) -> np.ndarray:
        """Continuous pixel coordinates ``(row, col)`` of RAS points (shape ``(..., 3)`` →
        ``(..., 2)``): the point is projected on the sampled surface along the left-right
        direction (curved) or onto the centre line's normal plane (straightened)."""
        return self._map(ras)[..., :2]

    def offset_mm(self, ras) -> np.ndarray:
        """Signed distance (mm, positive to the patient's right) of RAS points from the sampled
        surface."""
        return self._map(ras)[..., 2]

    def _map(self, ras) -> np.ndarray:
        ras = np.asarray(ras, float)
        flat = ras.reshape(-1, 3)
        px = self.pixel_mm
        if self._plane is None:
            c = self._curve
            from scipy.spatial import cKDTree

            _, index = cKDTree(c.points).query(flat)
            s = c.s[index] + np.sum((flat - c.points[index]) * c.tangent[index], axis=1)
            # Refine: the point's row is where it lies in the plane of that row's AP and LR axes.
            for _ in range(2):
                point = _interp_rows(c.points, c.s, s, extrapolate=True)
                normal = _unit_rows(np.cross(_interp_rows(c.ap, c.s, s), _interp_rows(c.lr, c.s, s)))
                s = s + np.sum((flat - point) * normal, axis=1) / np.maximum(
                    np.sum(_interp_rows(c.tangent, c.s, s) * normal, axis=1), 0.5)
            point = _interp_rows(c.points, c.s, s, extrapolate=True)
            rel = flat - point
            a = np.sum(rel * _interp_rows(c.ap, c.s, s), axis=1)
            n = np.sum(rel * _interp_rows(c.lr, c.s, s), axis=1)
            out = np.stack([(s - c.s[0]) / px, (self._a_left - a) / px, n], axis=1)
        else:
            p = self._plane
            rel = flat - p["origin"]
            x, y, z = rel @ p["ap"], rel @ p["si"], rel @ p["lr"]
            t = np.interp(y, p["y_curve"], p["t_curve"])
            out = np.stack([(p["y_top"] - y) / px, (p["x_left"] - x) / px, z - t], axis=1)
        return out.reshape(ras.shape[:-1] + (3,))


def _interp_rows(values: np.ndarray, s_grid: np.ndarray, s, extrapolate: bool = False) -> np.ndarray:
    """Linear interpolation of per-sample vectors ``values`` (n, 3) on the uniform grid
    ``s_grid`` at ``s`` (any shape); constant (or linear, with ``extrapolate``) beyond the ends."""
    s = np.asarray(s, float)
    step = s_grid[1] - s_grid[0] if len(s_grid) > 1 else 1.0
    f = (s - s_grid[0]) / step
    last = len(s_grid) - 1
    if last == 0:
        return np.broadcast_to(values[0], s.shape + (3,)).copy()
    i0 = np.clip(np.floor(f).astype(int), 0, last - 1)
    w = f - i0
    if not extrapolate:
        w = np.clip(w, 0.0, 1.0)
    return values[i0] * (1.0 - w)[..., None] + values[i0 + 1] * w[..., None]


def _sample_kji(ct: np.ndarray, kji: np.ndarray) -> np.ndarray:
    """Trilinear HU (float32) at continuous voxel indices ``(N, 3)`` in ``(k, j, i)`` order; NaN
    outside the grid (beyond its first or last voxel centre). Reads only the bounding box of the
    points (a view of ``ct``: the volume is never copied or converted as a whole)."""
    out = np.full(len(kji), np.nan, dtype=np.float32)
    upper = np.asarray(ct.shape) - 1
    inside = np.all((kji >= -1e-6) & (kji <= upper + 1e-6), axis=1)  # False for NaN
    if not inside.any():
        return out
    points = kji[inside]
    lo = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, np.asarray(ct.shape))
    crop = ct[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    out[inside] = ndimage.map_coordinates(crop, (points - lo).T, order=1, mode="nearest", output=np.float32,
                                          prefilter=False)
    return out


def spine_reformat(
    ct: np.ndarray,
    ijk_to_ras: np.ndarray,
    centres_ras,
    ap_ras,
    *,
    cc_ras=None,
    mode: str = "curved",
    pixel_mm: float = 0.75,
    anterior_mm: float = 45.0,
    posterior_mm: float = 80.0,
    extend_mm: float | None = None,
    slab_mm: float = 3.0,
) -> SpineReformat:
    """Sagittal reformat of ``ct`` along the spine (see the module docstring).

    ``ct``: HU array ``[k, j, i]`` (any numeric dtype; read, never copied as a whole);
    ``ijk_to_ras``: its 4x4 grid matrix (mm; any spacing, oblique grids allowed);
    ``centres_ras``: ``(n, 3)`` vertebral body centres **ordered cranial to caudal**;
    ``ap_ras``: ``(n, 3)`` their antero-posterior unit axes (pointing anterior);
    ``cc_ras``: the superior axis of the vertebra, only used when ``n == 1``;
    ``mode``: ``"curved"`` (projected curved planar reformat, true in-plane lengths) or
    ``"straightened"``; ``pixel_mm``: pixel size; ``anterior_mm`` / ``posterior_mm``: how far
    the picture reaches in front of and behind the centre line; ``extend_mm``: how far beyond the
    first and last centre (default three quarters of the median spacing of the centres, at least
    15 mm); ``slab_mm``: left-right thickness averaged (0 for a single surface).
    """
    if mode not in ("curved", "straightened"):
        raise ValueError(f"mode must be 'curved' or 'straightened', not {mode!r}")
    if np.ndim(ct) != 3:
        raise ValueError("ct must be a 3-D array [k, j, i]")
    if not pixel_mm > 0:
        raise ValueError("pixel_mm must be positive")
    centres, ap = _distinct_centres(centres_ras, ap_ras)
    if extend_mm is None:
        gaps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        extend_mm = max(15.0, 0.75 * float(np.median(gaps))) if len(gaps) else 25.0
    cc0 = None if cc_ras is None else np.asarray(cc_ras, float).reshape(-1, 3)[0]
    curve = _centre_line(centres, ap, cc0, float(extend_mm), float(pixel_mm))
    result = _empty_reformat(curve, centres, mode, float(pixel_mm), float(anterior_mm), float(posterior_mm),
                             float(slab_mm))
    result.image = _sample_surfaces(ct, ijk_to_ras, result, _slab_offsets(slab_mm, float(pixel_mm)))
    return result


def _distinct_centres(centres_ras, ap_ras) -> tuple[np.ndarray, np.ndarray]:
    """The centres (n, 3) and unit AP axes, checked, without repeated centres (closer than 1 µm to
    the previous one kept): a zero-length chord would break the spline's parameter."""
    centres = np.asarray(centres_ras, float).reshape(-1, 3)
    ap = np.asarray(ap_ras, float).reshape(-1, 3)
    if len(centres) == 0 or len(ap) != len(centres):
        raise ValueError("one antero-posterior axis per centre is needed, and at least one centre")
    if not (np.all(np.isfinite(centres)) and np.all(np.isfinite(ap))):
        raise ValueError("centres and axes must be finite")
    keep = [0]
    for i in range(1, len(centres)):
        if np.linalg.norm(centres[i] - centres[keep[-1]]) > 1e-3:
            keep.append(i)
    return centres[keep], _unit_rows(ap[keep])


def _empty_reformat(curve: _CentreLine, centres: np.ndarray, mode: str, px: float, anterior_mm: float,
                    posterior_mm: float, slab_mm: float) -> SpineReformat:
    """The reformat's geometry with an image of the right shape still to fill (all NaN): curved
    when asked for and the centre line progresses along its chord, straightened otherwise. Rows
    span the centre line (extended), columns ``anterior_mm`` in front of it to ``posterior_mm``
    behind it, in ``px`` mm pixels."""
    plane = _projection_plane(curve, centres) if mode == "curved" else None
    if plane is None:
        cols = int(math.floor((anterior_mm + posterior_mm) / px)) + 1
        image = np.full((len(curve.s), cols), np.nan, np.float32)
        return SpineReformat(image, px, "straightened", slab_mm, curve, None, anterior_mm)
    x_curve = (curve.points - plane["origin"]) @ plane["ap"]
    plane["x_left"] = float(x_curve.max() + anterior_mm)
    x_right = float(x_curve.min() - posterior_mm)
    cols = int(math.floor((plane["x_left"] - x_right) / px)) + 1
    rows = int(math.floor((plane["y_top"] - plane["y_bottom"]) / px)) + 1
    return SpineReformat(np.full((rows, cols), np.nan, np.float32), px, mode, slab_mm, curve, plane, 0.0)


def _sample_surfaces(ct: np.ndarray, ijk_to_ras: np.ndarray, reformat: SpineReformat,
                     offsets: np.ndarray) -> np.ndarray:
    """The reformat's image (float32 HU, NaN outside the CT): the mean of the CT sampled on its
    surface moved by each of ``offsets`` (mm) along the left-right axis, per row in the
    straightened geometry, of finite samples only."""
    rows, cols = reformat.shape
    rr, cc = np.meshgrid(np.arange(rows, dtype=float), np.arange(cols, dtype=float), indexing="ij")
    ras_to_ijk = np.linalg.inv(np.asarray(ijk_to_ras, float))[:3]
    kji = (reformat.image_to_ras(rr, cc).reshape(-1, 3) @ ras_to_ijk[:, :3].T + ras_to_ijk[:, 3])[:, ::-1]
    plane = reformat._plane
    lr = plane["lr"][None, :] if plane is not None else np.repeat(reformat._curve.lr, cols, axis=0)
    step_kji = (lr @ ras_to_ijk[:, :3].T)[:, ::-1]
    total = np.zeros(rows * cols, np.float32)
    count = np.zeros(rows * cols, np.float32)
    for offset in offsets:
        values = _sample_kji(ct, kji + offset * step_kji if offset else kji)
        finite = np.isfinite(values)
        total[finite] += values[finite]
        count[finite] += 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        image = np.where(count > 0, total / np.maximum(count, 1.0), np.nan).astype(np.float32)
    return image.reshape(rows, cols)


def _slab_offsets(slab_mm: float, px: float) -> np.ndarray:
    if not slab_mm > 0:
        return np.zeros(1)
    m = min(9, max(2, int(math.ceil(slab_mm / px)) + 1))
    return np.linspace(-0.5 * slab_mm, 0.5 * slab_mm, m)


def _projection_plane(curve: _CentreLine, centres: np.ndarray) -> dict | None:
    """The best sagittal plane of the curved reformat, or None when the centre line does not
    progress monotonically along its chord (then the straightened geometry is used)."""
    if len(centres) > 1:
        si = _unit_rows(centres[0] - centres[-1])
    else:
        si = -curve.tangent[0]
    ap = curve.ap.mean(axis=0)
    ap = ap - (ap @ si) * si
    if np.linalg.norm(ap) < 1e-6:
        return None
    ap = _unit_rows(ap)
    lr = np.cross(ap, si)
    origin = centres.mean(axis=0)
    rel = curve.points - origin
    y = rel @ si
    if len(y) > 1 and not np.all(np.diff(y) < 0):  # must descend caudally
        return None
    return {"origin": origin, "ap": ap, "si": si, "lr": lr,
            "y_curve": y[::-1].copy(), "t_curve": (rel @ lr)[::-1].copy(),
            "y_top": float(y[0]), "y_bottom": float(y[-1])}


def scan_sagittal_axis(shape, ijk_to_ras, near_ras) -> tuple[np.ndarray, np.ndarray, float]:
    """The scan's own cranio-caudal axis: the normal (pointing superior, RAS) of the planes of
    constant index along the grid axis closest to superior, the point on that axis through
    ``near_ras`` halfway between the scan's first and last planes, and the distance (mm) between
    the centres of those planes."""
    columns = np.asarray(ijk_to_ras, float)[:3, :3]
    axis = int(np.argmax(np.abs(columns[2]) / np.linalg.norm(columns, axis=0)))  # numpy order i, j, k
    others = [d for d in range(3) if d != axis]
    superior = np.cross(columns[:, others[0]], columns[:, others[1]])
    superior = superior / np.linalg.norm(superior) * (1.0 if superior[2] >= 0 else -1.0)
    count = int(shape[::-1][axis])  # shape is (k, j, i)
    reach = (count - 1) * float(columns[:, axis] @ superior)
    origin = np.asarray(ijk_to_ras, float)[:3, 3]
    first, last = sorted((float(origin @ superior), float(origin @ superior) + reach))
    near = np.asarray(near_ras, float)
    centre = near + (0.5 * (first + last) - near @ superior) * superior
    return centre, superior, last - first
