"""Per-vertebra confidence and the exam's review flag (issue 28, point 5)."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import pytest

from VertebralFractureScreenLib.measure import confidence as cf
from VertebralFractureScreenLib.measure.grading import VertebraGrade


def _grade(grade, loss, sd, flags=()):
    return VertebraGrade("L1", True, genant_grade=grade, grade_loss=loss, height_loss_sd=sd, flags=list(flags))


def test_the_grade_probability_follows_the_distance_to_a_boundary():
    assert cf.grade_probability(2, 0.30, 0.01) == pytest.approx(1.0, abs=1e-6)
    assert cf.grade_probability(0, 0.05, 0.02) == pytest.approx(1.0, abs=1e-6)
    # one SD from the 25 % boundary: about the normal distribution's 84 %
    assert cf.grade_probability(1, 0.23, 0.02) == pytest.approx(NormalDist().cdf(1.0) - NormalDist().cdf(-1.5), abs=1e-9)
    # on a boundary: half
    assert cf.grade_probability(2, 0.25, 0.03) == pytest.approx(0.5, abs=0.01)
    # a NaN SD counts as the smallest one
    assert cf.grade_probability(3, 0.5, math.nan) == pytest.approx(1.0, abs=1e-6)


def test_each_reason_to_doubt_lowers_the_confidence():
    clear = cf.vertebra_confidence(_grade(2, 0.32, 0.01), [], False)
    assert clear == 1.0
    assert cf.vertebra_confidence(_grade(2, 0.32, 0.01), ["one_sided_reference"], False) == 0.9
    assert cf.vertebra_confidence(_grade(2, 0.32, 0.01), [], True) == cf.LEVELS_DOUBTFUL_FACTOR
    assert cf.vertebra_confidence(_grade(2, 0.32, 0.01), ["suspected_lesion"], False) == cf.PATHOLOGY_FACTOR
    assert cf.vertebra_confidence(_grade(1, 0.245, 0.02), [], False) < 0.6
    assert cf.vertebra_confidence(VertebraGrade("L1", False), [], False) is None


def test_review_reasons_name_the_levels():
    rows = [{"level": "L1", "genant_grade": 1, "confidence": 0.55, "flags": ["grade_uncertain"]},
            {"level": "L2", "genant_grade": 0, "confidence": 0.5, "flags": []},
            {"level": "L3", "genant_grade": None, "confidence": None, "flags": ["instrumented"]}]
    reasons = cf.review_reasons(rows, levels_doubtful=True)
    assert reasons == ["fracture with confidence below 0.8: L1", "grade left open by the image's noise: L1",
                       "level labels doubtful (see level_check)", "cement or screws: L3"]
    assert cf.review_reasons([{"level": "L2", "genant_grade": 0, "confidence": 0.9, "flags": []}], False) == []


def test_screened_exams_carry_confidence_and_review(tmp_path):
    """The demo phantom's clear fractures need no review; every graded vertebra has a confidence
    and the CSV, exam.json and the terminal say the same."""
    from VertebralFractureScreenLib.cli import main
    from VertebralFractureScreenLib.report.exam_folder import read_finished

    assert main(["demo", "--out", str(tmp_path)]) == 0
    finished = read_finished(tmp_path / "results")
    graded = [r for r in finished.vertebrae if r["genant_grade"] is not None]
    assert graded and all(0.0 <= r["confidence"] <= 1.0 for r in graded)
    assert all(r["confidence"] is None or math.isnan(r["confidence"])
               for r in finished.vertebrae if r["genant_grade"] is None)
    exam = json.loads((tmp_path / "results" / "exam.json").read_text())
    assert exam["review"]["needed"] == bool(exam["review"]["reasons"])
    low = [r["level"] for r in graded if r["genant_grade"] >= 1 and r["confidence"] < cf.REVIEW_BELOW]
    assert exam["review"]["needed"] == bool(low or exam["fracture"]["uncertain_grade_levels"]
                                            or exam["level_check"]["doubtful"])
