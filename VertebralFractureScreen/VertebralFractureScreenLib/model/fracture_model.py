"""The multiparametric fracture model: a JSON model file and its application (numpy only).

A :class:`FractureModel` turns one exam's features (:mod:`.features`) into the probability that
the exam shows a fragility fracture. It is fitted by :mod:`.model_training` (scikit-learn), but
applying it needs only numpy: the model file holds every fitted number, so Slicer and headless
screening apply it without scikit-learn, and a model loaded from JSON gives the fitted object's
probabilities to 1e-9.

Model file (JSON only, never pickle: a model file can be shared and read without running code):

* ``format`` / ``format_version``: :data:`MODEL_FORMAT`, :data:`MODEL_FORMAT_VERSION`;
* ``name``, ``kind`` (``logistic`` or ``gradient_boosting``), ``created_utc``, ``software``;
* ``features``: the columns, in order, with ``feature_version`` (one of :data:`.features.FEATURE_VERSIONS`:
  a model of an older version is applied to its own columns, which every later version keeps);
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
A model file is data from outside, so loading also bounds what it may cost and refuses, with one
sentence naming the file, anything that could hang, crash or poison the probabilities:

* a file larger than :data:`MAX_MODEL_BYTES` (it is not read past that size);
* JSON nested deeper than :data:`MAX_JSON_DEPTH` levels (checked before parsing, so a file nested
  100,000 deep never reaches the recursive JSON parser);
* any number that is not finite (``NaN``, ``Infinity``, or a value too large for a float) or not a
  JSON number where a number belongs: imputation, scaling, coefficients, intercept, learning rate,
  initial log-odds, every tree threshold and node value, the operating threshold;
* a tree whose arrays differ in length, whose child or feature index is not an integer in range,
  whose node has one child only, that reaches a node twice (a cycle or a shared node), or that is
  deeper than :data:`MAX_TREE_DEPTH` (applying a checked tree takes at most that many steps).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from .features import (CLINICAL_COLUMNS, FEATURE_NAMES, FEATURE_VERSION, FEATURE_VERSIONS, feature_names,
                       number_or_nan)
from ..io.serialization import jsonable

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
MAX_MODEL_BYTES = 16 * 1024 * 1024
"""The largest model file read (16 MiB; a gradient-boosting model of 100 depth-2 trees is ~60 kB,
1,000 depth-6 trees ~13 MB). The worst file of this size (millions of empty lists) takes ~0.5 GB
and ~5 s to parse and refuse."""
MAX_JSON_DEPTH = 32
"""The deepest nesting of JSON arrays and objects a model file may have (a model file needs 5)."""
MAX_TREE_DEPTH = 64
"""The deepest regression tree a model may hold (root = depth 0; training uses depth 2)."""


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
        from ..io.files import atomic_write_text

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
    for _ in range(len(left) + 1):  # a path without a cycle visits each node at most once
        inner = left[node] >= 0
        if not inner.any():
            return value[node]
        go_left = x[rows, np.maximum(feature[node], 0)] <= threshold[node]
        node = np.where(inner, np.where(go_left, left[node], right[node]), node)
    raise ValueError("a regression tree has a cycle")


# ------------------------------------------------------------------------------------------------
# Loading with checks
# ------------------------------------------------------------------------------------------------


def load_model(path) -> FractureModel:
    """Read and check a model file.

    Raises:
        InputError: the file is missing, larger than :data:`MAX_MODEL_BYTES`, not JSON, nested
            deeper than :data:`MAX_JSON_DEPTH`, not a model file of a supported format version,
            made for another feature version, names unknown features, has inconsistent arrays, a
            number that is not finite, or a tree that is cyclic, out of range or too deep.
    """
    path = Path(path).expanduser()
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_MODEL_BYTES + 1)  # never more than the bound, whatever the file is
    except OSError as error:
        raise InputError(f"cannot read the model file {path}: {error.strerror or error}.") from None
    if len(raw) > MAX_MODEL_BYTES:
        raise InputError(f"{path} is not a model file: it is larger than {MAX_MODEL_BYTES // 2 ** 20} MiB.")
    not_json = f"{path} is not a model file: it is not JSON (model files are JSON only, never pickle)."
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(not_json) from None
    too_deep = f"{path} is not a model file: its JSON is nested deeper than {MAX_JSON_DEPTH} levels."
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise InputError(too_deep)
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except _NonFiniteConstant as error:
        raise InputError(f"{path} is damaged or incomplete (it holds {error}, but every number of a model must be "
                         "finite).") from None
    except RecursionError:  # cannot happen below MAX_JSON_DEPTH; kept so that it never becomes an internal error
        raise InputError(too_deep) from None
    except ValueError:
        raise InputError(not_json) from None
    return model_from_dict(data, source=f"{path} (sha256 {hashlib.sha256(raw).hexdigest()[:16]})")


class _NonFiniteConstant(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity`` in a model file (Python's json reads them; JSON has none)."""


