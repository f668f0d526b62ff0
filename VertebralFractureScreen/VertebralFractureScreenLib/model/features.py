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

import math

from .. import levels as lv
from ..report import measurements
from ..report.exam_folder import read_finished

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
    """A cell of a feature table (``features.csv``, a manifest's clinical columns) as a number:
    NaN for None, empty text, text that is no number and non-finite values."""
    if value is None or value == "":
        return MISSING
    try:
        number = float(value)
    except (TypeError, ValueError):
        return MISSING
    return number if math.isfinite(number) else MISSING


def _value(number) -> float:
    """A measured value (float, int or None, as screening produced it or
    :func:`.exam_folder.read_finished` read it back) as a float, NaN when absent."""
    return MISSING if number is None else float(number)


def exam_features(exam: dict, vertebrae: list[dict]) -> dict[str, float]:
    """The features of one exam from the content of its ``exam.json`` and the typed rows of its
    ``vertebrae.csv`` (as :attr:`.screening.ScreeningResult.vertebrae` holds them and
    :func:`.exam_folder.read_finished` reads them back). Missing values are NaN."""
    features = dict.fromkeys(FEATURE_NAMES, MISSING)
    graded = [row for row in vertebrae if row.get("genant_grade") is not None]
    grades = [float(row["genant_grade"]) for row in graded]
    losses = [loss for loss in (_value(row.get("height_loss")) for row in graded) if not math.isnan(loss)]
    if grades:
        features["max_genant_grade"] = max(grades)
        features["fractured_count"] = float(sum(g >= 1 for g in grades))
        features["moderate_severe_count"] = float(sum(g >= 2 for g in grades))
    if losses:
        features["max_height_loss"] = max(losses)
    features["graded_count"] = float(len(grades))
    for row in vertebrae:
        name = f"hu_{row.get('level')}"
        if name in features and row.get("complete") is True:
            features[name] = _value(row.get("trabecular_hu_mean"))

    bone = exam.get("bone") or {}
    features["l1_hu"] = _value(bone.get("l1_hu"))
    features["lumbar_mean_hu"] = _value(bone.get("lumbar_mean_hu"))

    muscle = exam.get("muscle") or {}
    length_cm = _value(muscle.get("lumbar_length_mm")) / 10.0
    for group in ("autochthon", "iliopsoas"):
        total = (muscle.get("lumbar") or {}).get(group)
        if not total or not total.get("complete"):
            continue
        if length_cm > 0:
            features[f"{group}_volume_ml_per_cm"] = _value(total.get("volume_ml")) / length_cm
        features[f"{group}_mean_hu"] = _value(total.get("mean_hu"))
        features[f"{group}_imat_fraction"] = _value(total.get("imat_fraction"))

    contrast = exam.get("contrast") or {}
    features["aorta_hu"] = _value(contrast.get("aorta_hu"))
    flag = contrast.get("contrast_enhanced")
    features["contrast_enhanced"] = MISSING if flag is None else float(bool(flag))
    return features


def features_from_folder(folder) -> dict[str, float]:
    """The features of a finished exam folder (SPEC §5 files; ``exam.json`` marks it finished),
    read back through :func:`.exam_folder.read_finished`."""
    finished = read_finished(folder)
    return exam_features(finished.exam, finished.vertebrae)
