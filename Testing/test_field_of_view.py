"""Completeness per part (``morphometry``): a field of view that cuts only a vertebra's posterior
elements leaves it graded as before; one that cuts its body or an endplate leaves it ungraded,
with flags that say which part was cut. The field of view is the CT's grid, or the
segmentation's own grid when that is smaller (a cropped segmentation).

Phantoms T11–L3 with an L1 wedge fracture, at 1 mm and 3 mm, upright and rotated, are cropped so
that L1's spinous process, a transverse process, its anterior body wall or its inferior endplate
reaches the edge; the uncropped phantom is the reference.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from VertebralFractureScreenLib.io import exam_inputs
from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.measure.grading import grade_spine
from VertebralFractureScreenLib.io.images import write_volume
from VertebralFractureScreenLib.io.volume import Volume
from VertebralFractureScreenLib.measure.morphometry import measure_heights
from VertebralFractureScreenLib.phantom.render import Fracture, PhantomSpec, make_phantom

L1 = lv.TOTAL_VERTEBRA_IDS["L1"]
SETTINGS = [(1.0, (0.0, 0.0, 0.0)), (1.0, (5.0, 8.0, -20.0)), (3.0, (0.0, 0.0, 0.0)), (3.0, (5.0, 8.0, -20.0))]
BODY_FLAGS = {"body_cut", "endplate_cut_superior", "endplate_cut_inferior"}


def _angle_deg(a, b) -> float:
    return float(np.degrees(np.arccos(np.clip(abs(np.dot(a, b)), 0.0, 1.0))))


def _measure(ct, labels, ijk_to_ras, label_grid=None) -> dict:
    heights = measure_heights(labels, ijk_to_ras, ct=ct, label_grid=label_grid)
    grades = {g.level: g for g in grade_spine(heights)}
    return {h.level: (h, grades[h.level]) for h in heights}


def _crop(array, ijk_to_ras, box):
    """``array[box]`` and its IJK→RAS; ``box``: ``(k0, k1, j0, j1, i0, i1)``."""
    k0, k1, j0, j1, i0, i1 = (int(x) for x in box)
    moved = np.array(ijk_to_ras, dtype=float)
    moved[:, 3] = ijk_to_ras @ np.array([i0, j0, k0, 1.0])
    return array[k0:k1, j0:j1, i0:i1], moved


@functools.lru_cache(maxsize=None)
def _spine(spacing: float, rotation: tuple) -> dict:
    """The phantom of one setting with its uncropped measurement (made once per test run)."""
    # Sub-samples of 1 mm: at 3 mm voxels the image then shows the anatomy the truth describes.
    spec = PhantomSpec(levels=lv.parse_level_range("T11-L3"), spacing=(spacing,) * 3, rotation_deg=rotation,
                       supersampling=1 if spacing == 1.0 else 3, noise_hu=10.0,
                       fractures=(Fracture.parse("L1:wedge:0.3"),), seed=3)
    made = make_phantom(spec)
    reference = _measure(made.ct, made.total, made.ijk_to_ras)
    return {"made": made, "spacing": spacing, "rotated": any(rotation), "reference": reference,
            "truth": {v["level"]: v for v in made.truth["vertebrae"]}}


@pytest.fixture(params=SETTINGS, ids=lambda s: f"{s[0]:g}mm-rot{s[1][2]:g}")
def spine(request):
    return _spine(*request.param)


def _boxes(made, spacing):
    """The crops: each cuts one part of L1 by 2 mm (one voxel at 3 mm). The phantom's grid is RAS:
    i runs to the right, j anteriorly, k superiorly."""
    vertebra = made.total == L1
    k, j, i = np.nonzero(vertebra)
    body_k = np.nonzero(vertebra & (made.vertebrae_body == lv.BODY_LABEL))[0]
    nk, nj, ni = made.total.shape
    cut = 2 if spacing == 1.0 else 1
    return {
        "spinous process": (0, nk, j.min() + cut, nj, 0, ni),
        "transverse process": (0, nk, 0, nj, i.min() + cut, ni),
        "anterior body wall": (0, nk, 0, j.max(), 0, ni),
        "inferior endplate": (body_k.min() + 1, nk, 0, nj, 0, ni),
    }


@pytest.mark.parametrize("part", ["spinous process", "transverse process"])
def test_cut_posterior_elements_are_graded_as_uncropped(spine, part):
    made = spine["made"]
    box = _boxes(made, spine["spacing"])[part]
    ct, ijk_to_ras = _crop(made.ct, made.ijk_to_ras, box)
    labels, _ = _crop(made.total, made.ijk_to_ras, box)
    cropped = _measure(ct, labels, ijk_to_ras)
    heights, grade = cropped["L1"]
    reference, reference_grade = spine["reference"]["L1"]
    assert "posterior_elements_cut" in heights.flags and not BODY_FLAGS & set(heights.flags), heights.flags
    assert heights.complete and "touches_field_of_view_edge" not in heights.flags
    assert (grade.genant_grade, grade.shape) == (reference_grade.genant_grade, reference_grade.shape) != (None, None)
    for key in ("ha_mm", "hm_mm", "hp_mm"):  # the same body, measured in (almost) the same frame
        assert getattr(heights, key) == pytest.approx(getattr(reference, key), abs=0.5), key
    # The frame: within 2° of the uncropped one, or, where the uncropped frame is itself farther
    # than that from the phantom's axes (rotated spines), no farther from them than it.
    truth = spine["truth"]["L1"]["axes_ras"]
    deviation = max(_angle_deg(heights.frame.ap, reference.frame.ap), _angle_deg(heights.frame.cc, reference.frame.cc))
    error = max(_angle_deg(heights.frame.ap, truth["ap"]), _angle_deg(heights.frame.cc, truth["cc"]))
    reference_error = max(_angle_deg(reference.frame.ap, truth["ap"]), _angle_deg(reference.frame.cc, truth["cc"]))
    assert deviation < 2.0 or error <= reference_error + 0.5, (deviation, error, reference_error)
    # Every vertebra graded before is still graded, unless the crop took its body.
    for level, (h, g) in cropped.items():
        if not BODY_FLAGS & set(h.flags):
            assert g.genant_grade == spine["reference"][level][1].genant_grade, level


@pytest.mark.parametrize("part, flag", [("anterior body wall", "body_cut"),
                                        ("inferior endplate", "endplate_cut_inferior")])
def test_cut_body_or_endplate_is_not_graded(spine, part, flag):
    made = spine["made"]
    box = _boxes(made, spine["spacing"])[part]
    ct, ijk_to_ras = _crop(made.ct, made.ijk_to_ras, box)
    labels, _ = _crop(made.total, made.ijk_to_ras, box)
    heights, grade = _measure(ct, labels, ijk_to_ras)["L1"]
    assert flag in heights.flags and "touches_field_of_view_edge" in heights.flags, heights.flags
    assert not heights.complete and grade.genant_grade is None


def test_a_cropped_segmentation_cuts_like_the_field_of_view(spine, tmp_path):
    """A segmentation on its own, smaller grid: what its extent cuts is flagged as the CT's edge
    would flag it, through the exam's inputs (read from files, resampled onto the CT)."""
    made = spine["made"]
    boxes = _boxes(made, spine["spacing"])
    ct_path, seg_path = tmp_path / "ct.nrrd", tmp_path / "seg.nii.gz"
    write_volume(ct_path, Volume(made.ct, made.ijk_to_ras), compress=False)
    for part, expect_complete in (("anterior body wall", False), ("spinous process", True)):
        labels, ijk_to_ras = _crop(made.total, made.ijk_to_ras, boxes[part])
        write_volume(seg_path, Volume(labels, ijk_to_ras))
        inputs = exam_inputs.load_exam(ct_path, seg_path)
        assert inputs.labels.array.shape == made.ct.shape and inputs.label_grid is not None
        heights, grade = _measure(inputs.ct.array, inputs.labels.array, inputs.ct.ijk_to_ras, inputs.label_grid)["L1"]
        assert heights.complete is expect_complete, (part, heights.flags)
        if expect_complete:
            assert "posterior_elements_cut" in heights.flags
            assert grade.genant_grade == spine["reference"]["L1"][1].genant_grade
        else:
            assert "body_cut" in heights.flags and grade.genant_grade is None
        # Without the segmentation's grid the cut is invisible: the old confident answer.
        blind, _ = _measure(inputs.ct.array, inputs.labels.array, inputs.ct.ijk_to_ras)["L1"]
        assert blind.complete and not {f for f in blind.flags if "cut" in f}


