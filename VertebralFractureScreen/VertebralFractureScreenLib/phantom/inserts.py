"""What the phantom puts into a vertebra: a lesion, vertebroplasty cement, pedicle screws.

All in the vertebra's local frame ``(u, v, w)`` (mm, along ``e_lr``, ``e_ap``, ``e_cc`` from the
body centre, ``v`` > 0 anterior; see :class:`.shapes.VertebraModel`):

* a **lesion** (:class:`.spec.Lesion`): a sphere of its diameter centred on the middle of the
  body's central column, clipped to the trabecular core, or (``diffuse``) the whole core; tissue
  ``lesion`` at the lesion's HU;
* **cement** (``Hardware(level, "cement")``): an ellipsoid of PMMA (:data:`.spec.CEMENT_HU`)
  a little anterior in the body, with semi-axes 75 % of the core's half-width, 65 % of its
  half-depth and 80 % of its half-height, clipped to the core: about 26 % of the trabecular volume
  of a normal body (the truth gives the exact share, :func:`cement_fraction`);
* **screws** (``Hardware(level, "screws")``): two titanium pedicle screws (:data:`.spec.TITANIUM_HU`)
  of 6 mm, in the transverse plane through the body centre, each crossing the anterior end of its
  pedicle at the pedicle's middle and converging medially (15° lumbar, 10° thoracic) to a tip at
  60 % of the half-depth in front of the centre; from the bone's posterior surface a head of
  10 mm diameter stands 10 mm proud.

The painted tissue takes the vertebra's ``total`` and ``verse`` labels (and the body label inside
the body), except the screw heads outside the bone, which are unlabelled.
"""

from __future__ import annotations

import numpy as np

from .anatomy import LevelDimensions
from .shapes import VertebraModel
from .spec import TISSUES, PhantomSpec

SCREW_RADIUS_MM = 3.0
SCREW_HEAD_RADIUS_MM = 5.0
SCREW_HEAD_MM = 10.0
CEMENT_SEMI_AXES = (0.75, 0.65, 0.80)  # of the core's half-width, half-depth, half-height
CEMENT_SHIFT = 0.15  # centre anterior of the body centre, in core half-depths


def insert_parts(spec: PhantomSpec, model: VertebraModel, dims: LevelDimensions, u, v, w,
                 core: np.ndarray) -> list[tuple[np.ndarray, int, bool]]:
    """What ``spec`` inserts into the vertebra ``model`` at local points ``(u, v, w)`` whose core
    mask is ``core``: ``(mask, tissue, labelled)`` in painting order, later over earlier;
    ``labelled``: whether it carries the vertebra's labels. Empty where nothing is inserted."""
    parts = []
    lesion = spec.lesion_of(model.level)
    if lesion is not None:
        if lesion.diffuse:
            parts.append((core, TISSUES["lesion"], True))
        else:
            w_mid = model.mid_height()[0]
            radius = 0.5 * lesion.diameter_mm
            parts.append((core & (u * u + v * v + (w - w_mid) ** 2 <= radius * radius), TISSUES["lesion"], True))
    hardware = spec.hardware_of(model.level)
    if hardware is not None and hardware.kind == "cement":
        parts.append((core & _in_cement(model, spec.cortex_mm, u, v, w), TISSUES["cement"], True))
    elif hardware is not None:
        shaft, head = _screws(model, dims, u, v, w)
        parts += [(shaft, TISSUES["metal"], True), (head, TISSUES["metal"], False)]
    return parts


def insert_keys(spec: PhantomSpec, level: str) -> list[tuple[int, bool]]:
    """``(tissue, labelled)`` of everything :func:`insert_parts` can paint in ``level``."""
    keys = []
    if spec.lesion_of(level) is not None:
        keys.append((TISSUES["lesion"], True))
    hardware = spec.hardware_of(level)
    if hardware is not None and hardware.kind == "cement":
        keys.append((TISSUES["cement"], True))
    elif hardware is not None:
        keys += [(TISSUES["metal"], True), (TISSUES["metal"], False)]
    return keys


def _in_cement(model: VertebraModel, cortex_mm: float, u, v, w) -> np.ndarray:
    """Whether local points lie in the cement ellipsoid (before clipping to the core)."""
    w_mid, half_height = model.mid_height()
    half = np.array([model.half_width - cortex_mm, model.half_depth - cortex_mm, half_height - cortex_mm])
    ra, rb, rc = half * np.array(CEMENT_SEMI_AXES)
    return (u / ra) ** 2 + ((v - CEMENT_SHIFT * half[1]) / rb) ** 2 + ((w - w_mid) / rc) ** 2 <= 1.0


def cement_fraction(model: VertebraModel, cortex_mm: float, step: float = 0.5) -> float:
    """Share of the body's trabecular core that the cement fills, by sampling every ``step`` mm."""
    top, bottom = model.extents()
    axes = [np.arange(-extent + step / 2, extent, step) for extent in (model.half_width, model.half_depth)]
    axes.append(np.arange(-bottom + step / 2, top, step))
    u, v, w = (grid.ravel() for grid in np.meshgrid(*axes, indexing="ij"))
    core = model.body_and_core(u, v, w, cortex_mm)[1]
    return float(np.count_nonzero(core & _in_cement(model, cortex_mm, u, v, w)) / np.count_nonzero(core))


def screw_axes(model: VertebraModel, dims: LevelDimensions) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per screw (right, left), the local points where it enters the bone and its tip."""
    angle = np.deg2rad(15.0 if model.level.startswith(("L", "S")) else 10.0)
    b = model.half_depth
    pivot_u = dims.canal_half_width_mm + 0.5 * dims.pedicle_width_mm
    back = -b - 2.0 * dims.canal_half_depth_mm - dims.lamina_thickness_mm  # posterior surface of the lamina
    out = []
    for sign in (1.0, -1.0):
        direction = np.array([-sign * np.sin(angle), np.cos(angle), 0.0])
        pivot = np.array([sign * pivot_u, -b, 0.0])
        out.append((pivot + (back + b) / np.cos(angle) * direction, pivot + 1.6 * b / np.cos(angle) * direction))
    return out


def _screws(model: VertebraModel, dims: LevelDimensions, u, v, w) -> tuple[np.ndarray, np.ndarray]:
    """Whether local points lie in a screw's shaft (entry to tip), or in its head (behind the entry)."""
    shaft = np.zeros(np.shape(u), dtype=bool)
    head = np.zeros(np.shape(u), dtype=bool)
    for entry, tip in screw_axes(model, dims):
        length = float(np.linalg.norm(tip - entry))
        axis = (tip - entry) / length
        du, dv, dw = u - entry[0], v - entry[1], w - entry[2]
        t = du * axis[0] + dv * axis[1] + dw * axis[2]
        radial2 = du * du + dv * dv + dw * dw - t * t
        shaft |= (t >= 0.0) & (t <= length) & (radial2 <= SCREW_RADIUS_MM ** 2)
        head |= (t < 0.0) & (t >= -SCREW_HEAD_MM) & (radial2 <= SCREW_HEAD_RADIUS_MM ** 2)
    return shaft, head
