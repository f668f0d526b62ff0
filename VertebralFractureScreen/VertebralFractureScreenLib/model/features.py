"""Exam features: one row of numbers per screened exam, the input of the fracture model.

The list is versioned (:data:`FEATURE_VERSION`): a model file names the version and the features
it was trained on, and a model refuses features of another version. Change the list only with a
new version number.

Every feature is computed from one exam's SPEC §5 files (``exam.json`` and ``vertebrae.csv``), so
a cohort's ``features.csv`` can be rebuilt from finished exam folders at any time without
measuring again. A value that cannot be measured (no graded vertebra, L1 missing, no aorta label,
lumbar muscles cut by the field of view...) is missing — ``NaN`` here, an empty cell in CSV —
never silently zero; the model's imputation decides what to do with it.

Features (:data:`FEATURES`, from the measurement registry, gives each one's unit and definition):

* morphometry: the worst Genant grade and height loss among graded vertebrae, the number of
  fractured (grade ≥ 1) and of moderate-or-severe (grade ≥ 2) vertebrae, the number graded;
* bone attenuation: the exam's L1 trabecular HU (with the SPEC's fallback to the nearest
  complete non-fractured lumbar level), the mean HU of the non-fractured complete lumbar
  vertebrae, and the trabecular HU per level T4–L5 (complete vertebrae only);
* muscle, over the L1–L5 slabs (complete only): volume per centimetre of lumbar spine length
  (:func:`.muscles.lumbar_length_mm`) so that tall and short patients compare, mean HU and
  intramuscular fat fraction, for the autochthonous muscles and the iliopsoas (left + right);
* contrast: the aorta's mean HU and the ``contrast_enhanced`` flag (1 / 0).

Clinical columns (``age``, ``sex``) are not measured here: a cohort manifest passes them through
next to these features (:data:`CLINICAL_COLUMNS`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .. import levels as lv
from ..report import measurements

FEATURE_VERSION = 1
"""Version of the feature list below; a model trained on another version is refused."""


PER_LEVEL_HU = tuple(f"hu_{level}" for level in lv.SCREENING_LEVELS)

FEATURES = measurements.FEATURE_TABLE
"""The exam features of :data:`FEATURE_VERSION`, in column order (declared with their units and
definitions in the measurement registry)."""

FEATURE_NAMES: tuple[str, ...] = measurements.keys(FEATURES)
CLINICAL_COLUMNS = ("age", "sex")
"""Optional clinical columns a cohort manifest may pass through beside the features."""

MISSING = float("nan")


def number_or_nan(value) -> float:
    """A number, or NaN for None, empty text, text that is no number and non-finite values."""
    if value is None or value == "":
        return MISSING
    try:
        number = float(value)
    except (TypeError, ValueError):
        return MISSING
    return number if math.isfinite(number) else MISSING


def exam_features(exam: dict, vertebrae: list[dict]) -> dict[str, float]:
    """The features of one exam from the content of its ``exam.json`` (a dict) and the rows of its
    ``vertebrae.csv`` (dicts of text as :class:`csv.DictReader` gives them, or of values as
    :attr:`.screening.ScreeningResult.vertebrae` holds them). Missing values are NaN."""
    features = dict.fromkeys(FEATURE_NAMES, MISSING)
    graded = [row for row in vertebrae if not math.isnan(number_or_nan(row.get("genant_grade")))]
    grades = [number_or_nan(row["genant_grade"]) for row in graded]
    losses = [loss for loss in (number_or_nan(row.get("height_loss")) for row in graded) if not math.isnan(loss)]
    if grades:
        features["max_genant_grade"] = max(grades)
        features["fractured_count"] = float(sum(g >= 1 for g in grades))
        features["moderate_severe_count"] = float(sum(g >= 2 for g in grades))
    if losses:
        features["max_height_loss"] = max(losses)
    features["graded_count"] = float(len(grades))
    for row in vertebrae:
        name = f"hu_{row.get('level')}"
        if name in features and _is_true(row.get("complete")):
            features[name] = number_or_nan(row.get("trabecular_hu_mean"))

    bone = exam.get("bone") or {}
    features["l1_hu"] = number_or_nan(bone.get("l1_hu"))
    features["lumbar_mean_hu"] = number_or_nan(bone.get("lumbar_mean_hu"))

    muscle = exam.get("muscle") or {}
    length_cm = number_or_nan(muscle.get("lumbar_length_mm")) / 10.0
    for group in ("autochthon", "iliopsoas"):
        total = (muscle.get("lumbar") or {}).get(group)
        if not total or not total.get("complete"):
            continue
        if length_cm > 0:
            features[f"{group}_volume_ml_per_cm"] = number_or_nan(total.get("volume_ml")) / length_cm
        features[f"{group}_mean_hu"] = number_or_nan(total.get("mean_hu"))
        features[f"{group}_imat_fraction"] = number_or_nan(total.get("imat_fraction"))

    contrast = exam.get("contrast") or {}
    features["aorta_hu"] = number_or_nan(contrast.get("aorta_hu"))
    flag = contrast.get("contrast_enhanced")
    features["contrast_enhanced"] = MISSING if flag is None else float(bool(flag))
    return features


def _is_true(value) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def read_exam_folder(folder) -> tuple[dict, list[dict]]:
    """The content of a finished exam folder's ``exam.json`` and the rows of its ``vertebrae.csv``.

    Raises:
        FileNotFoundError: the folder has no ``exam.json`` (the exam is not finished).
    """
    folder = Path(folder)
    exam = json.loads((folder / "exam.json").read_text(encoding="utf-8"))
    with (folder / "vertebrae.csv").open(newline="", encoding="utf-8") as handle:
        return exam, list(csv.DictReader(handle))


def features_from_folder(folder) -> dict[str, float]:
    """The features of a finished exam folder (SPEC §5 files; ``exam.json`` marks it finished)."""
    return exam_features(*read_exam_folder(folder))
