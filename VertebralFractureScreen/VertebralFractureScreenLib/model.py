"""The multiparametric fracture model: a JSON model file and its application (numpy only).

A :class:`FractureModel` turns one exam's features (:mod:`.features`) into the probability that
the exam shows a fragility fracture. It is fitted by :mod:`.model_training` (scikit-learn), but
applying it needs only numpy: the model file holds every fitted number, so Slicer and headless
screening apply it without scikit-learn, and a model loaded from JSON gives the fitted object's
probabilities to 1e-9.

Model file (JSON only, never pickle: a model file can be shared and read without running code):

* ``format`` / ``format_version``: :data:`MODEL_FORMAT`, :data:`MODEL_FORMAT_VERSION`;
* ``name``, ``kind`` (``logistic`` or ``gradient_boosting``), ``created_utc``, ``software``;
* ``features``: the columns, in order, with ``feature_version`` (:data:`.features.FEATURE_VERSION`);
* ``imputation``: the median of each feature in the training cohort (missing values take it);
* ``scaling``: mean and scale of each feature after imputation (standardisation);
* ``logistic``: ``coefficients`` and ``intercept`` on the standardised features, or
  ``gradient_boosting``: ``learning_rate``, ``init_log_odds`` and every regression tree as arrays
  (``children_left``, ``children_right``, ``feature``, ``threshold``, ``value``);
* ``threshold``: the operating point (probability ≥ threshold → positive) and how it was chosen;
* ``training``: the cohort (exams, positives, label column, dropped features) and its
  cross-validated metrics; ``intended_use``; ``demonstration`` (True for the demo model).

Loading (:func:`load_model`) checks the format, its version, the feature version and the feature
names, and the sizes of every array; a file that does not match is refused with one sentence.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError
from .features import CLINICAL_COLUMNS, FEATURE_NAMES, FEATURE_VERSION, number_or_nan
from .serialization import jsonable

MODEL_FORMAT = "VertebralFractureScreen fracture model"
MODEL_FORMAT_VERSION = 1
KINDS = ("logistic", "gradient_boosting")
INTENDED_USE = ("Research use only: estimates the probability that a CT exam shows an osteoporotic vertebral "
                "fracture, to prioritise exams for review by a radiologist. Not a medical device; not clinically "
                "validated; valid only for cohorts like the training cohort.")
DEMONSTRATION_NOTE = ("DEMONSTRATION MODEL trained on synthetic phantoms: its probability is not a clinical "
                      "result and must not be used for patients.")
KNOWN_COLUMNS = FEATURE_NAMES + CLINICAL_COLUMNS
"""Columns a model may use: the exam features and the optional clinical columns."""


def clinical_value(name: str, text) -> float:
    """A clinical column as a number: ``age`` in years; ``sex`` 1 for female (F, female, w), 0 for
    male (M, male), NaN otherwise or when empty."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return float("nan")
    if name == "sex":
        value = str(text).strip().lower()
        return 1.0 if value in ("f", "female", "w", "woman", "1") else 0.0 if value in ("m", "male", "man", "0") \
            else float("nan")
    return number_or_nan(text)


