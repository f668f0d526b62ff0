"""Voxel-grid helpers of ``geometry`` that no measurement test pins on its own."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from VertebralFractureScreenLib.geometry import find_label_boxes, mask_box


def test_label_boxes_are_scipys_find_objects():
    """Scanning slabs of slices in threads and merging gives exactly ``ndimage.find_objects``'s
    boxes: labels that span slabs, that lie in one slab only, that are absent (None), and ids
    above ``max_label`` (left out)."""
    rng = np.random.default_rng(3)
    labels = np.zeros((200, 40, 30), dtype=np.uint8)
    labels[5:190, 3:30, 2:20] = 7  # spans every slab
    labels[120:121, 10, 11] = 9  # one voxel in one slab
    labels[rng.integers(0, 200, 50), rng.integers(0, 40, 50), rng.integers(0, 30, 50)] = 12  # scattered
    labels[0, 0, 0] = labels[199, 39, 29] = 3  # the array's corners
    for max_label in (None, 9, 12, 20):
        assert find_label_boxes(labels, max_label) == ndimage.find_objects(labels, max_label=max_label or 0)
    assert find_label_boxes(labels, 9)[4] is None  # label 5 is absent
    assert find_label_boxes(labels[:40]) == ndimage.find_objects(labels[:40])  # too few slices to split


def test_label_boxes_of_a_map_labelled_in_its_middle_only():
    """The scan is limited to the box of all labelled voxels: boxes are still in the whole
    array's indices, for any integer type and for a strided view; an empty map has no boxes."""
    labels = np.zeros((150, 60, 50), dtype=np.int16)
    labels[40:90, 20:35, 12:30] = 2
    labels[88:110, 33:41, 29:31] = 5
    labels[70, 25, 15] = 300
    for case in (labels, labels[::-1, :, ::2], labels.astype(np.uint32)):
        for max_label in (None, 5):
            assert find_label_boxes(case, max_label) == ndimage.find_objects(case, max_label=max_label or 0)
    empty = np.zeros((100, 20, 20), dtype=np.uint8)
    assert find_label_boxes(empty) == [] == ndimage.find_objects(empty)
    assert find_label_boxes(empty, 4) == [None] * 4 == ndimage.find_objects(empty, max_label=4)


def test_mask_box_is_find_objects_of_the_mask():
    rng = np.random.default_rng(4)
    for shape in ((30, 20, 25), (7, 40), (50,)):
        for fill in (0.001, 0.05, 0.5):
            mask = rng.random(shape) < fill
            expected = ndimage.find_objects(mask.astype(np.uint8))
            assert mask_box(mask) == (expected[0] if expected else None)
    assert mask_box(np.zeros((4, 5, 6), dtype=bool)) is None


# ------------------------------------------------------------------------------------------------
# Memory-lean helpers: the same answers as the whole-array computations they replace
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_chunked_distance_transform_is_scipy_s_bit_for_bit(seed):
    from scipy import ndimage

    from VertebralFractureScreenLib.geometry import distance_transform_edt

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 40, size=3))
    mask = rng.random(shape) < rng.uniform(0.5, 0.99)
    sampling = None if seed % 3 == 0 else tuple(rng.uniform(0.3, 3.0, size=3))
    expected = ndimage.distance_transform_edt(mask, sampling=sampling)
    np.testing.assert_array_equal(distance_transform_edt(mask, sampling=sampling), expected)


def test_boxed_labels_crop_as_the_whole_map_would():
    from VertebralFractureScreenLib.geometry import BoxedLabels

    rng = np.random.default_rng(4)
    whole = np.zeros((20, 24, 28), dtype=np.uint8)
    whole[5:12, 8:15, 3:20] = rng.integers(0, 3, size=(7, 7, 17))
    boxed = BoxedLabels.of(whole)
    assert boxed.array.nbytes < whole.nbytes and boxed.shape == whole.shape and boxed.dtype == whole.dtype
    for _ in range(200):
        lo = rng.integers(0, whole.shape)
        hi = [int(rng.integers(a, n + 1)) for a, n in zip(lo, whole.shape)]
        crop = tuple(slice(int(a), b) for a, b in zip(lo, hi))
        np.testing.assert_array_equal(boxed[crop], whole[crop])
    np.testing.assert_array_equal(np.asarray(boxed), whole)
    empty = BoxedLabels.of(np.zeros((4, 5, 6), dtype=np.uint8))
    np.testing.assert_array_equal(empty[1:3, :, 2:], np.zeros((2, 5, 4), dtype=np.uint8))
