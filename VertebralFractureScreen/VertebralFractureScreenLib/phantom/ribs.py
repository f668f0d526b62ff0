"""The phantom's ribs: a curved bony tube on each side of a rib-bearing thoracic vertebra.

A rib is a tube of :data:`RIB_RADIUS_MM` (11 mm thick) with a cortical shell of the spec's
``cortex_mm`` around marrow (tissue ``rib_marrow``, at the trabecular HU of T *n*; the 13th rib,
which shares rib 12's ``total`` id, at T12's, so that the id and the tissue still fix the HU),
around a centre line that lies in one plane:

* the **neck**, straight from the **head** (a sphere in the costovertebral joint, at the side of
  the upper half of the body, at 55 % of the half-depth behind its centre, overlapping the body by
  1.5 mm) to the **tubercle**, which lies against the front of the transverse process's tip
  (overlapping it by 1 mm): laterally, posteriorly and a little down;
* the **shaft**, a circular arc of :data:`ARC_RADIUS_MM` that continues the neck and bends round
  anteriorly over :data:`ARC_SWEEP_DEG`, in the plane of the neck and of a direction
  :data:`DESCENT_DEG` below anterior, so it goes down as it goes round: past the rib's angle
  (its most posterior point, about 35 mm beyond the tubercle) it turns forward.

Only the first ~100 mm are drawn, which is what a CT of the spine shows; the field of view keeps
the medial :data:`FOV_LENGTH_MM`. The distance of a point to the centre line is closed-form (the
centre line is planar: the distance in the plane to a segment or an arc, and the offset from it).
All points are in the anatomy frame (mm, see :mod:`.anatomy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import LevelDimensions
from .column import rib_total_id
from .shapes import VertebraModel, _dot, _in_box
from .spec import TISSUES

RIB_RADIUS_MM = 5.5
ARC_RADIUS_MM = 80.0
ARC_SWEEP_DEG = 65.0
DESCENT_DEG = 15.0
FOV_LENGTH_MM = 60.0


@dataclass
class Rib:
    """One rib: the centre line's head ``origin`` and plane ``basis`` (rows: along the neck,
    in-plane towards anterior, normal), the neck's length, and the box holding the whole rib."""

    level: str
    side: str
    number: int
    total_label: int
    marrow_level: str  # the level whose trabecular HU its marrow has
    origin: np.ndarray
    basis: np.ndarray
    neck_mm: float
    lo: np.ndarray = None
    hi: np.ndarray = None

    def __post_init__(self):
        points = self.centre_line(np.inf)
        self.lo, self.hi = points.min(axis=0) - RIB_RADIUS_MM - 1.0, points.max(axis=0) + RIB_RADIUS_MM + 1.0

    def centre_line(self, length_mm: float, step_mm: float = 1.0) -> np.ndarray:
        """Points (N, 3) every ``step_mm`` along the first ``length_mm`` of the centre line."""
        sweep = np.deg2rad(ARC_SWEEP_DEG)
        total = min(length_mm, self.neck_mm + ARC_RADIUS_MM * sweep)
        t = np.append(np.arange(0.0, total, step_mm), total)
        phi = np.clip(t - self.neck_mm, 0.0, None) / ARC_RADIUS_MM
        x = np.minimum(t, self.neck_mm) + ARC_RADIUS_MM * np.sin(phi)
        y = ARC_RADIUS_MM * (1.0 - np.cos(phi))
        return self.origin + x[:, None] * self.basis[0] + y[:, None] * self.basis[1]

    def distance(self, q: np.ndarray) -> np.ndarray:
        """Distance (mm) of points ``q`` (N, 3) from the centre line."""
        d = q - self.origin
        x, y, h = (_dot(d, axis) for axis in self.basis)
        neck = (x - np.clip(x, 0.0, self.neck_mm)) ** 2 + y * y
        px, py = x - self.neck_mm, y - ARC_RADIUS_MM  # from the arc's centre
        phi = np.arctan2(py, px) + 0.5 * np.pi  # the arc's angle at the point's direction
        sweep = np.deg2rad(ARC_SWEEP_DEG)
        end_x, end_y = self.neck_mm + ARC_RADIUS_MM * np.sin(sweep), ARC_RADIUS_MM * (1.0 - np.cos(sweep))
        arc = np.where((phi >= 0.0) & (phi <= sweep), (np.hypot(px, py) - ARC_RADIUS_MM) ** 2,
                       (x - end_x) ** 2 + (y - end_y) ** 2)
        return np.sqrt(np.minimum(neck, arc) + h * h)


def make_rib(model: VertebraModel, dims: LevelDimensions, side: str, number: int) -> Rib:
    """Rib ``number`` on ``side`` ("left" or "right") of the vertebra ``model`` (see the module
    docstring for where its head and tubercle lie)."""
    sign = 1.0 if side == "right" else -1.0  # e_lr points to the patient's right
    a, b, r = model.half_width, model.half_depth, RIB_RADIUS_MM
    head = np.array([sign * (a * np.sqrt(1.0 - 0.55 ** 2) + r - 1.5), -0.55 * b, 0.2 * model.hp0])
    transverse_v = -b - dims.canal_half_depth_mm  # the transverse process's centre, ±4 mm along v
    tip = dims.canal_half_width_mm + dims.pedicle_width_mm + dims.transverse_length_mm
    tubercle = np.array([sign * (tip - 0.5 * r), transverse_v + 4.0 + r - 1.0, 0.0])
    to_anatomy = lambda p: model.centre + p @ model.axes  # noqa: E731
    origin, along = to_anatomy(head), to_anatomy(tubercle) - to_anatomy(head)
    neck = float(np.linalg.norm(along))
    along /= neck
    descent = np.deg2rad(DESCENT_DEG)
    forward = np.cos(descent) * model.axes[1] - np.sin(descent) * model.axes[2]
    forward -= (forward @ along) * along
    forward /= np.linalg.norm(forward)
    basis = np.stack([along, forward, np.cross(along, forward)])
    return Rib(model.level, side, number, rib_total_id(side, number), f"T{min(number, 12)}", origin, basis, neck)


def paint_ribs(ribs: list[Rib], q: np.ndarray, free: np.ndarray, lo, hi, cortex_mm: float, put) -> np.ndarray:
    """Paint the points ``q[free]`` that the ribs hold (cortex, then marrow) with ``put`` (as
    :meth:`.scene.SpineScene.paint` does), where a rib's box meets the box ``lo``–``hi``;
    returns the points left."""
    for rib in ribs:
        if not len(free) or not np.all((rib.lo <= hi) & (rib.hi >= lo)):
            continue
        near = _in_box(q[free], rib.lo, rib.hi)
        if not near.any():
            continue
        index = free[near]
        distance = rib.distance(q[index])
        marrow = distance <= RIB_RADIUS_MM - cortex_mm
        put(index[(distance <= RIB_RADIUS_MM) & ~marrow], TISSUES["cortical_bone"], rib.total_label)
        put(index[marrow], TISSUES["rib_marrow"], rib.total_label, level=rib.marrow_level)
        taken = np.zeros(len(free), dtype=bool)
        taken[np.flatnonzero(near)[distance <= RIB_RADIUS_MM]] = True
        free = free[~taken]
    return free
