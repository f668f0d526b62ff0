"""Normal adult vertebral body dimensions per level, for whoever needs a level's expected size.

Body height, width (left-right) and depth (antero-posterior) and the disc below, in mm, from
anchor levels interpolated linearly by level position; after Panjabi et al. (Spine 1991;16:888 and
Spine 1992;17:299), rounded. Grading scales a neighbour's heights to a level by the ratio of their
nominal heights (a T12 is shorter than an L1); the phantom draws its normal bodies with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .levels import level_position

BODY_ANCHORS = (
    ("C7", 13.0, 24.0, 15.0, 4.0),
    ("T1", 14.0, 26.0, 15.0, 4.0),
    ("T4", 16.0, 28.0, 18.0, 4.5),
    ("T8", 18.5, 32.0, 24.0, 5.0),
    ("T12", 22.0, 40.0, 28.0, 6.5),
    ("L1", 24.0, 42.0, 30.0, 8.0),
    ("L3", 26.0, 48.0, 33.0, 10.0),
    ("L5", 26.0, 52.0, 34.0, 11.0),
    ("S1", 25.0, 50.0, 32.0, 0.0),
)
"""(level, body height, width, depth, disc height below) in mm; S1's disc below is unused."""


@dataclass(frozen=True)
class NormalBody:
    """Nominal size of one level's vertebral body (mm): ``height_mm`` is the mean of its anterior
    and posterior heights."""

    level: str
    height_mm: float
    width_mm: float
    depth_mm: float
    disc_below_mm: float


@lru_cache(maxsize=None)
def normal_body(level: str) -> NormalBody:
    """The nominal body of ``level``, interpolated between :data:`BODY_ANCHORS` (C1–C6 take C7's:
    nothing here is meant for the neck)."""
    xs = [level_position(anchor[0]) for anchor in BODY_ANCHORS]
    position = max(level_position(level), xs[0])
    values = [float(np.interp(position, xs, [anchor[k] for anchor in BODY_ANCHORS])) for k in range(1, 5)]
    return NormalBody(level, *values)
