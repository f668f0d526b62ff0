"""The spine's curvature from the vertebrae's own frames: the coronal Cobb angle (scoliosis) and
the sagittal thoracic kyphosis and lumbar lordosis, in degrees.

Rule (tangent Cobb angle): each vertebra's cranio-caudal axis ``cc`` (the spine's centre-line
tangent at its body centre, :class:`~.morphometry.VertebraFrame`) is projected onto the patient's
coronal and sagittal planes, whose normals are the spine's mean antero-posterior and left-right
axes (so a patient lying rotated in the scanner is measured in their own planes). A vertebra's
coronal tilt is the angle between its axis and the sagittal plane, positive towards the patient's
left (not the angle of its projection on the coronal plane, which a sagittal lean inflates: by 2°
for a 22° tilt at a 25° kyphotic lean, as on a radiograph); its sagittal tilt is the angle of its
projection on the sagittal plane from the mean superior axis, positive anterior.

* **Coronal Cobb angle**: the largest change of coronal tilt between two consecutive turning
  points of the tilt along the spine (the end vertebrae of the largest curve). Turning points
  reverse by at least :data:`TURNING_HYSTERESIS_DEG`, so a measurement's noise does not split a
  curve in two.
* **Kyphosis**: the sagittal tilt of T4 minus that of T12 (positive kyphotic); **lordosis**: that
  of L5 minus that of L1 (positive lordotic). Not L1–S1: the tangent at the S1 segment's centre
  follows the sacrum's curve, some 20° steeper than S1's superior endplate that a radiographic
  L1–S1 angle uses. The levels used are reported; without both end levels the angle is not
  reported.

The tangent at a body centre equals the perpendicular of its endplates for an undeformed body,
so the tangent Cobb angle equals the radiographic endplate Cobb angle on a smooth curve and does
not depend on fractured endplates. Vertebrae whose centre is unreliable (cut by the scan, or an
implausible body: :data:`UNRELIABLE_CENTRE_FLAGS`) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import levels as lv

NAN = float("nan")

TURNING_HYSTERESIS_DEG = 3.0
"""A tilt reversal smaller than this (degrees) is not a turning point of the curve."""

MIN_LEVELS_FOR_COBB = 3
"""Fewer vertebrae than this carry no coronal curve: the Cobb angle is not reported."""

UNRELIABLE_CENTRE_FLAGS = frozenset({
    "body_cut", "endplate_cut_superior", "endplate_cut_inferior", "touches_field_of_view_edge",
    "implausible_body_volume", "implausible_depth", "body_not_separated", "mask_off_bone"})
"""Morphometry flags after which a vertebra's centre, and so its tangent, is not trusted."""


@dataclass(frozen=True)
class SpineCurvature:
    """The spine's curvature (degrees; NaN when not measurable, levels then None).

    ``coronal_cobb_deg``: the largest coronal curve's Cobb angle, between ``coronal_cobb_levels``
    (upper and lower end vertebra); ``kyphosis_deg`` between ``kyphosis_levels`` (T4, T12);
    ``lordosis_deg`` between ``lordosis_levels`` (L1, L5); ``levels``: the vertebrae
    used; ``coronal_tilt_deg``: each one's coronal tilt."""

    coronal_cobb_deg: float = NAN
    coronal_cobb_levels: tuple[str, str] | None = None
    kyphosis_deg: float = NAN
    kyphosis_levels: tuple[str, str] | None = None
    lordosis_deg: float = NAN
    lordosis_levels: tuple[str, str] | None = None
    levels: tuple[str, ...] = ()
    coronal_tilt_deg: dict = field(default_factory=dict)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _turning_points(angles: np.ndarray, hysteresis: float) -> list[int]:
    """Indices of the first point, each turning point (where the angle reverses by at least
    ``hysteresis``) and the end of the last run (its extreme: a smaller reversal after it is
    noise) of a sequence of angles."""
    points, direction, extreme = [0], 0, 0
    for i in range(1, len(angles)):
        if direction == 0:  # until the first run's direction is known, the start is its reference
            change = angles[i] - angles[0]
            if abs(change) >= hysteresis:
                direction, extreme = (1 if change > 0 else -1), i
        elif (angles[i] - angles[extreme]) * direction > 0:
            extreme = i
        elif (angles[extreme] - angles[i]) * direction >= hysteresis:
            points.append(extreme)
            direction, extreme = -direction, i
    points.append(extreme if direction else len(angles) - 1)
    return points


def coronal_cobb(levels: Sequence[str], tilts_deg: Sequence[float],
                 hysteresis: float = TURNING_HYSTERESIS_DEG) -> tuple[float, tuple[str, str] | None]:
    """The largest curve's Cobb angle (degrees) and its end vertebrae, from coronal tilts ordered
    cranial to caudal (NaN and None for fewer than :data:`MIN_LEVELS_FOR_COBB` levels; end
    vertebrae None when no curve reaches :data:`TURNING_HYSTERESIS_DEG`)."""
    if len(levels) < MIN_LEVELS_FOR_COBB:
        return NAN, None
    angles = np.asarray(tilts_deg, float)
    points = _turning_points(angles, hysteresis)
    best, ends = 0.0, None
    for a, b in zip(points[:-1], points[1:]):
        change = abs(float(angles[b] - angles[a]))
        if change > best:
            best, ends = change, (levels[a], levels[b])
    return best, (ends if best >= hysteresis else None)  # no curve: no end vertebrae


