"""Closed-form shapes the phantom's scene is built of, and the point tests they share.

A vertebral body (:class:`VertebraModel`) is an elliptic cylinder in the vertebra's own frame
whose superior and inferior endplates are surfaces ``w_top(u, v)`` / ``w_bot(u, v)``, so its
heights are known in closed form. Fractures ``LEVEL:SHAPE:FRACTION`` deform a body relative to
its own normal shape:

* ``wedge``: the superior endplate drops anteriorly, ``Ha = Ha0 (1 - F)``, ``Hp = Hp0``;
* ``biconcave``: both endplates are depressed centrally, ``Hm = Hm0 (1 - F)``, ``Ha, Hp`` kept;
* ``crush``: the whole body loses height, ``H = H0 (1 - F)`` everywhere.

Intramuscular fat is a lattice of spheres occupying a chosen volume fraction
(:func:`_in_fat_lattice`). All points are in the anatomy frame (mm, see :mod:`.anatomy`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .spec import Fracture


@dataclass
class VertebraModel:
    """One rigid vertebra: body shape in its local frame ``(u, v, w)`` (mm) = coordinates along
    ``(e_lr, e_ap, e_cc)`` from its body centre; ``v`` > 0 is anterior."""

    level: str
    s: float
    half_width: float  # a, body semi-axis along e_lr
    half_depth: float  # b, body semi-axis along e_ap
    ha0: float
    hp0: float
    fracture: Fracture | None
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))  # rows e_lr, e_ap, e_cc

    def ap_fraction(self, v):
        """Fraction of the body depth from the anterior wall (0) to the posterior wall (1)."""
        return (self.half_depth - v) / (2.0 * self.half_depth)

    def endplates(self, u, v):
        """Superior and inferior endplate positions ``w_top, w_bot`` (mm) above points (u, v)."""
        f = self.ap_fraction(np.asarray(v, dtype=float))
        normal = self.hp0 + (self.ha0 - self.hp0) * (0.85 - f) / 0.70
        top, bottom = 0.5 * normal, -0.5 * normal
        if self.fracture is None:
            return top, bottom
        fraction = self.fracture.fraction
        if self.fracture.shape == "wedge":
            ramp = np.clip((0.85 - f) / 0.70, 0.0, None)
            return top - fraction * normal * ramp, bottom
        if self.fracture.shape == "crush":
            return top * (1.0 - fraction), bottom * (1.0 - fraction)
        # biconcave: central depression of both endplates, flat across the central half width
        depression = fraction * _central_bump(f) * _lateral_plateau(np.asarray(u, dtype=float), self.half_width)
        return top * (1.0 - depression), bottom * (1.0 - depression)

    def height_at(self, ap_fraction: float) -> float:
        """True height (mm) in the mid-sagittal plane at an AP fraction from the anterior wall."""
        v = self.half_depth - 2.0 * self.half_depth * ap_fraction
        top, bottom = self.endplates(0.0, v)
        return float(top - bottom)

    def extents(self) -> tuple[float, float]:
        """Largest superior and inferior extent of the body from its centre (mm)."""
        u, v = np.meshgrid(np.linspace(-self.half_width, self.half_width, 41),
                           np.linspace(-self.half_depth, self.half_depth, 81))
        inside = (u / self.half_width) ** 2 + (v / self.half_depth) ** 2 <= 1.0 + 1e-9
        top, bottom = self.endplates(u[inside], v[inside])
        return float(np.max(top)), float(-np.min(bottom))

    def volume_mm3(self, step: float = 0.2) -> float:
        """Body volume by integrating the endplate distance over the elliptic cross-section."""
        us = np.arange(-self.half_width + step / 2, self.half_width, step)
        vs = np.arange(-self.half_depth + step / 2, self.half_depth, step)
        u, v = np.meshgrid(us, vs)
        inside = (u / self.half_width) ** 2 + (v / self.half_depth) ** 2 <= 1.0
        top, bottom = self.endplates(u[inside], v[inside])
        return float(np.sum(top - bottom) * step * step)

    def body_and_core(self, u, v, w, cortex_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """Whether local points ``(u, v, w)`` lie in the body, and in its trabecular core (the
        body less a cortical shell of ``cortex_mm``)."""
        top, bottom = self.endplates(u, v)
        a, b, c = self.half_width, self.half_depth, cortex_mm
        body = ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & (w <= top) & (w >= bottom)
        core = body & ((u / (a - c)) ** 2 + (v / (b - c)) ** 2 <= 1.0) & (w <= top - c) & (w >= bottom + c)
        return body, core

    def mid_height(self) -> tuple[float, float]:
        """Height of the middle of the body's central column (u = v = 0) above its centre, and
        half that column's height (mm)."""
        top, bottom = self.endplates(0.0, 0.0)
        return 0.5 * float(top + bottom), 0.5 * float(top - bottom)

    def local(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local ``(u, v, w)`` of anatomy-frame points ``q`` (N, 3)."""
        offsets = self.axes @ self.centre
        return tuple(_dot(q, axis) - offset for axis, offset in zip(self.axes, offsets))


def _in_box(q: np.ndarray, lo, hi) -> np.ndarray:
    """Whether points ``q`` (N, 3) lie in the box ``lo``–``hi`` (closed)."""
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])


def _dot(q: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """``q @ axis`` for points ``q`` (N, 3), without BLAS (whose threads would compete with the
    renderer's)."""
    return q[:, 0] * axis[0] + q[:, 1] * axis[1] + q[:, 2] * axis[2]


def _central_bump(f):
    """1 at mid-depth falling smoothly to 0 at 15 % and 85 % of the depth (cos² profile)."""
    x = (np.asarray(f) - 0.5) / 0.35
    return np.where(np.abs(x) < 1.0, np.cos(0.5 * np.pi * x) ** 2, 0.0)


def _lateral_plateau(u, half_width):
    """1 over the central half of the width, cos² taper to 0 at 90 % of the half-width."""
    x = (np.abs(u) - 0.5 * half_width) / (0.4 * half_width)
    return np.where(x <= 0.0, 1.0, np.where(x < 1.0, np.cos(0.5 * np.pi * x) ** 2, 0.0))


def _boxes_meet(lo, hi, frames: dict) -> np.ndarray:
    """Whether the anatomy-frame box ``lo``–``hi`` can meet each frame's local box: the box's
    corners in every frame (centre, rows of axes) are boxed and compared."""
    if not len(frames["centre"]):
        return np.zeros(0, dtype=bool)
    corners = np.array(list(itertools.product(*zip(lo, hi))))  # (8, 3)
    local = (np.einsum("cj,fkj->fck", corners, frames["axes"])
             - np.einsum("fj,fkj->fk", frames["centre"], frames["axes"])[:, None, :])
    return np.all((local.min(axis=1) <= frames["hi"]) & (local.max(axis=1) >= frames["lo"]), axis=1)


def _fat_radius(period, fraction) -> float:
    """Radius (mm) of the spheres of a cubic lattice of ``period`` (mm) that fill ``fraction`` of
    space: ``r = period · (3 f / 4π)^(1/3)``."""
    return period * (3.0 * fraction / (4.0 * np.pi)) ** (1.0 / 3.0)


def _in_fat_lattice(q, period, fraction, offset):
    """Whether points ``q`` (N, 3) lie in a sphere of intramuscular fat on a cubic lattice
    (anatomy frame, shifted by ``offset``) filling ``fraction`` of space (:func:`_fat_radius`)."""
    radius = _fat_radius(period, fraction)
    d = np.mod(q - offset + 0.5 * period, period) - 0.5 * period
    return d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2] <= radius * radius