def _refuse_constant(name: str):
    raise _NonFiniteConstant(name)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_A_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, without parsing it (strings, and the
    brackets in them, are left out; counted in chunks, so memory stays bounded by the file)."""
    brackets = np.frombuffer(_JSON_STRING.sub(b"", raw).translate(None, _NOT_A_BRACKET), dtype=np.uint8)
    depth = deepest = 0
    chunk = 1 << 20
    for start in range(0, brackets.size, chunk):
        part = brackets[start:start + chunk]
        running = depth + np.cumsum(np.where((part == ord("[")) | (part == ord("{")), 1, -1))
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
        if deepest > MAX_JSON_DEPTH:
            break
    return deepest


def model_from_dict(data, *, source: str = "") -> FractureModel:
    """A :class:`FractureModel` from the content of a model file (checked; see :func:`load_model`
    and the module docstring)."""
    where = source.split(" (sha256")[0] or "the model"
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise InputError(f"{where} is not a VertebralFractureScreen fracture model file.")
    version = data.get("format_version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION or version < 1:
        raise InputError(f"{where} has model format version {version!r}; this software reads version "
                         f"{MODEL_FORMAT_VERSION}: update VertebralFractureScreen or retrain the model.")
    feature_version = data.get("feature_version")
    if isinstance(feature_version, bool) or feature_version not in FEATURE_VERSIONS:
        raise InputError(f"{where} was trained on features of version {feature_version!r}, but this software "
                         f"computes versions {', '.join(map(str, FEATURE_VERSIONS))}: retrain it on a features.csv "
                         f"of version {FEATURE_VERSION}.")
    features = data.get("features")
    if (not isinstance(features, list) or not features or not all(isinstance(name, str) for name in features)
            or len(set(features)) != len(features)):
        raise InputError(f"{where} has no valid feature list.")
    unknown = [name for name in features if name not in feature_names(feature_version) + CLINICAL_COLUMNS]
    if unknown:
        raise InputError(f"{where} uses features this software does not compute: {', '.join(unknown)}.")
    kind = data.get("kind")
    if kind not in KINDS or not isinstance(data.get(kind), dict):
        raise InputError(f"{where} has an unknown model kind {kind!r} (expected {' or '.join(KINDS)}).")
    try:
        n = len(features)
        median = _vector(_section(data, "imputation")["values"], n, "imputation values")
        mean = _vector(_section(data, "scaling")["mean"], n, "scaling means")
        scale = _vector(data["scaling"]["scale"], n, "scaling scales")
        if np.any(scale <= 0):
            raise ValueError("scaling scales must be positive")
        parameters = data[kind]
        if kind == "logistic":
            _vector(parameters["coefficients"], n, "coefficients")
            _number(parameters["intercept"], "the intercept")
        else:
            _number(parameters["learning_rate"], "the learning rate")
            _number(parameters["init_log_odds"], "the initial log-odds")
            trees = parameters["trees"]
            if not isinstance(trees, list):
                raise ValueError("the trees are not a list")
            for number, tree in enumerate(trees):
                _check_tree(tree, f"tree {number}", n)
        threshold = _number(_section(data, "threshold")["value"], "the threshold")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("the threshold is not a probability")
        training = data.get("training") or {}
        if not isinstance(training, dict) or not isinstance(training.get("cross_validation") or {}, dict):
            raise ValueError("its training record is not an object")
        dropped = training.get("dropped_features") or []
        if not isinstance(dropped, list) or not all(isinstance(name, str) for name in dropped):
            raise ValueError("its dropped features are not a list of names")
    except KeyError as error:
        raise InputError(f"{where} is damaged or incomplete (it has no {error}).") from None
    except (TypeError, ValueError) as error:
        raise InputError(f"{where} is damaged or incomplete ({error}).") from None
    software = data.get("software") if isinstance(data.get("software"), dict) else {}
    return FractureModel(
        name=str(data.get("name") or "unnamed model"), kind=kind, features=tuple(features),
        imputation_median=median, scaling_mean=mean, scaling_scale=scale, threshold=threshold,
        parameters=parameters, threshold_rule=str(data["threshold"].get("rule", "")),
        training=training, intended_use=str(data.get("intended_use") or INTENDED_USE),
        demonstration=bool(data.get("demonstration")), feature_version=feature_version,
        created_utc=str(data.get("created_utc", "")), software_version=str(software.get("version", "")), source=source)


def _section(data: dict, key: str) -> dict:
    value = data[key]
    if not isinstance(value, dict):
        raise ValueError(f"its {key} is not an object")
    return value


def _number(value, what: str) -> float:
    """A JSON number that is finite (bools and text are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the range of a float
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{what} is not a finite number")
    return number


def _vector(values, n: int, what: str) -> np.ndarray:
    try:
        if not isinstance(values, list) or len(values) != n:
            raise ValueError
        return np.array([_number(value, what) for value in values], dtype=float)
    except ValueError:
        raise ValueError(f"{what} must be {n} finite numbers") from None


TREE_ARRAYS = ("children_left", "children_right", "feature", "threshold", "value")
"""The arrays of a regression tree, one entry per node (scikit-learn's ``tree_`` attributes)."""


def _check_tree(tree, what: str, n_features: int) -> None:
    """Refuse a regression tree that could not be applied in bounded time or would give NaN: its
    arrays must be equally long; every number finite; every child ``-1`` (leaf) or a node index,
    both or neither; every inner node's feature a column index; each node reached once from the
    root (no cycle, no shared node) and no deeper than :data:`MAX_TREE_DEPTH`."""
    if not isinstance(tree, dict):
        raise ValueError(f"{what} is not an object")
    for key in TREE_ARRAYS:
        if not isinstance(tree.get(key), list) or not tree[key]:
            raise ValueError(f"{what} has no {key} list")
    nodes = len(tree["children_left"])
    if any(len(tree[key]) != nodes for key in TREE_ARRAYS):
        raise ValueError(f"the arrays of {what} differ in length")

    def indices(key: str, low: int, high: int) -> list[int]:
        values = tree[key]
        for node, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
                raise ValueError(f"{key}[{node}] of {what} is {value!r}, not an index from {low} to {high - 1}")
        return values

    left, right = indices("children_left", -1, nodes), indices("children_right", -1, nodes)
    feature = indices("feature", -2, n_features)
    for key in ("threshold", "value"):
        for node, value in enumerate(tree[key]):
            _number(value, f"{key}[{node}] of {what}")
    depth = [-1] * nodes
    depth[0], stack = 0, [0]
    while stack:
        node = stack.pop()
        if left[node] < 0 and right[node] < 0:
            continue
        if left[node] < 0 or right[node] < 0 or feature[node] < 0:
            raise ValueError(f"node {node} of {what} is neither a leaf nor a split")
        for child in (left[node], right[node]):
            if depth[child] >= 0:
                raise ValueError(f"node {child} of {what} is reached twice, so the tree has a cycle or a shared node")
            depth[child] = depth[node] + 1
            if depth[child] > MAX_TREE_DEPTH:
                raise ValueError(f"{what} is deeper than {MAX_TREE_DEPTH} levels")
            stack.append(child)


def demo_model_path() -> Path:
    """The demonstration model shipped with the extension (``Resources/Models/``)."""
    return Path(__file__).resolve().parents[2] / "Resources" / "Models" / "demo_fracture_model.json"


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
    known = {str(version) for version in FEATURE_VERSIONS}
    if len(versions) > 1 or versions - known:
        raise InputError(f"{path} holds features of version {', '.join(sorted(versions))}; this software reads "
                         f"one version of {', '.join(sorted(known))} a file: rebuild it with 'vfscreen cohort'.")
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
