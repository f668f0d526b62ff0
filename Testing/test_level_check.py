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
from VertebralFractureScreenLib.measure import level_check
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


def _without_s1(phantom) -> np.ndarray:
    """The S1 segment merged into the sacrum, as a segmentation that knows no S1 vertebra gives it."""
    merged = phantom.total.copy()
    merged[phantom.total == IDS["S1"]] = lv.TOTAL_SACRUM
    return merged


@pytest.mark.parametrize("s1_labelled", [True, False], ids=["S1 kept", "S1 in the sacrum"])
def test_ribs_and_sacrum_agree_on_a_cranial_shift_and_moving_the_labels_undoes_it(s1_labelled):
    """Every lumbar and thoracic label one level too cranial (truth: the shift drawn), with the S1
    segment kept or merged into the sacrum: ribs and sacrum both say +1, and the moved labels are
    the true ones."""
    ribbed = _ribbed(12)
    truth = ribbed.total if s1_labelled else _without_s1(ribbed)
    up = level_check.shifted_labels(truth, -1, keep_s1=True)
    check = check_levels(up, ribbed.ijk_to_ras)
    assert check.doubtful and check.shift == 1
    moved = level_check.shifted_labels(up, check.shift, keep_s1=True)
    assert np.array_equal(moved, truth)
    assert not check_levels(moved, ribbed.ijk_to_ras).doubtful
    assert check.as_dict()["shift"] == 1 and check.as_dict()["relabelled_by"] == 0


@pytest.mark.parametrize("case", ["right", "13 pairs", "11 pairs", "shift down", "swap"])
def test_no_shift_is_proposed_without_two_agreeing_witnesses(case):
    """Right labels, 11 or 13 rib pairs (the ribs alone disagree), labels one level too caudal
    (the sacrum cannot tell a lumbar vertebra labelled S1 from S1) and two swapped labels propose
    no shift."""
    pairs = {"13 pairs": 13, "11 pairs": 11}.get(case, 12)
    ribbed = _ribbed(pairs)
    labels = {"right": ribbed.total, "13 pairs": ribbed.total, "11 pairs": ribbed.total,
              "shift down": mislabel.shift_levels(_without_s1(ribbed), 1),
              "swap": mislabel.swap_levels(ribbed.total, "T11", "T12")}[case]
    check = check_levels(labels, ribbed.ijk_to_ras)
    assert check.shift == 0
    assert check.doubtful == (case != "right")


def test_four_lumbar_vertebrae_propose_no_shift():
    """A lumbosacral transition (four lumbar vertebrae, labels right): the sacrum says +1, the
    ribs 0: no shift."""
    drawn = make_phantom(PhantomSpec(levels=RIBBED, spacing=(2.0, 2.0, 3.0), supersampling=1, rib_pairs=12,
                                     lumbar_vertebrae=4))
    check = check_levels(drawn.total, drawn.ijk_to_ras)
    assert check.doubtful and check.shift == 0


def test_shifted_labels_refuses_to_leave_the_levels_or_land_on_s1():
    labels = np.array([[[IDS["L5"], IDS["S1"], 0, lv.TOTAL_SACRUM]]], dtype=np.uint8)
    with pytest.raises(ValueError):
        level_check.shifted_labels(labels, 1, keep_s1=True)
    with pytest.raises(ValueError):
        level_check.shifted_labels(labels, 1)
    assert level_check.shifted_labels(labels, -1).tolist() == [[[IDS["L4"], IDS["L5"], 0, lv.TOTAL_SACRUM]]]


def test_screening_moves_the_labels_only_when_asked_and_then_reads_l1_at_l1():
    """A spine labelled one level too cranial: screened as given, the levels are doubtful and the
    bone category uncertain; with ``relabel_levels`` the labels move back, L1's HU is the true
    L1's, and the exam says what was done."""
    from VertebralFractureScreenLib.exam.screening import screen_exam
    from VertebralFractureScreenLib.io.volume import Volume

    ribbed = make_phantom(PhantomSpec(levels=RIBBED, spacing=(2.0, 2.0, 3.0), supersampling=1, rib_pairs=12,
                                      rotation_deg=(0.0, 5.0, 6.0), noise_hu=5.0,
                                      trabecular_hu={level: 170.0 - 10.0 * i for i, level in enumerate(RIBBED)}))
    ct = Volume(ribbed.ct, ribbed.ijk_to_ras)
    up = level_check.shifted_labels(ribbed.total, -1, keep_s1=True)
    right = screen_exam(ct, seg=ribbed.total, exam_id="right", levels=lv.parse_level_range("T9-L5"))
    as_given = screen_exam(ct, seg=up, exam_id="up", levels=lv.parse_level_range("T9-L5"))
    moved = screen_exam(ct, seg=up, exam_id="moved", levels=lv.parse_level_range("T9-L5"), relabel_levels=True)
    assert not right.exam["level_check"]["doubtful"]
    assert as_given.exam["level_check"]["doubtful"] and as_given.exam["level_check"]["shift"] == 1
    assert as_given.exam["bone"]["category_uncertain"] is True
    assert as_given.exam["bone"]["l1_hu"] < right.exam["bone"]["l1_hu"] - 5.0  # read at the true L2
    assert moved.exam["level_check"]["relabelled_by"] == 1 and not moved.exam["level_check"]["doubtful"]
    assert moved.exam["bone"]["l1_hu"] == right.exam["bone"]["l1_hu"]
    assert moved.exam["bone"]["category_uncertain"] is right.exam["bone"]["category_uncertain"]
    assert any(w.startswith("levels relabelled: every vertebra label moved 1 level(s) caudally")
               for w in moved.exam["warnings"])
    assert "level labels moved by +1 (see level_check)" in moved.exam["review"]["reasons"]
    assert [r["level"] for r in moved.vertebrae] == [r["level"] for r in right.vertebrae]
