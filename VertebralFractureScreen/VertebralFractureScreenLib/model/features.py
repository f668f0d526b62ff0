"""Exam features: one row of numbers per screened exam, the input of the fracture model.

The list is versioned (:data:`FEATURE_VERSION`): a model file names the version and the features
it was trained on, and a model of a version this software does not compute is refused. Change the
list only with a new version number. Each version keeps the features of the one before, with the
same definitions, and adds its own after them (:data:`FEATURE_NAMES_BY_VERSION`), so a model of
an older version finds its columns among the current features;
``exam_features(exam, rows, version=1)`` gives exactly version 1's.

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

Version 2 adds the contrast phase (:mod:`..measure.phase`, in ``exam.json``'s ``contrast``):

* the phase one-hot, ``phase_native`` … ``phase_delayed`` (not ordinal: trabecular enhancement
  is not monotone in time after injection, arterial < portal venous ≥ delayed): 1 for a confident
  phase, 0 for a phase the estimate rules out, missing for one of several candidates (``enhanced``
  or ``uncertain``), all missing when the exam has no phase (an older ``exam.json``);
* the unenhanced-equivalent HU, ``l1_hu_for_phase`` and ``lumbar_mean_hu_for_phase``: L1's and the
  lumbar mean's HU minus the phase's mean trabecular enhancement (``bone.l1_hu_for_phase``,
  ``bone.lumbar_mean_hu_for_phase``, :func:`..measure.attenuation.bone_for_phase`), missing where
  the enhancement is unknown.

Clinical columns (``age``, ``sex``) are not measured here: a cohort manifest passes them through
next to these features (:data:`CLINICAL_COLUMNS`).
"""

from __future__ import annotations

import math

from .. import levels as lv
from ..measure.phase import PHASES
from ..measure.confidence import PATHOLOGY_FLAGS
from ..report import measurements
from ..report.exam_folder import read_finished

FEATURE_VERSION = 2
"""Version of the feature list this software computes by default."""

FEATURE_NAMES_BY_VERSION: dict[int, tuple[str, ...]] = {
    1: measurements.keys(measurements.FEATURE_TABLE_V1),
    2: measurements.keys(measurements.FEATURE_TABLE),
}
"""The features of every version this software computes; a model of another version is refused."""

FEATURE_VERSIONS = tuple(FEATURE_NAMES_BY_VERSION)


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


def feature_names(version: int = FEATURE_VERSION) -> tuple[str, ...]:
    """The features of ``version``, in column order (ValueError for a version not computed here)."""
    try:
        return FEATURE_NAMES_BY_VERSION[version]
    except (KeyError, TypeError):
        raise ValueError(f"feature version {version!r} is not one of {FEATURE_VERSIONS}") from None


def exam_features(exam: dict, vertebrae: list[dict], version: int = FEATURE_VERSION) -> dict[str, float]:
    """The features of ``version`` of one exam from the content of its ``exam.json`` and the typed
    rows of its ``vertebrae.csv`` (as :attr:`.screening.ScreeningResult.vertebrae` holds them and
    :func:`.exam_folder.read_finished` reads them back). Missing values are NaN."""
    names = feature_names(version)
    features = dict.fromkeys(FEATURE_NAMES_BY_VERSION[1], MISSING)
    # A vertebra with a suspected lesion or hardware measures no osteoporosis (measure/lesions.py).
    vertebrae = [row for row in vertebrae if not PATHOLOGY_FLAGS.intersection(row.get("flags") or ())]
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
    if version >= 2:
        features.update(_phase_features(contrast, bone))
    return {name: features[name] for name in names}


def _phase_features(contrast: dict, bone: dict) -> dict[str, float]:
    """Version 2's features of the contrast phase (see the module docstring)."""
    phase = contrast.get("phase")
    candidates = contrast.get("phase_candidates")
    out = {f"phase_{name}": MISSING for name in PHASES}
    if isinstance(phase, str) and isinstance(candidates, list):
        confident = contrast.get("phase_confident") is True and phase in PHASES
        for name in PHASES:
            if confident:
                out[f"phase_{name}"] = float(name == phase)
            elif candidates and name not in candidates:
                out[f"phase_{name}"] = 0.0
    out["l1_hu_for_phase"] = _value(bone.get("l1_hu_for_phase"))
    out["lumbar_mean_hu_for_phase"] = _value(bone.get("lumbar_mean_hu_for_phase"))
    return out


def features_from_folder(folder) -> dict[str, float]:
    """The features of a finished exam folder (SPEC §5 files; ``exam.json`` marks it finished),
    read back through :func:`.exam_folder.read_finished`."""
    finished = read_finished(folder)
    return exam_features(finished.exam, finished.vertebrae)