@dataclass
class FractureModel:
    """A fitted fracture model (see the module docstring for the meaning of each field)."""

    name: str
    kind: str
    features: tuple[str, ...]
    imputation_median: np.ndarray
    scaling_mean: np.ndarray
    scaling_scale: np.ndarray
    threshold: float
    parameters: dict
    threshold_rule: str = ""
    training: dict = field(default_factory=dict)
    intended_use: str = INTENDED_USE
    demonstration: bool = False
    feature_version: int = FEATURE_VERSION
    created_utc: str = ""
    software_version: str = __version__
    source: str = ""
    """Where it was loaded from and the file's SHA-256 (set by :func:`load_model`)."""

    # -- applying -------------------------------------------------------------------------------

    def standardised(self, values) -> np.ndarray:
        """``(n, features)`` values with NaN for missing → imputed and standardised matrix."""
        x = np.array(values, dtype=float, ndmin=2)
        if x.shape[1] != len(self.features):
            raise ValueError(f"expected {len(self.features)} feature columns, got {x.shape[1]}")
        x = np.where(np.isnan(x), self.imputation_median, x)
        return (x - self.scaling_mean) / self.scaling_scale

    def predict_proba(self, values) -> np.ndarray:
        """Probability of a fracture for each row of ``values`` (``(n, features)``, NaN = missing)."""
        z = self.standardised(values)
        if self.kind == "logistic":
            logit = z @ np.asarray(self.parameters["coefficients"], dtype=float) + float(self.parameters["intercept"])
        else:
            logit = np.full(z.shape[0], float(self.parameters["init_log_odds"]))
            rate = float(self.parameters["learning_rate"])
            z32 = z.astype(np.float32)  # scikit-learn's trees compare float32 features
            for tree in self.parameters["trees"]:
                logit += rate * _tree_values(tree, z32)
        return 1.0 / (1.0 + np.exp(-logit))

    def row_of(self, features: dict) -> tuple[np.ndarray, list[str]]:
        """One exam's values in the model's column order, and the names of the missing ones."""
        values = np.array([clinical_value(name, features.get(name)) if name in CLINICAL_COLUMNS
                           else number_or_nan(features.get(name)) for name in self.features])
        return values, [name for name, value in zip(self.features, values) if math.isnan(value)]

    def apply(self, features: dict) -> dict:
        """The ``model`` entry of ``exam.json`` for one exam's features: name, probability,
        threshold, positive, provenance, the imputed features and, for the demo model, a note."""
        values, missing = self.row_of(features)
        probability = float(self.predict_proba(values[None])[0])
        output = {
            "name": self.name,
            "probability": probability,
            "threshold": self.threshold,
            "positive": probability >= self.threshold,
            "provenance": self.provenance(),
            "imputed_features": missing,
            "demonstration": self.demonstration,
            "note": DEMONSTRATION_NOTE if self.demonstration else self.intended_use,
        }
        return output

    def provenance(self) -> dict:
        return {"kind": self.kind, "feature_version": self.feature_version, "created_utc": self.created_utc,
                "software_version": self.software_version, "training_exams": self.training.get("exams"),
                "training_positives": self.training.get("positives"), "label": self.training.get("label"),
                "cv_auc": (self.training.get("cross_validation") or {}).get("auc"), "file": self.source}

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return jsonable({
            "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
            "name": self.name, "kind": self.kind, "created_utc": self.created_utc or _now(),
            "software": {"name": "VertebralFractureScreen", "version": self.software_version},
            "demonstration": self.demonstration, "intended_use": self.intended_use,
            "feature_version": self.feature_version, "features": list(self.features),
            "imputation": {"strategy": "median", "values": self.imputation_median},
            "scaling": {"mean": self.scaling_mean, "scale": self.scaling_scale},
            self.kind: self.parameters,
            "threshold": {"value": self.threshold, "rule": self.threshold_rule},
            "training": self.training,
        })

    def save(self, path) -> Path:
        """Write the model file atomically."""
        from .imageio import atomic_write_text

        path = Path(path).expanduser()
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _tree_values(tree: dict, x: np.ndarray) -> np.ndarray:
    """Leaf values of a scikit-learn regression tree for every row of ``x`` (float32)."""
    left = np.asarray(tree["children_left"], dtype=np.int64)
    right = np.asarray(tree["children_right"], dtype=np.int64)
    feature = np.asarray(tree["feature"], dtype=np.int64)
    threshold = np.asarray(tree["threshold"], dtype=float)
    value = np.asarray(tree["value"], dtype=float)
    node = np.zeros(x.shape[0], dtype=np.int64)
    rows = np.arange(x.shape[0])
    while True:
        inner = left[node] >= 0
        if not inner.any():
            return value[node]
        go_left = x[rows, np.maximum(feature[node], 0)] <= threshold[node]
        node = np.where(inner, np.where(go_left, left[node], right[node]), node)


