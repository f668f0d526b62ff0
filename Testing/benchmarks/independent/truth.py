"""Truth on the continuous anatomy, as SPEC §4 defines the heights.

* **Frame** of each vertebra: its cranio-caudal axis is the tangent, at the vertebra's body
  centroid, of the parabola through the body centroids of the vertebra and its two neighbours
  (the spine's centre line through neighbouring bodies), oriented superiorly; its
  antero-posterior axis is the body's own posterior direction (towards the canal) made
  orthogonal to it; origin at the body centroid. The body here is the drawn body without
  osteophytes.
* **Depth**: anterior and posterior walls along the antero-posterior axis through the centroid
  (mid-sagittal plane, mid-height), without osteophytes.
* **Ha, Hm, Hp**: in the mid-sagittal plane (through the centroid, spanned by the two axes), at
  15, 50 and 85 % of the depth from the anterior wall, the distance along the cranio-caudal axis
  from the inferior to the superior endplate surface (the bone-disc boundary), found by
  bisection to 1e-9 mm. Schmorl's nodes are left out of the surfaces (a focal pit is not the
  endplate's height; a reader measures past it); concavity, rims and fracture deformation are in.
* **Band heights** (a diagnostic): the median of the same heights over seven parallel planes
  across the central 30 % of the width.
* **Loss and grade**: the same heights of the unfractured vertebra in the same frame give the
  fracture's loss against the vertebra's own normal shape: wedge ``1 - (Ha/Hp)/(Ha0/Hp0)``,
  biconcave ``1 - (Hm/Hp)/(Hm0/Hp0)``, crush ``1 - Hp/Hp0``; the largest (0 for a normal
  vertebra) graded by Genant's boundaries 20/25/40 %, borderline within 3 points of one.
"""

from __future__ import annotations

import numpy as np

from . import anatomy as an
from .build import Spine

FRACTIONS = {"ha": 0.15, "hm": 0.50, "hp": 0.85}
GENANT_BOUNDARIES = (0.20, 0.25, 0.40)
BORDERLINE = 0.03
BAND = 0.15
"""Half-width of the diagnostic band, as a fraction of the body's width."""


def genant(loss: float) -> tuple[int, bool]:
    """(Genant grade, borderline) of a height-loss fraction (Genant et al., JBMR 1993)."""
    grade = sum(loss >= b for b in GENANT_BOUNDARIES[:2]) + (loss > GENANT_BOUNDARIES[2])
    return int(grade), bool(any(abs(loss - b) < BORDERLINE for b in GENANT_BOUNDARIES))


def _body_sdf(v: an.Vertebra, q: np.ndarray, fracture: bool = True, nodes: bool = True) -> np.ndarray:
    z_sup, z_inf = an.endplates(v, q[:, 0], q[:, 1], nodes=nodes, fracture=fracture)
    return np.maximum.reduce([an.side_distance(v, q), q[:, 2] - z_sup, z_inf - q[:, 2]])


def centroid(v: an.Vertebra, step: float = 0.5) -> np.ndarray:
    """The drawn body's centroid (patient mm) on a ``step`` mm local grid."""
    half = 0.5 * max(v.h_ant, v.h_post) + 1.0
    axes = [np.arange(-v.a * 1.2, v.a * 1.2, step), np.arange(-v.b_a * 1.2, v.b_p * 1.2, step),
            np.arange(-half, half, step)]
    q = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside = q[_body_sdf(v, q) < 0]
    return v.origin + v.axes @ inside.mean(0)


