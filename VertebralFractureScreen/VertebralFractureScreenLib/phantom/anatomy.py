"""Anatomy of the synthetic spine phantom: level dimensions, the spine curve and vertebra frames.

Everything here is in the phantom's *anatomy frame*: millimetres, axes x → patient right,
y → anterior, z → superior (RAS-aligned before the whole-anatomy rotation is applied).

The spine is a smooth curve ``c(s)`` parameterised by arc length ``s`` (mm, increasing cranially).
Its tangent leans anteriorly by the sagittal angle ``theta(s)`` and to the right by the coronal
angle ``phi(s)``. Lordosis and kyphosis are constant-curvature arcs over the lumbar and
thoracic spine; scoliosis is a sinusoidal coronal curve. Each vertebra is a rigid body centred
on the curve, in the curve's frame at its centre:

* ``e_cc`` — cranio-caudal axis (the curve tangent, pointing superior),
* ``e_ap`` — antero-posterior axis (pointing anterior, i.e. away from the spinal canal),
* ``e_lr`` — left-right axis (pointing to the patient's right), ``e_lr = e_ap × e_cc``.

Body dimensions are the nominal adult ones of :mod:`.anatomy`; the posterior elements' are
typical lumbar or thoracic values (they only need to be plausible).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from ..anatomy import NormalBody, normal_body
from ..levels import LEVELS, level_position

# Physiological anterior/posterior height ratio Ha/Hp of normal vertebrae: mild wedging at the
# thoraco-lumbar junction and in the mid-thoracic kyphosis, and L5's short posterior wall
# (Ha > Hp). These are the known false-positive sources for morphometry (SPEC §4).
PHYSIOLOGICAL_HA_HP = {
    "T6": 0.95, "T7": 0.94, "T8": 0.94, "T9": 0.95,
    "T11": 0.93, "T12": 0.91, "L1": 0.93,
    "L5": 1.14,
}


@dataclass(frozen=True)
class LevelDimensions(NormalBody):
    """Nominal size of one vertebra (mm): its body's, inherited from :class:`..anatomy.NormalBody`
    (the base module declares the normal body dimensions once), its posterior elements' and its
    normal anterior/posterior height ratio."""

    canal_half_width_mm: float
    canal_half_depth_mm: float
    pedicle_width_mm: float
    lamina_thickness_mm: float
    spinous_length_mm: float
    transverse_length_mm: float
    normal_ha_hp: float


@lru_cache(maxsize=None)
def level_dimensions(level: str) -> LevelDimensions:
    """Nominal dimensions of ``level``: the body's from :func:`..anatomy.normal_body`, the
    posterior elements' lumbar or thoracic. A sixth lumbar vertebra (``L6``) is shaped as L5."""
    lumbar = level.startswith(("L", "S"))
    like = "L5" if level == "L6" else level
    return LevelDimensions(
        **{**asdict(normal_body(like)), "level": level},
        canal_half_width_mm=11.0 if lumbar else 8.0,
        canal_half_depth_mm=8.0 if lumbar else 7.5,
        pedicle_width_mm=9.0 if lumbar else 7.0,
        lamina_thickness_mm=6.0 if lumbar else 5.0,
        spinous_length_mm=28.0 if lumbar else 30.0,
        transverse_length_mm=18.0 if lumbar else 20.0,
        normal_ha_hp=PHYSIOLOGICAL_HA_HP.get(like, 1.0),
    )


