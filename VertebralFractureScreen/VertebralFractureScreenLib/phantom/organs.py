"""The vessels and kidneys of a phantom with a contrast phase (``PhantomSpec.phase``).

A phantom without a phase has none of them (its aorta is the scene's own tube), so every phantom
drawn before they existed stays the same bit for bit. With a phase, the scene adds:

* the inferior vena cava (``total`` 63): a tube to the right of the spine, in front of the bodies,
  elliptic (16 mm from front to back, 22 mm across), from L5 to the top of the spine curve;
* the portal vein (64, ``portal_vein_and_splenic_vein``): a tube 14 mm across in front of the vena
  cava and to the right of the midline, from the middle of L1 up to the middle of T11 (the
  splenic vein is not drawn);
* the kidneys (right 2, left 3): ellipsoids 110 mm long, 54 mm across and 38 mm from front to
  back, centred 75 mm either side of the spine curve and 5 mm behind it at the L1/L2 disc (the
  right one 12 mm lower), with a cortex of :data:`CORTEX_MM` around the medulla.

Everything is in the anatomy frame (mm, see :mod:`.anatomy`); the HU are the phase's
(:data:`.spec.PHASE_HU`, through the tissues ``ivc_blood``, ``portal_blood``, ``renal_cortex`` and
``renal_medulla``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import levels as lv
from .shapes import _in_box
from .spec import TISSUES

CORTEX_MM = 7.0
"""Thickness of the renal cortex (along the kidney's axes; an inner ellipsoid bounds the medulla)."""
KIDNEY_SEMI_AXES_MM = (27.0, 19.0, 55.0)
"""Half width (along the patient's left–right), half depth (front–back), half length (cranio-caudal)."""


@dataclass
class Kidney:
    """One kidney: an ellipsoid in the anatomy frame (centre, rows of ``axes`` its directions,
    ``semi_axes`` along them) with a cortex ``cortex_mm`` thick."""

    name: str
    total_label: int
    centre: np.ndarray
    axes: np.ndarray
    semi_axes: np.ndarray
    cortex_mm: float = CORTEX_MM

    def parts(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which points ``q`` (N, 3) lie in the kidney, and which of those in its medulla."""
        local = (q - self.centre) @ self.axes.T
        kidney = np.sum((local / self.semi_axes) ** 2, axis=1) <= 1.0
        medulla = kidney & (np.sum((local / (self.semi_axes - self.cortex_mm)) ** 2, axis=1) <= 1.0)
        return kidney, medulla

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """The anatomy-frame box holding the kidney (the ellipsoid's exact extent, 1 mm to spare)."""
        half = np.sqrt(np.sum((self.semi_axes[:, None] * self.axes) ** 2, axis=0)) + 1.0
        return self.centre - half, self.centre + half


def vessel_tubes(scene, tube_class, half_depth) -> list:
    """The vena cava and the portal vein as tubes of the scene (``tube_class`` is
    :class:`.scene.Tube`; ``half_depth`` the bodies' half depth along the spine curve)."""
    const = lambda value: (lambda s: np.full_like(np.asarray(s, dtype=float), value))  # noqa: E731
    top = scene.curve.s[-1] - 1.0
    bottom = scene.models[scene.column.last_lumbar()].s
    ivc = tube_class("inferior_vena_cava", (bottom, top), lambda s: half_depth(s) + 20.0,
                     const(24.0), const(8.0), const(11.0), TISSUES["ivc_blood"], lv.TOTAL_INFERIOR_VENA_CAVA)
    portal = tube_class("portal_vein", (scene.models["L1"].s, scene.models["T11"].s), lambda s: half_depth(s) + 48.0,
                        const(12.0), const(7.0), const(7.0), TISSUES["portal_blood"], lv.TOTAL_PORTAL_SPLENIC_VEIN)
    return [ivc, portal]


def make_kidneys(scene) -> list[Kidney]:
    """The two kidneys of the scene (module docstring), in the curve's frame at their centres."""
    s_hilum = scene.disc_mid_s[("L1", "L2")]
    kidneys = []
    for name, label, lr, drop in (("kidney_right", lv.TOTAL_KIDNEY_RIGHT, 75.0, 12.0),
                                  ("kidney_left", lv.TOTAL_KIDNEY_LEFT, -75.0, 0.0)):
        c, e_lr, e_ap, e_cc = scene.curve.frame(s_hilum - drop)
        axes = np.stack([e_lr, e_ap, e_cc])
        kidneys.append(Kidney(name, label, c + lr * e_lr - 5.0 * e_ap, axes, np.array(KIDNEY_SEMI_AXES_MM)))
    return kidneys


def paint_kidneys(kidneys: list[Kidney], q: np.ndarray, free: np.ndarray, lo, hi, put) -> np.ndarray:
    """Paint the points ``q[free]`` the kidneys hold (cortex and medulla with the kidney's label)
    where a kidney's box meets the points' box ``lo``–``hi``; returns the points left."""
    for kidney in kidneys:
        k_lo, k_hi = kidney.box()
        if not len(free) or np.any(k_lo > hi) or np.any(k_hi < lo):
            continue
        near = np.flatnonzero(_in_box(q[free], k_lo, k_hi))
        if not len(near):
            continue
        inside, medulla = kidney.parts(q[free[near]])
        put(free[near[inside & ~medulla]], TISSUES["renal_cortex"], kidney.total_label)
        put(free[near[medulla]], TISSUES["renal_medulla"], kidney.total_label)
        taken = np.zeros(len(free), dtype=bool)
        taken[near[inside]] = True
        free = free[~taken]
    return free


def hu_keys(kidneys: list[Kidney]) -> list[tuple[int, int, None]]:
    """The (tissue, ``total`` label, level) a kidney's points are painted with (for
    :meth:`.scene.SpineScene.hu_of_keys`)."""
    return [(tissue, kidney.total_label, None) for kidney in kidneys
            for tissue in (TISSUES["renal_cortex"], TISSUES["renal_medulla"])]


def widen_box(kidneys: list[Kidney], lo: np.ndarray, hi: np.ndarray) -> None:
    """Widen the field of view's box ``lo``–``hi`` (in place, across the body only: its height is
    the drawn spine's) to the kidneys that reach its height."""
    for kidney in kidneys:
        k_lo, k_hi = kidney.box()
        if k_lo[2] <= hi[2] and k_hi[2] >= lo[2]:
            lo[:2] = np.minimum(lo[:2], k_lo[:2] - 2.0)
            hi[:2] = np.maximum(hi[:2], k_hi[:2] + 2.0)
