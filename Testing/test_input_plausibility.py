"""Inputs that are well-formed but implausible (issue 26): a segmentation must lie on the CT's
bone (a mask shifted off its vertebra is never graded; an exam whose masks mostly miss the bone
is refused with one sentence), a vertebrae_body map must be one, a float CT must hold no NaN, and a
Slicer segmentation without vertebra segments gets advice that helps."""

from __future__ import annotations

import numpy as np
import pytest

from VertebralFractureScreenLib.errors import InputError
from VertebralFractureScreenLib.io.exam_inputs import load_exam
from VertebralFractureScreenLib.measure.morphometry import MIN_BONE_EDGE_CONTRAST_HU, bone_edge_contrast, measure_heights
from VertebralFractureScreenLib.exam.screening import screen_exam


@pytest.fixture(scope="module")
def example(example_data):
    return load_exam(example_data / "example_ct.nii.gz", example_data / "example_seg_fast_force_split.nii.gz")


def _heights(exam, labels):
    return {h.level: h for h in measure_heights(labels, exam.labels.ijk_to_ras, ct=exam.ct.array)}


def test_masks_on_their_bone_pass_and_shifted_masks_are_flagged(example):
    labels = exam_labels = example.labels.array
    ct = example.ct.array
    placed = _heights(example, exam_labels)
    assert not any("mask_off_bone" in h.flags for h in placed.values())
    for axis in range(3):
        shifted = _heights(example, np.roll(exam_labels, 50 // 3, axis=axis))  # 50 mm at 3 mm voxels
        off = [h for h in shifted.values() if "mask_off_bone" in h.flags]
        assert len(off) >= len(shifted) - 1, axis
        assert all(not h.complete for h in off)
    # The measure itself: every vertebra of the example CT well above the limit.
    from VertebralFractureScreenLib import levels as lv
    for level, label in lv.TOTAL_VERTEBRA_IDS.items():
        mask = labels == label
        if mask.sum() > 100:
            assert bone_edge_contrast(mask, ct, labels, (3.0, 3.0, 3.0)) > 1.3 * MIN_BONE_EDGE_CONTRAST_HU, level


def test_a_contrast_ct_whose_masks_are_a_voxel_small_passes(example_data):
    """The DICOM example (1 x 1 x 2 mm, contrast, its segmentation made on a coarser grid and a
    voxel smaller than the bone): its masks lie on the bone."""
    exam = load_exam(example_data / "example_ct_dicom", example_data / "example_seg_dicom.nii.gz")
    heights = measure_heights(np.asarray(exam.labels.array), exam.labels.ijk_to_ras, ct=np.asarray(exam.ct.array))
    assert heights and not any("mask_off_bone" in h.flags for h in heights)


def test_an_exam_whose_masks_miss_the_bone_is_refused(example):
    shifted = np.roll(example.labels.array, 50 // 3, axis=1)
    with pytest.raises(InputError, match="does not lie on the CT's bone"):
        screen_exam(example.ct, seg=shifted)


def test_a_multilabel_map_given_as_the_body_map_is_refused(example):
    """TotalSegmentator's ``total`` map given as the ``vertebrae_body`` map: one sentence, instead
    of blank HU and a misleading warning (issue 26)."""
    with pytest.raises(InputError, match="vertebrae_body map has only 1 .bodies. and 2 .discs."):
        load_exam(example.ct, example.labels.array, body_seg=example.labels.array)


def test_a_float_ct_with_one_nan_voxel_is_refused(example):
    """One NaN voxel that the strided plausibility sample misses: one sentence, not an internal
    error later (issue 26)."""
    from VertebralFractureScreenLib.io.exam_inputs import check_ct
    from VertebralFractureScreenLib.io.volume import Volume

    array = np.concatenate([np.asarray(example.ct.array, dtype=np.float32)] * 3)  # 336 slices
    array[1, 1, 1] = np.nan  # the sample takes every second slice from slice 0
    assert np.isfinite(array[::max(1, array.shape[0] // 128)]).all()
    with pytest.raises(InputError, match="NaN or infinite"):
        check_ct(Volume(array, example.ct.ijk_to_ras))


def test_a_slicer_segmentation_without_vertebra_segments_gets_naming_advice(example, tmp_path):
    """A ``.seg.nrrd`` whose segments are named otherwise: the sentence says how to name them,
    not to try ``--labels verse``, which changes nothing for named segments (issue 26)."""
    from VertebralFractureScreenLib.io.seg_nrrd import write_segmentation_nrrd
    from VertebralFractureScreenLib.io.volume import Volume

    labels = np.asarray(example.labels.array)
    path = tmp_path / "renamed.seg.nrrd"
    write_segmentation_nrrd(path, Volume(np.where(labels == 31, 1, 0).astype(np.uint8), example.labels.ijk_to_ras),
                            {1: "my_bone"})
    with pytest.raises(InputError, match="none of the segments .* is recognised as a vertebra") as error:
        load_exam(example.ct, path)
    assert "--labels" not in str(error.value)
