"""The reader-like grade on real CTs: expert-graded development scans (skipped when absent, see
``shared_data``) and the normal spine of the TotalSegmentator example CT."""

from __future__ import annotations

from VertebralFractureScreenLib import levels as lv
from VertebralFractureScreenLib.io.exam_inputs import load_exam
from VertebralFractureScreenLib.measure.grading import grade_spine
from VertebralFractureScreenLib.measure.morphometry import measure_heights


def _grades(ct, seg, convention):
    exam = load_exam(ct, seg, convention=convention)
    heights = measure_heights(exam.labels.array, exam.labels.ijk_to_ras, convention=convention, ct=exam.ct.array,
                              label_boxes=exam.label_boxes, label_grid=exam.label_grid)
    return {g.level: g for g in grade_spine(heights)}


def test_expert_graded_scans_moderate_and_severe_fractures_found_normals_kept(graded_set):
    """On the development scans: every vertebra the experts graded 3 is graded ≥ 2, and none they
    graded 0 is graded ≥ 2 (the product's purpose, and its promise not to over-call)."""
    levels = lv.parse_level_range("T4-L5")
    severe = normal = 0
    for scan in graded_set:
        grades = _grades(scan.ct, scan.vertebrae, "verse")
        for level, expert in scan.grades.items():
            g = grades.get(level)
            if level not in levels or g is None or g.genant_grade is None:
                continue
            if expert == 3:
                severe += 1
                assert g.genant_grade >= 2, f"{scan.name} {level}: expert 3, graded {g.genant_grade}"
            if expert == 0:
                normal += 1
                assert g.genant_grade <= 1, f"{scan.name} {level}: expert 0, graded {g.genant_grade}"
    assert severe + normal > 0


def test_normal_spine_of_the_example_ct_is_not_called_fractured(example_data):
    """The example CT's lumbar spine is normal: every complete vertebra is graded 0 with its
    expectation taken from neighbours, whatever its natural endplate concavity."""
    grades = _grades(example_data / "example_ct.nii.gz", example_data / "example_seg_fast_force_split.nii.gz",
                     "totalsegmentator")
    graded = [g for g in grades.values() if g.genant_grade is not None]
    assert len(graded) >= 4
    for g in graded:
        assert g.genant_grade == 0, (g.level, g.grade_basis, g.middle_loss, g.size_loss, g.area_loss)
        assert g.reference_levels