def frames(spine: Spine) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Index → (centroid, axes as columns x', y', z') of every vertebra with two neighbours."""
    cents = [centroid(v) for v in spine.vertebrae]
    out = {}
    for i in range(1, len(cents) - 1):
        p = np.array(cents[i - 1:i + 2])
        s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        coef = np.polyfit(s, p, 2)
        tangent = 2 * coef[0] * s[1] + coef[1]
        z = tangent / np.linalg.norm(tangent)
        v = spine.vertebrae[i]
        if z @ v.axes[:, 2] < 0:
            z = -z
        y = v.axes[:, 1] - (v.axes[:, 1] @ z) * z
        y /= np.linalg.norm(y)
        out[i] = (cents[i], np.column_stack([np.cross(y, z), y, z]))
    return out


def _bisect(fun, lo: np.ndarray, hi: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Roots of ``fun`` (vectorised, ``fun(lo) < 0 <= fun(hi)`` elementwise)."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        positive = fun(mid) >= 0
        hi, lo = np.where(positive, mid, hi), np.where(positive, lo, mid)
    return 0.5 * (lo + hi)


def walls(v: an.Vertebra, centre: np.ndarray, axes: np.ndarray) -> tuple[float, float]:
    """Anterior (negative) and posterior wall positions (mm) along y' through the centroid."""
    def outside(u):
        return an.side_distance(v, v.local(centre + u[:, None] * axes[:, 1]))
    front = _bisect(lambda u: outside(-u), np.zeros(1), np.full(1, 80.0))
    back = _bisect(outside, np.zeros(1), np.full(1, 80.0))
    return -float(front[0]), float(back[0])


def heights(v: an.Vertebra, centre, axes, fractions, lateral: float = 0.0, fracture: bool = True,
            front_back=None) -> np.ndarray:
    """Heights (mm) at depth ``fractions`` from the anterior wall, in the plane ``lateral`` mm
    beside the mid-sagittal one, along z' (see the module docstring)."""
    front, back = front_back or walls(v, centre, axes)
    fr = np.asarray(fractions, dtype=float)
    base = centre + lateral * axes[:, 0] + (front + fr * (back - front))[:, None] * axes[:, 1]

    def gap(t, which):
        q = v.local(base + t[:, None] * axes[:, 2])
        z_sup, z_inf = an.endplates(v, q[:, 0], q[:, 1], nodes=False, fracture=fracture)
        return q[:, 2] - z_sup if which == 0 else z_inf - q[:, 2]

    top = _bisect(lambda t: gap(t, 0), np.full(fr.size, -5.0), np.full(fr.size, 45.0))
    bottom = _bisect(lambda t: gap(-t, 1), np.full(fr.size, -5.0), np.full(fr.size, 45.0))
    return top + bottom


def _profile_record(v, centre, axes, front_back, profile_fractions) -> dict:
    fr = np.asarray(profile_fractions, dtype=float)
    prof = heights(v, centre, axes, fr, front_back=front_back)
    middle = (fr >= 0.25 - 1e-9) & (fr <= 0.75 + 1e-9)
    k = int(np.argmin(np.where(middle, prof, np.inf)))
    depth = front_back[1] - front_back[0]
    area = float(np.sum(0.5 * (prof[1:] + prof[:-1]) * np.diff(fr)) * depth)
    return {"height_profile_mm": [float(h) for h in prof], "hm_min_mm": float(prof[k]),
            "hm_min_fraction": float(fr[k]), "sagittal_area_mm2": area}


def vertebra_truth(spine: Spine, index: int, centre, axes, rotation: np.ndarray, profile_fractions) -> dict:
    """The truth record of one vertebra (heights mm, losses as fractions; RAS in the scanner)."""
    v = spine.vertebrae[index]
    fb = walls(v, centre, axes)
    fr = list(FRACTIONS.values())
    h = heights(v, centre, axes, fr, front_back=fb)
    h0 = heights(v, centre, axes, fr, fracture=False, front_back=fb)
    band = np.median([heights(v, centre, axes, fr, lateral=x, front_back=fb)
                      for x in np.linspace(-BAND, BAND, 7) * 2 * v.a], axis=0)
    losses = {"wedge": 1 - (h[0] / h[2]) / (h0[0] / h0[2]), "biconcave": 1 - (h[1] / h[2]) / (h0[1] / h0[2]),
              "crush": 1 - h[2] / h0[2]}
    loss = float(np.clip(max(losses.values()), 0.0, 1.0))
    grade, borderline = genant(loss)
    up = spine.discs[index - 1] if index >= 1 else None
    down = spine.discs[index] if index < len(spine.discs) else None
    record = {
        "level": v.level, "total_id": v.label, "complete": bool(v.scored),
        **{f"{k}_mm": float(x) for k, x in zip(FRACTIONS, h)},
        **{f"band_{k}_mm": float(x) for k, x in zip(FRACTIONS, band)},
        **{f"{k}0_mm": float(x) for k, x in zip(FRACTIONS, h0)},
        "depth_mm": fb[1] - fb[0], "width_mm": 2 * v.a,
        "losses": {k: float(x) for k, x in losses.items()}, "height_loss": loss, "genant_grade": grade,
        "borderline": borderline, "shape": max(losses, key=losses.get) if grade >= 1 else "normal",
        "fracture": None if not v.fracture else {"shape": v.fracture["shape"], "fraction": v.fracture["fraction"]},
        "schmorl": [("superior", "inferior")[n["which"]] for n in v.nodes],
        "osteophytes": [("superior", "inferior")[o["which"]] for o in v.osteophytes],
        "degenerated_disc_above": bool(up and up.degenerated), "degenerated_disc_below": bool(down and down.degenerated),
        "concavity_mm": [float(c) for c in v.concavity], "trabecular_hu": float(v.hu_trab),
        "centroid_ras": [float(x) for x in rotation @ centre], "axis_ras": [float(x) for x in rotation @ axes[:, 2]],
    }
    record.update(_profile_record(v, centre, axes, fb, profile_fractions))
    return record


def spine_truth(spine: Spine, rotation: np.ndarray, profile_fractions) -> list[dict]:
    """Truth records of every vertebra with two neighbours (the scored ones and none else is
    guaranteed: the context vertebrae at the ends get none), cranial to caudal."""
    return [vertebra_truth(spine, i, c, ax, rotation, profile_fractions) for i, (c, ax) in sorted(frames(spine).items())]