def test_muscle_slabs_cut_by_a_cropped_segmentation_are_flagged(tmp_path):
    """Screening from files: a segmentation cropped behind L1's spinous process leaves L1 graded
    as before, and the muscle rows whose slab runs out of the segmentation's grid are flagged
    ``cut_by_field_of_view``, as they would be at the CT's border; uncropped, none is."""
    from VertebralFractureScreenLib.exam.screening import screen_exam

    made = _spine(3.0, (0.0, 0.0, 0.0))["made"]
    ct_path, whole_path, seg_path = tmp_path / "ct.nrrd", tmp_path / "whole.nii.gz", tmp_path / "seg.nii.gz"
    write_volume(ct_path, Volume(made.ct, made.ijk_to_ras), compress=False)
    write_volume(whole_path, Volume(made.total, made.ijk_to_ras))
    labels, ijk_to_ras = _crop(made.total, made.ijk_to_ras, _boxes(made, 3.0)["spinous process"])
    write_volume(seg_path, Volume(labels, ijk_to_ras))
    whole = screen_exam(ct_path, seg=whole_path, exam_id="whole")
    cropped = screen_exam(ct_path, seg=seg_path, exam_id="cropped")
    grade = {row["level"]: row["genant_grade"] for row in whole.vertebrae}
    assert {row["level"]: row["genant_grade"] for row in cropped.vertebrae} == grade
    assert not any("cut_by_field_of_view" in row["flags"] for row in whole.muscles)
    cut = [(row["muscle"], row["level"]) for row in cropped.muscles if "cut_by_field_of_view" in row["flags"]]
    assert any(muscle.startswith("autochthon") and level == "L1" for muscle, level in cut), cut
    assert all(not row["complete"] for row in cropped.muscles if "cut_by_field_of_view" in row["flags"])
