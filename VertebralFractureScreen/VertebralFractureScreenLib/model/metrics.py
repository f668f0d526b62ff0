"""Discrimination and calibration metrics of a fracture model (numpy only).

Everything takes ``labels`` (1 = the exam shows a fracture, 0 = not) and ``probabilities`` (the
model's predicted probability of a fracture) as 1-D arrays of the same length.

* :func:`roc_auc`: area under the ROC curve (the Mann–Whitney statistic, ties counted half);
* :func:`bootstrap_auc_ci`: percentile bootstrap 95 % confidence interval of the AUC (resampling
  exams with replacement; resamples with one class only are drawn again);
* :func:`operating_point`: sensitivity, specificity, PPV and NPV at a probability threshold
  (positive when ``probability >= threshold``);
* :func:`threshold_for_specificity`: the lowest threshold whose specificity reaches a target (the
  published model's operating point was specificity 0.95);
* :func:`youden_threshold`: the threshold that maximises sensitivity + specificity − 1;
* :func:`calibration_bins`: observed fracture rate against mean predicted probability in
  quantile bins, and :func:`brier_score`.
"""

from __future__ import annotations


import numpy as np


def _arrays(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=float).ravel()
    p = np.asarray(probabilities, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    return y, p


def roc_auc(labels, probabilities) -> float:
    """Area under the ROC curve; NaN unless both classes are present."""
    y, p = _arrays(labels, probabilities)
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _midranks(p)
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    first = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks start+1 … end
    ranks = np.empty(values.size)
    ranks[order] = mean_rank[group]
    return ranks


def bootstrap_auc_ci(labels, probabilities, *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC (``level`` 0.95 → 2.5th and 97.5th
    percentiles of ``resamples`` AUCs of exams drawn with replacement)."""
    y, p = _arrays(labels, probabilities)
    if len(np.unique(y)) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < resamples:
        index = rng.integers(0, y.size, y.size)
        sample = y[index]
        if sample.min() == sample.max():
            continue
        values.append(roc_auc(sample, p[index]))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def operating_point(labels, probabilities, threshold: float) -> dict:
    """Confusion counts and sensitivity / specificity / PPV / NPV at ``threshold`` (NaN where a
    denominator is 0)."""
    y, p = _arrays(labels, probabilities)
    positive = p >= threshold
    tp = int(np.sum(positive & (y == 1)))
    fp = int(np.sum(positive & (y == 0)))
    tn = int(np.sum(~positive & (y == 0)))
    fn = int(np.sum(~positive & (y == 1)))

    def ratio(a, b):
        return a / b if b else float("nan")

    return {"threshold": float(threshold), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _candidate_thresholds(p: np.ndarray) -> np.ndarray:
    """Every distinct probability, plus one above the largest (nobody positive)."""
    values = np.unique(p)
    return np.r_[values, np.nextafter(values[-1], np.inf) if values.size else 1.0]


def _rates(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate thresholds (ascending) with the sensitivity and specificity at each."""
    thresholds = _candidate_thresholds(p)
    positives, negatives = np.sort(p[y == 1]), np.sort(p[y == 0])
    sensitivity = 1 - np.searchsorted(positives, thresholds, side="left") / max(positives.size, 1)
    specificity = np.searchsorted(negatives, thresholds, side="left") / max(negatives.size, 1)
    return thresholds, sensitivity, specificity


def threshold_for_specificity(labels, probabilities, target: float) -> float:
    """The lowest threshold whose specificity is at least ``target`` (the most sensitive such
    operating point)."""
    y, p = _arrays(labels, probabilities)
    if not np.any(y == 0):
        return float(np.min(p)) if p.size else 0.5
    thresholds, _, specificity = _rates(y, p)
    return float(thresholds[np.flatnonzero(specificity >= target)[0]])  # the last candidate has specificity 1


def youden_threshold(labels, probabilities) -> float:
    """The threshold that maximises Youden's J = sensitivity + specificity − 1 (the lowest such)."""
    y, p = _arrays(labels, probabilities)
    thresholds, sensitivity, specificity = _rates(y, p)
    j = sensitivity + specificity - 1
    return float(thresholds[np.flatnonzero(j > j.max() - 1e-12)[0]])


def roc_curve(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over all thresholds, from (1, 1) down to (0, 0)."""
    _, sensitivity, specificity = _rates(*_arrays(labels, probabilities))
    return 1 - specificity, sensitivity


def brier_score(labels, probabilities) -> float:
    """Mean squared difference between probability and outcome (0 is perfect)."""
    y, p = _arrays(labels, probabilities)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def calibration_bins(labels, probabilities, bins: int = 10) -> list[dict]:
    """Quantile bins of the predicted probability: each with its number of exams, mean predicted
    probability and observed fracture rate."""
    y, p = _arrays(labels, probabilities)
    order = np.argsort(p, kind="mergesort")
    rows = []
    for chunk in np.array_split(order, min(bins, max(y.size, 1))):
        if chunk.size:
            rows.append({"exams": int(chunk.size), "predicted": float(p[chunk].mean()), "observed": float(y[chunk].mean())})
    return rows


def summary_metrics(labels, probabilities, *, threshold: float, target_specificity: float | None = None,
                    resamples: int = 2000, seed: int = 0) -> dict:
    """The metrics a report shows: AUC with its bootstrap CI, the operating point at ``threshold``
    and at Youden's point, Brier score and calibration bins."""
    y, p = _arrays(labels, probabilities)
    low, high = bootstrap_auc_ci(y, p, resamples=resamples, seed=seed)
    youden = youden_threshold(y, p)
    return {
        "exams": int(y.size), "positives": int((y == 1).sum()),
        "auc": roc_auc(y, p), "auc_ci95": [low, high], "bootstrap_resamples": resamples,
        "operating_point": operating_point(y, p, threshold) | (
            {"target_specificity": target_specificity} if target_specificity is not None else {}),
        "youden_point": operating_point(y, p, youden),
        "brier": brier_score(y, p),
        "calibration": calibration_bins(y, p),
    }
