"""The cohort's tables, ``features.csv``, ``errors.csv`` and ``predictions.csv``, rebuilt from the
exam folders after a run (and rewritten only when their text changes)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InputError
from ..io.serialization import csv_text
from ..model.features import FEATURE_NAMES, FEATURE_VERSION, exam_features
from ..report.exam_folder import read_finished
from .exams import CohortExam
from .failures import ENVIRONMENT_FAILURE, INPUT_FAILURE, _kind_of, _reason_of
from .one_exam import ExamOutcome, _read_error, exam_folder, exam_state
from .writes import _fault, _write_if_changed

FEATURES_FILE = "features.csv"
ERRORS_FILE = "errors.csv"
PREDICTIONS_FILE = "predictions.csv"
"""The model's output per finished exam, when the exams were screened with a model."""
PREDICTION_COLUMNS = ("exam_id", "model", "probability", "threshold", "positive", "demonstration", "imputed_features")
ERROR_COLUMNS = ("exam_id", "stage", "reason", "kind")


def _cell(value) -> str:
    """Cohort tables keep 6 significant digits (probabilities near 0 stay distinct), where
    :func:`.io.serialization.csv_cell` keeps 4 decimals (``0.000123`` would become ``0.0001``)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _csv_text(columns: Sequence[str], rows: Iterable[dict]) -> str:
    """A cohort table: :func:`.io.serialization.csv_text` (formula-safe) with :func:`_cell`."""
    return csv_text(columns, rows, cell=_cell)


def write_tables(exams: Sequence[CohortExam], out, model=None) -> tuple[int, int]:
    """Rebuild ``features.csv`` and ``errors.csv`` (and ``predictions.csv``) from the exam
    folders; returns the numbers of finished and failed exams. Files whose content would not
    change are left alone. ``model``: a :class:`.model.FractureModel` whose predictions replace
    those the exams were screened with (from their features, without screening them again); None:
    each exam's own.

    Raises:
        InputError: a table cannot be written (one sentence; the tables written before stay whole)."""
    done, failed, _ = _write_tables(exams, out, model=model)
    return done, failed


def _write_tables(exams: Sequence[CohortExam], out, unrecorded: dict[str, ExamOutcome] | None = None,
                  model=None) -> tuple[int, int, int]:
    """:func:`write_tables`, also listing the failures of this run whose ``error.json`` could not
    be written (``unrecorded``); returns the numbers of finished, failed and of those failed the
    ones failed by the environment."""
    out = Path(out)
    unrecorded = unrecorded or {}
    passthrough = list(dict.fromkeys(name for exam in exams for name, _ in exam.columns))
    feature_rows, error_rows, prediction_rows = [], [], []
    for exam in exams:
        if exam.refused is not None:
            error_rows.append({"exam_id": exam.exam_id, "stage": "input", "reason": exam.refused,
                               "kind": INPUT_FAILURE})
            continue
        folder = exam_folder(out, exam.exam_id)
        state = exam_state(folder)
        if state == "done":
            try:
                finished = read_finished(folder)
                exam_json = finished.exam
                features = exam_features(exam_json, finished.vertebrae)
                output = model.apply(features) if model is not None else (exam_json.get("model") or {})
            except (OSError, ValueError, KeyError) as error:  # a folder edited by hand
                error_rows.append({"exam_id": exam.exam_id, "stage": "features",
                                   "reason": f"cannot read its results: {error}.", "kind": _kind_of(error)})
                continue
            feature_rows.append({"exam_id": exam.exam_id, **dict(exam.columns), "features_version": FEATURE_VERSION,
                                 **features})
            if output.get("probability") is not None:
                prediction_rows.append({"exam_id": exam.exam_id, "model": output.get("name"),
                                        "probability": output["probability"], "threshold": output.get("threshold"),
                                        "positive": "true" if output.get("positive") else "false",
                                        "demonstration": "true" if output.get("demonstration") else "false",
                                        "imputed_features": ";".join(output.get("imputed_features") or [])})
        elif state == "failed":
            error = _read_error(folder)
            error_rows.append({"exam_id": exam.exam_id, "stage": error.get("stage", ""),
                               "reason": error.get("reason", ""), "kind": error["kind"]})
        elif exam.exam_id in unrecorded:
            outcome = unrecorded[exam.exam_id]
            error_rows.append({"exam_id": exam.exam_id, "stage": outcome.stage, "reason": outcome.reason,
                               "kind": ENVIRONMENT_FAILURE})  # no error.json: a re-run screens it again
    try:
        _fault("tables")
        _write_if_changed(out / FEATURES_FILE,
                          _csv_text(["exam_id", *passthrough, "features_version", *FEATURE_NAMES], feature_rows))
        _write_if_changed(out / ERRORS_FILE, _csv_text(ERROR_COLUMNS, error_rows))
        if prediction_rows or (out / PREDICTIONS_FILE).exists():
            _write_if_changed(out / PREDICTIONS_FILE, _csv_text(PREDICTION_COLUMNS, prediction_rows))
    except OSError as error:
        raise InputError(f"cannot write the cohort's tables in {out}: {_reason_of(error)}") from error
    failures = [row for row in error_rows if row["stage"] != "features"]
    return (len(feature_rows), len(failures), sum(row["kind"] == ENVIRONMENT_FAILURE for row in failures))