class SpineCurve:
    """The spine's centre line ``c(s)`` and its moving frame, sampled every ``step_mm``.

    ``s`` is arc length in mm, increasing cranially, with ``s = 0`` at the centre of L3 (or of
    the level given as ``origin_level``). Sagittal and coronal angles are integrated from
    constant curvatures: ``lordosis_deg`` is the change of the sagittal angle from the L1 to the
    S1 body centre, ``kyphosis_deg`` from T12 to T4; ``scoliosis_deg`` is the peak-to-peak
    coronal angle of a single sinusoidal curve centred on ``scoliosis_apex``.
    """

    def __init__(
        self,
        level_centres_s: dict[str, float],
        lordosis_deg: float = 40.0,
        kyphosis_deg: float = 35.0,
        scoliosis_deg: float = 0.0,
        scoliosis_apex: str = "T12",
        s_range: tuple[float, float] = (-300.0, 650.0),
        step_mm: float = 0.25,
    ):
        self.s = np.arange(s_range[0], s_range[1] + step_mm, step_mm)
        centre = level_centres_s
        # Sagittal angle theta(s): anterior lean of the tangent (radians). Lumbar lordosis:
        # the angle decreases going cranially (apex anterior); thoracic kyphosis: it increases.
        s_l1, s_s1 = centre["L1"], centre["S1"]
        s_t4, s_t12 = centre["T4"], centre["T12"]
        kappa_lumbar = -np.deg2rad(lordosis_deg) / (s_l1 - s_s1)
        kappa_thoracic = np.deg2rad(kyphosis_deg) / (s_t4 - s_t12)
        curvature = np.where(
            (self.s >= s_s1) & (self.s <= s_l1),
            kappa_lumbar,
            np.where((self.s >= s_t12) & (self.s <= s_t4), kappa_thoracic, 0.0),
        )
        theta = _cumulative_integral(curvature, step_mm)
        theta -= np.interp(centre["L3"], self.s, theta)  # L3 stands upright: lordosis apex
        # Coronal angle phi(s): a half sine wave over +-2 levels' spans around the apex.
        s_apex = centre[scoliosis_apex]
        half_span = 120.0
        phase = np.clip((self.s - s_apex) / half_span, -1.0, 1.0)
        phi = np.deg2rad(scoliosis_deg) / 2.0 * np.sin(np.pi / 2.0 * phase)

        tangent = np.stack([np.sin(phi), np.cos(phi) * np.sin(theta), np.cos(phi) * np.cos(theta)], axis=1)
        points = np.zeros_like(tangent)
        points[:, 0] = _cumulative_integral(tangent[:, 0], step_mm)
        points[:, 1] = _cumulative_integral(tangent[:, 1], step_mm)
        points[:, 2] = _cumulative_integral(tangent[:, 2], step_mm)
        points -= np.array([np.interp(0.0, self.s, points[:, a]) for a in range(3)])
        anterior = np.array([0.0, 1.0, 0.0])
        e_ap = anterior[None, :] - (tangent @ anterior)[:, None] * tangent
        e_ap /= np.linalg.norm(e_ap, axis=1, keepdims=True)
        e_lr = np.cross(e_ap, tangent)
        self.points = points
        self.e_cc = tangent
        self.e_ap = e_ap
        self.e_lr = e_lr
        self.step_mm = step_mm
        # Derivative of the tangent, for the volume element of tube coordinates.
        self.dtangent = np.gradient(tangent, step_mm, axis=0)
        # Tables that tube_coordinates interpolates, transposed (one gather per interpolation, and
        # arithmetic on contiguous rows): the curve's point and tangent with their slopes per
        # interval; its point, e_ap and e_lr with the next sample's.
        point_tangent = np.concatenate([self.points, self.e_cc], axis=1)
        self._newton_rows = np.ascontiguousarray(np.concatenate(
            [point_tangent[:-1], (point_tangent[1:] - point_tangent[:-1]) / step_mm], axis=1).T)
        self._frame_rows = _with_next(np.concatenate([self.points, self.e_ap, self.e_lr], axis=1))

    def sample(self, s: np.ndarray, table: np.ndarray) -> np.ndarray:
        """Linearly interpolate a per-sample ``(n, c)`` table at arc lengths ``s`` (clamped to the
        sampled range). The samples are uniform, so the index is arithmetic, not a search."""
        x, index = self._interval(np.asarray(s, dtype=float))
        weight = (x - index)[..., None]
        return table[index] * (1.0 - weight) + table[index + 1] * weight

    def _interval(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Arc lengths ``s`` (clamped to the sampled range) in sample steps from the first sample,
        and the index of the interval each lies in."""
        x = (np.clip(s, self.s[0], self.s[-1]) - self.s[0]) / self.step_mm
        return x, np.minimum(x.astype(np.intp), len(self.s) - 2)

    def _sample_rows(self, s: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """:meth:`sample` of a table given as :func:`_with_next` of it: ``(c, N)``."""
        x, index = self._interval(s)
        weight = x - index
        both = rows[:, index]
        width = len(rows) // 2
        return both[:width] * (1.0 - weight) + both[width:] * weight

    def local_frame(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The interpolated curve's point and tangent ``(6, N)`` at arc lengths ``s``, and their
        derivatives along ``s`` ``(6, N)``."""
        x, index = self._interval(s)
        rows = self._newton_rows[:, index]
        slope = rows[6:]
        return rows[:6] + slope * ((x - index) * self.step_mm), slope

    def newton_step(self, x, y, z, s, value, slope) -> np.ndarray:
        """One Newton step for the foot points of points ``(x, y, z)`` from arc lengths ``s``,
        given :meth:`local_frame` at ``s`` (or at nearby arc lengths, for a prediction)."""
        dx, dy, dz = x - value[0], y - value[1], z - value[2]
        g = dx * value[3] + dy * value[4] + dz * value[5]
        dg = (dx * slope[3] + dy * slope[4] + dz * slope[5]
              - (slope[0] * value[3] + slope[1] * value[4] + slope[2] * value[5]))
        return np.clip(s - g / dg, self.s[0], self.s[-1])

    def frame(self, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Centre ``c(s)`` and unit axes ``(e_lr, e_ap, e_cc)`` at one arc length, orthonormalised."""
        c = self.sample(np.array([s]), self.points)[0]
        cc = self.sample(np.array([s]), self.e_cc)[0]
        cc /= np.linalg.norm(cc)
        ap = self.sample(np.array([s]), self.e_ap)[0]
        ap -= (ap @ cc) * cc
        ap /= np.linalg.norm(ap)
        lr = np.cross(ap, cc)
        return c, lr, ap, cc

    def tube_coordinates(self, q: np.ndarray, iterations: int = 5,
                         start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arc length ``s`` of the foot point on the curve and the offsets ``(n_ap, n_lr)`` (mm) of
        anatomy-frame points ``q`` (N, 3) in the plane normal to the curve there.

        Newton iterations on ``g(s) = (q - c(s)) · t(s) = 0`` (with the curve's point and
        tangent interpolated linearly between samples, and their exact derivatives) from a guess
        by height, or from ``start`` (arc lengths within a few millimetres of the answer: three
        iterations then reach it to rounding); valid for offsets well below the radius of
        curvature (≥ 250 mm for the default curves).
        """
        q = np.asarray(q, dtype=float)
        if start is None:
            s = np.interp(q[:, 2], self.points[:, 2], self.s)
        else:
            s = np.asarray(start, dtype=float)
        x, y, z = q.T
        for _ in range(iterations):
            s = self.newton_step(x, y, z, s, *self.local_frame(s))
        c = self._sample_rows(s, self._frame_rows)  # point, e_ap, e_lr
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        n_ap = dx * c[3] + dy * c[4] + dz * c[5]
        n_lr = dx * c[6] + dy * c[7] + dz * c[8]
        return s, n_ap, n_lr

    def from_tube_coordinates(self, s, n_ap, n_lr) -> np.ndarray:
        """Anatomy-frame points from tube coordinates (inverse of :meth:`tube_coordinates`)."""
        return (
            self.sample(s, self.points)
            + np.asarray(n_ap)[:, None] * self.sample(s, self.e_ap)
            + np.asarray(n_lr)[:, None] * self.sample(s, self.e_lr)
        )

    def tube_volume_element(self, s, n_ap, n_lr) -> np.ndarray:
        """|det| of the map from tube coordinates to space: ``1 - n_ap κ_ap - n_lr κ_lr``, where
        ``κ_ap = e_ap · dt/ds`` and ``κ_lr = e_lr · dt/ds`` are the curvature components."""
        dt = self.sample(s, self.dtangent)
        kappa_ap = np.einsum("ij,ij->i", dt, self.sample(s, self.e_ap))
        kappa_lr = np.einsum("ij,ij->i", dt, self.sample(s, self.e_lr))
        return 1.0 - np.asarray(n_ap) * kappa_ap - np.asarray(n_lr) * kappa_lr


def _with_next(table: np.ndarray) -> np.ndarray:
    """``(n, c)`` table → ``(2c, n - 1)``: its columns as rows, followed by the same rows shifted by one."""
    return np.ascontiguousarray(np.concatenate([table[:-1], table[1:]], axis=1).T)


def _cumulative_integral(values: np.ndarray, step: float) -> np.ndarray:
    """Trapezoidal running integral starting at 0."""
    out = np.zeros_like(values, dtype=float)
    out[1:] = np.cumsum((values[1:] + values[:-1]) * 0.5 * step)
    return out


def layout_levels(heights_top: dict[str, float], heights_bottom: dict[str, float],
                  column: list[str] | None = None) -> dict[str, float]:
    """Arc length of every level's body centre, stacking bodies and discs from S1 upwards.

    ``heights_top[level]`` / ``heights_bottom[level]`` are the largest extents (mm) of the body's
    superior / inferior endplate from its centre along the cranio-caudal axis; ``column``: the
    levels C7 … S1, cranial first (default: the standard ones). ``s = 0`` at L3.
    """
    if column is None:
        column = [name for name in LEVELS if level_position(name) >= level_position("C7")]
    order = list(column)[::-1]  # S1 … C7
    s = {order[0]: 0.0}
    for lower, upper in zip(order[:-1], order[1:]):
        disc = level_dimensions(upper).disc_below_mm
        s[upper] = s[lower] + heights_top[lower] + disc + heights_bottom[upper]
    shift = s["L3"]
    return {name: value - shift for name, value in s.items()}
