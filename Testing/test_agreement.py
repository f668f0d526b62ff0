"""Tests of the agreement measures used against expert Genant readings."""

from __future__ import annotations

import math
import random

import pytest

from VertebralFractureScreenLib.report.agreement import agreement, confusion, weighted_kappa


def test_kappa_of_perfect_and_of_reversed_gradings():
    grades = [0, 0, 1, 2, 3, 0, 2]
    assert weighted_kappa(grades, grades) == pytest.approx(1.0)
    # Two vertebrae, each rater calls the other's: observed disagreement 1/3, chance 1/6.
    assert weighted_kappa([0, 1], [1, 0]) == pytest.approx(-1.0)
    assert math.isnan(weighted_kappa([], []))
    assert math.isnan(weighted_kappa([0, 0], [0, 0]))  # one grade only: kappa undefined


def test_kappa_matches_an_independent_implementation():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(4)
    expert = [rng.choice((0, 0, 0, 1, 2, 3)) for _ in range(200)]
    tool = [min(3, max(0, e + rng.choice((-1, 0, 0, 0, 1)))) for e in expert]
    assert weighted_kappa(expert, tool) == pytest.approx(
        metrics.cohen_kappa_score(expert, tool, weights="linear", labels=[0, 1, 2, 3]))


def test_sensitivity_specificity_and_confusion():
    expert = [0, 0, 0, 0, 1, 1, 2, 2, 3]
    tool = [0, 0, 1, 2, 0, 1, 1, 2, 3]
    a = agreement(expert, tool)
    assert a.confusion == confusion(expert, tool)
    assert a.confusion[0] == [2, 1, 1, 0] and a.confusion[2] == [0, 1, 1, 0]
    assert (a.normal, a.fractured_g1, a.fractured_g2) == (4, 5, 3)
    assert a.specificity == pytest.approx(2 / 4) and a.specificity_g2 == pytest.approx(3 / 4)
    assert a.sensitivity_g1 == pytest.approx(4 / 5) and a.sensitivity_g2 == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        confusion([0, 1], [0])
