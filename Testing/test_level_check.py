"""The level check (issue 28, point 1): the label map's own evidence (order, spacing, sacrum,
ribs) confirms correct levels and catches swapped, shifted and skipped labels.

The phantoms are labelled with their true levels; the mislabelled cases relabel them as a
segmentation model would err (two adjacent labels swapped, every label one level off, a label
skipped). Truth is the relabelling, not the checker.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.measure.level_check import check_levels
from VertebralFractureScreenLib.phantom import mislabel
from VertebralFractureScreenLib.phantom.render import PhantomSpec, make_phantom

IDS = lv.TOTAL_VERTEBRA_IDS
LUMBAR_SPINE = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")


@pytest.fixture(scope="module", params=[(2.0, 2.0, 3.0), (1.0, 1.0, 1.0)], ids=["3mm", "1mm"])
def spine(request):
    return make_phantom(PhantomSpec(levels=LUMBAR_SPINE, spacing=request.param, supersampling=1,
                                    scoliosis_deg=15.0, rotation_deg=(4.0, 0.0, 8.0)))


def _relabelled(total: np.ndarray, mapping: dict[str, str]) -> np.ndarray:
    out = total.copy()
    for true_level, label_level in mapping.items():
        out[total == IDS[true_level]] = IDS[label_level]
    return out


def test_correct_labels_raise_nothing(spine):
    check = check_levels(spine.total, spine.ijk_to_ras)
    assert check.checked == ("order", "spacing", "sacrum") and not check.doubtful
    assert check.not_checked == {"ribs": "no rib labels in the segmentation"}
    assert check.as_dict()["doubtful"] is False


def test_swapped_labels_are_out_of_order(spine):
    check = check_levels(_relabelled(spine.total, {"L1": "L2", "L2": "L1"}), spine.ijk_to_ras)
    assert check.disagreements == ("L1 lies below L2: their labels are swapped or wrong.",)


def test_labels_shifted_by_one_level_are_caught(spine):
    """Every vertebra labelled one level too high: the lowest lumbar label next to the sacrum
    becomes L4 (when the S1 segment keeps its label, the skipped L5 shows instead)."""
    up = {level: lv.adjacent_level(level, cranial=True) for level in LUMBAR_SPINE[:-1]}
    check = check_levels(_relabelled(spine.total, up), spine.ijk_to_ras)
    assert check.doubtful
    without_s1 = _relabelled(spine.total, up)
    without_s1[spine.total == IDS["S1"]] = lv.TOTAL_SACRUM
    check = check_levels(without_s1, spine.ijk_to_ras)
    assert any("next to the sacrum is labelled L4" in finding for finding in check.disagreements)


def test_a_skipped_label_is_caught_and_a_missing_vertebra_is_not_a_mislabel(spine):
    skipped = _relabelled(spine.total, {"L3": "L4", "L4": "L5", "L5": "S1", "S1": "S1"})
    check = check_levels(skipped, spine.ijk_to_ras)
    assert "L2 and L4" in " ".join(check.disagreements) and "skipped" in " ".join(check.disagreements)
    # An unsegmented L3 (label absent) with the rest right: its neighbours are two levels apart, as labelled.
    missing = spine.total.copy()
    missing[spine.total == IDS["L3"]] = 0
    assert not check_levels(missing, spine.ijk_to_ras).doubtful


def test_an_unlabelled_vertebra_between_two_labels_is_caught(spine):
    """L3 left unlabelled and the labels below it moved up by one: L2 and the next label, "L3",
    are two vertebrae apart."""
    gap = spine.total.copy()
    gap[spine.total == IDS["L3"]] = 0
    gap[spine.total == IDS["L4"]] = IDS["L3"]
    gap[spine.total == IDS["L5"]] = IDS["L4"]
    check = check_levels(gap, spine.ijk_to_ras)
    assert any("L2 and L3" in finding and "has no label" in finding for finding in check.disagreements)


def test_verse_transitional_labels_are_reported():
    phantom = make_phantom(PhantomSpec(levels=("L3", "L4", "L5", "S1"), spacing=(2.0, 2.0, 3.0), supersampling=1))
    verse = phantom.verse.copy()
    verse[phantom.verse == lv.VERSE_VERTEBRA_IDS["L5"]] = 25  # L6
    check = check_levels(verse, phantom.ijk_to_ras, convention="verse")
    assert check.transitional == ("L6",) and check.doubtful
    assert check.not_checked["ribs"] and check.not_checked["sacrum"]


RIBBED = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")


@functools.lru_cache(maxsize=None)
def _ribbed(pairs: int):
    return make_phantom(PhantomSpec(levels=RIBBED, spacing=(2.0, 2.0, 3.0), supersampling=1, rib_pairs=pairs,
                                    rotation_deg=(0.0, 5.0, 6.0)))


@pytest.mark.parametrize("pairs", [11, 12, 13])
def test_ribs_meet_their_vertebrae_and_tell_eleven_and_thirteen_pairs(pairs):
    """Twelve pairs agree with the labels; eleven (no rib on T12) and thirteen (a rib on the
    vertebra a segmentation labels L1) make the levels doubtful, as a reader would count them."""
    ribbed = _ribbed(pairs)
    check = check_levels(ribbed.total, ribbed.ijk_to_ras)
    assert "ribs" in check.checked
    assert {n: level for n, level in check.rib_levels.items()} == {n: f"T{n}" for n in range(9, min(pairs, 12) + 1)}
    if pairs == 12:
        assert not check.doubtful
    elif pairs == 11:
        assert check.disagreements == ("T12 bears no rib while T11 does: 11 rib pairs, or labels one level off.",)
    else:
        assert check.disagreements == ("the vertebra labelled L1 bears a rib: 13 rib pairs, or labels one level off.",)


def test_ribs_catch_labels_shifted_or_swapped():
    ribbed = _ribbed(12)
    up = mislabel.shift_levels(ribbed.total, -1)
    assert "rib 12 meets the vertebra labelled T11, not T12." in check_levels(up, ribbed.ijk_to_ras).disagreements
    without_s1 = ribbed.total.copy()
    without_s1[ribbed.total == IDS["S1"]] = lv.TOTAL_SACRUM
    down = check_levels(mislabel.shift_levels(without_s1, 1), ribbed.ijk_to_ras).disagreements
    assert "rib 12 meets the vertebra labelled L1, not T12." in down
    assert any("bears a rib" in finding for finding in down)
    swapped = check_levels(mislabel.swap_levels(ribbed.total, "T11", "T12"), ribbed.ijk_to_ras).disagreements
    assert "rib 11 meets the vertebra labelled T12, not T11." in swapped


@pytest.mark.parametrize("lumbar", [4, 6])
def test_four_or_six_lumbar_vertebrae_make_the_levels_doubtful(lumbar):
    """Four: the sacrum lies below L4 (S1 labelled, L5 skipped). Six: the sixth lumbar vertebra
    gets L5's label too, as TotalSegmentator labels it; VerSe names it L6."""
    drawn = make_phantom(PhantomSpec(levels=LUMBAR_SPINE, spacing=(2.0, 2.0, 3.0), supersampling=1,
                                     lumbar_vertebrae=lumbar))
    check = check_levels(drawn.total, drawn.ijk_to_ras)
    if lumbar == 4:
        assert check.disagreements == ("L4 and S1 are 35 mm apart, one level: a level label was skipped.",)
    else:
        assert check.disagreements[0].startswith("two vertebrae are labelled L5")
        assert check_levels(drawn.verse, drawn.ijk_to_ras, convention="verse").transitional == ("L6",)