# ------------------------------------------------------------------------------------------------
# Loading with checks
# ------------------------------------------------------------------------------------------------


def load_model(path) -> FractureModel:
    """Read and check a model file.

    Raises:
        InputError: the file is missing, not JSON, not a model file of a supported format version,
            made for another feature version, names unknown features, or has inconsistent arrays.
    """
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except OSError as error:
        raise InputError(f"cannot read the model file {path}: {error.strerror or error}.") from None
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{path} is not a model file: it is not JSON (model files are JSON only, never pickle).") from None
    return model_from_dict(data, source=f"{path} (sha256 {hashlib.sha256(raw).hexdigest()[:16]})")


def model_from_dict(data, *, source: str = "") -> FractureModel:
    """A :class:`FractureModel` from the content of a model file (checked; see :func:`load_model`)."""
    where = source.split(" (sha256")[0] or "the model"
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise InputError(f"{where} is not a VertebralFractureScreen fracture model file.")
    version = data.get("format_version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION or version < 1:
        raise InputError(f"{where} has model format version {version!r}; this software reads version "
                         f"{MODEL_FORMAT_VERSION}: update VertebralFractureScreen or retrain the model.")
    if data.get("feature_version") != FEATURE_VERSION:
        raise InputError(f"{where} was trained on features of version {data.get('feature_version')!r}, but this "
                         f"software computes version {FEATURE_VERSION}: retrain it on a features.csv of this version.")
    features = data.get("features")
    if not isinstance(features, list) or not features or len(set(features)) != len(features):
        raise InputError(f"{where} has no valid feature list.")
    unknown = [name for name in features if name not in KNOWN_COLUMNS]
    if unknown:
        raise InputError(f"{where} uses features this software does not compute: {', '.join(unknown)}.")
    kind = data.get("kind")
    if kind not in KINDS or not isinstance(data.get(kind), dict):
        raise InputError(f"{where} has an unknown model kind {kind!r} (expected {' or '.join(KINDS)}).")
    try:
        n = len(features)
        median = _vector(data["imputation"]["values"], n, "imputation values")
        mean = _vector(data["scaling"]["mean"], n, "scaling means")
        scale = _vector(data["scaling"]["scale"], n, "scaling scales")
        if np.any(scale <= 0):
            raise ValueError("scaling scales must be positive")
        parameters = data[kind]
        if kind == "logistic":
            _vector(parameters["coefficients"], n, "coefficients")
            float(parameters["intercept"])
        else:
            float(parameters["learning_rate"]), float(parameters["init_log_odds"])
            for tree in parameters["trees"]:
                sizes = {len(tree[key]) for key in ("children_left", "children_right", "feature", "threshold", "value")}
                if len(sizes) != 1 or max(tree["feature"]) >= n:
                    raise ValueError("a tree's arrays do not match")
        threshold = float(data["threshold"]["value"])
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("the threshold is not a probability")
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{where} is damaged or incomplete ({error}).") from None
    return FractureModel(
        name=str(data.get("name") or "unnamed model"), kind=kind, features=tuple(features),
        imputation_median=median, scaling_mean=mean, scaling_scale=scale, threshold=threshold,
        parameters=parameters, threshold_rule=str(data["threshold"].get("rule", "")),
        training=data.get("training") or {}, intended_use=str(data.get("intended_use") or INTENDED_USE),
        demonstration=bool(data.get("demonstration")), feature_version=FEATURE_VERSION,
        created_utc=str(data.get("created_utc", "")), software_version=str((data.get("software") or {}).get("version", "")),
        source=source)


def _vector(values, n: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.shape != (n,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be {n} finite numbers")
    return array


def demo_model_path() -> Path:
    """The demonstration model shipped with the extension (``Resources/Models/``)."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / "demo_fracture_model.json"


def resolve_model(model) -> FractureModel | None:
    """A :class:`FractureModel`, a path, ``"demo"`` (the shipped demonstration model) or None."""
    if model is None or isinstance(model, FractureModel):
        return model
    return load_model(demo_model_path() if str(model) == "demo" else model)


# ------------------------------------------------------------------------------------------------
# Feature tables (features.csv)
# ------------------------------------------------------------------------------------------------


@dataclass
class FeatureTable:
    """A cohort's features: ``values`` ``(exams, columns)`` with NaN for missing, the ``columns``
    (exam features and clinical columns found in the file), ``labels`` (1/0) and ``exam_ids``."""

    exam_ids: list[str]
    columns: tuple[str, ...]
    values: np.ndarray
    labels: np.ndarray
    label: str
    dropped_unlabelled: int = 0

    def select(self, columns) -> np.ndarray:
        """The values of ``columns`` in that order; a column the table lacks is all missing."""
        index = {name: i for i, name in enumerate(self.columns)}
        out = np.full((len(self.exam_ids), len(columns)), np.nan)
        for j, name in enumerate(columns):
            if name in index:
                out[:, j] = self.values[:, index[name]]
        return out


_POSITIVE = {"1", "1.0", "true", "yes", "y", "fracture", "positive"}
_NEGATIVE = {"0", "0.0", "false", "no", "n", "none", "negative"}


def read_feature_table(path, label: str) -> FeatureTable:
    """Read a ``features.csv`` (from ``vfscreen cohort``) with a label column.

    Label values: 1/0, true/false, yes/no (case-insensitive); rows with an empty label are left out
    (counted in ``dropped_unlabelled``).

    Raises:
        InputError: unreadable file, no such label column, an unknown label value, features of
            another version, no exam feature column, or fewer than two classes.
    """
    import csv

    path = Path(path).expanduser()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read the features file {path}: {getattr(error, 'strerror', None) or error}.") from None
    if label not in header:
        raise InputError(f"{path} has no label column {label!r} (columns: {', '.join(header[:12])}"
                         f"{', ...' if len(header) > 12 else ''}).")
    versions = {row.get("features_version", "") for row in rows} - {""}
    if versions and versions != {str(FEATURE_VERSION)}:
        raise InputError(f"{path} holds features of version {', '.join(sorted(versions))}; this software uses "
                         f"version {FEATURE_VERSION}: rebuild it with 'vfscreen cohort'.")
    columns = tuple(name for name in KNOWN_COLUMNS if name in header and name != label)
    if not any(name in FEATURE_NAMES for name in columns):
        raise InputError(f"{path} has none of the exam feature columns (is it a features.csv from 'vfscreen cohort'?).")
    exam_ids, values, labels, dropped = [], [], [], 0
    for number, row in enumerate(rows, start=2):
        text = (row.get(label) or "").strip().lower()
        if not text:
            dropped += 1
            continue
        if text not in _POSITIVE | _NEGATIVE:
            raise InputError(f"line {number} of {path}: label {row.get(label)!r} in column {label!r} is not "
                             "1/0, true/false or yes/no.")
        labels.append(1.0 if text in _POSITIVE else 0.0)
        exam_ids.append(row.get("exam_id") or f"line {number}")
        values.append([clinical_value(name, row.get(name)) if name in CLINICAL_COLUMNS else number_or_nan(row.get(name))
                       for name in columns])
    y = np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        raise InputError(f"{path} needs exams of both classes in column {label!r} "
                         f"(found {int((y == 1).sum())} positive and {int((y == 0).sum())} negative).")
    return FeatureTable(exam_ids, columns, np.asarray(values, dtype=float).reshape(len(exam_ids), len(columns)), y,
                        label, dropped)
