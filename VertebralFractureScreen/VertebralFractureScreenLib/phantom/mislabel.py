"""Mislabelled segmentations for tests of a level checker: pure functions on a TotalSegmentator
``total`` label map (any integer array) that return a new array and leave their input untouched.

Only vertebra labels (C1 … S1, :data:`..levels.TOTAL_VERTEBRA_IDS`) change; every other label
(sacrum, ribs, muscles, …) stays as it is.
"""

from __future__ import annotations

import numpy as np

from .. import levels as lv
from ..measure.level_check import shifted_labels

_ORDER = [lv.TOTAL_VERTEBRA_IDS[name] for name in lv.LEVELS]  # C1 … S1, cranial first


def _relabelled(total: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """``total`` with every label ``a`` of ``mapping`` replaced by ``mapping[a]``, all at once."""
    total = np.asarray(total)
    out = total.copy()
    for old, new in mapping.items():
        out[total == old] = new
    return out


def shift_levels(total: np.ndarray, by: int) -> np.ndarray:
    """Every vertebra label moved ``by`` levels, caudally for ``by`` > 0 (``by=1``: L1 → L2,
    T12 → L1, L5 → S1), cranially for ``by`` < 0. A vertebra whose label would leave C1 … S1 is a
    ``ValueError``. (The screening's own relabelling, the same rule.)"""
    return shifted_labels(np.asarray(total), by)


def swap_levels(total: np.ndarray, a: str, b: str) -> np.ndarray:
    """The labels of levels ``a`` and ``b`` (names, e.g. ``"L1"``, ``"L2"``) exchanged."""
    first, second = (_ORDER[lv.level_position(name)] for name in (a, b))
    return _relabelled(total, {first: second, second: first})