def spine_curvature(vertebrae: Sequence) -> SpineCurvature:
    """The curvature of the spine from its measured vertebrae.

    ``vertebrae``: records with ``level``, ``frame`` (a :class:`~.morphometry.VertebraFrame` or
    None) and ``flags`` (the morphometry's :class:`~.morphometry.VertebraHeights`), any order.
    Vertebrae without a frame or with :data:`UNRELIABLE_CENTRE_FLAGS` are left out."""
    used = []
    for v in vertebrae:
        if v.frame is None or UNRELIABLE_CENTRE_FLAGS.intersection(v.flags):
            continue
        try:
            used.append((lv.level_position(v.level), v.level, np.asarray(v.frame.cc, float),
                         np.asarray(v.frame.ap, float)))
        except ValueError:
            continue
    used.sort(key=lambda item: item[0])
    if len(used) < 2:
        return SpineCurvature(levels=tuple(level for _, level, _, _ in used))
    levels = [level for _, level, _, _ in used]
    cc = np.array([item[2] for item in used])
    anterior = _unit(np.mean([item[3] for item in used], axis=0))
    superior = np.mean(cc, axis=0)
    superior = _unit(superior - (superior @ anterior) * anterior)
    left = np.cross(superior, anterior)  # RAS: superior × anterior points to the patient's left
    coronal = np.degrees(np.arcsin(np.clip(cc @ left, -1.0, 1.0)))
    sagittal = dict(zip(levels, np.degrees(np.arctan2(cc @ anterior, cc @ superior))))
    cobb, cobb_levels = coronal_cobb(levels, coronal)

    def change(upper: str, lower: str) -> tuple[float, tuple[str, str] | None]:
        if upper in sagittal and lower in sagittal:
            return float(sagittal[upper] - sagittal[lower]), (upper, lower)
        return NAN, None

    kyphosis, kyphosis_levels = change("T4", "T12")
    lordosis, lordosis_levels = change("L5", "L1")
    if lordosis_levels is not None:
        lordosis_levels = ("L1", "L5")
    return SpineCurvature(
        coronal_cobb_deg=_rounded(cobb), coronal_cobb_levels=cobb_levels,
        kyphosis_deg=_rounded(kyphosis), kyphosis_levels=kyphosis_levels,
        lordosis_deg=_rounded(lordosis), lordosis_levels=lordosis_levels,
        levels=tuple(levels), coronal_tilt_deg={level: _rounded(t) for level, t in zip(levels, coronal)})


def _rounded(value: float) -> float:
    return round(float(value), 1) if math.isfinite(value) else NAN


# ------------------------------------------------------------------------------------------------
# Heights the lateral tilt makes imprecise
# ------------------------------------------------------------------------------------------------

LATERAL_TILT_FLAG = "lateral_tilt"

LATERAL_TILT_DEG = 30.0
"""A vertebra tilted laterally against the slices by more than this (degrees) is flagged
:data:`LATERAL_TILT_FLAG`: its heights lie beyond the tilts measured on independently rendered
images (docs/validation.md, "Lateral tilt"). Up to 30°, at 1 mm, 0.7x0.7x3 mm and 3 mm, the
heights err no more than untilted ones once the fit follows the concave endplate through thick
slices (before that, Hm read 1–2 mm long from 7° on at thick slices)."""


def lateral_tilt_deg(frame, ijk_to_ras: np.ndarray) -> float:
    """The angle (degrees) between a vertebra's left-right axis and the scan's slice plane: its
    lateral (coronal) tilt against the slices. A sagittal tilt (lordosis) turns the vertebra about
    that axis and leaves it in the slice plane; a lateral tilt lifts one side of each endplate
    through the slices."""
    normal = np.cross(np.asarray(ijk_to_ras, float)[:3, 0], np.asarray(ijk_to_ras, float)[:3, 1])
    normal = _unit(normal)
    return float(np.degrees(np.arcsin(min(1.0, abs(float(np.asarray(frame.lr, float) @ normal))))))


def flag_lateral_tilt(vertebrae: Sequence, ijk_to_ras: np.ndarray) -> list[str]:
    """Append :data:`LATERAL_TILT_FLAG` to the ``flags`` of every measured vertebra (records with
    ``frame`` and ``flags``, the morphometry's) tilted laterally against the slices by more than
    :data:`LATERAL_TILT_DEG`; returns their levels."""
    flagged = []
    for v in vertebrae:
        if v.frame is not None and lateral_tilt_deg(v.frame, ijk_to_ras) > LATERAL_TILT_DEG:
            if LATERAL_TILT_FLAG not in v.flags:
                v.flags.append("lateral_tilt")  # LATERAL_TILT_FLAG, spelt out for the flag registry's check
            flagged.append(v.level)
    return flagged
