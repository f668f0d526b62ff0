"""Training and evaluating a fracture model (scikit-learn), with honest cross-validation.

:func:`train_model` fits a scikit-learn pipeline — median imputation, standardisation and an L2
logistic regression (default) or gradient boosting — on a cohort's :class:`.model.FeatureTable`.

Honest evaluation: the cohort is split by stratified k-fold cross-validation (shuffled with a fixed
seed); in every fold the *whole* pipeline, imputation medians and scaling included, is fitted on
the training folds only and predicts the held-out fold. The out-of-fold probabilities give the
cross-validated AUC (with a percentile-bootstrap 95 % CI over exams), the operating point for the
target specificity (default 0.95, the published model's) and Youden's point, and the calibration.
The threshold chosen on the out-of-fold probabilities is stored with the final model, which is
then fitted on the whole cohort. (Choosing the threshold on the same out-of-fold predictions that
report its sensitivity is slightly optimistic; an external cohort, ``vfscreen evaluate``, is the
honest test of the threshold.)

Features that are missing in every training exam are dropped (and listed in the model's training
summary); the rest keep their missing values for the imputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from .. import __version__
from ..errors import DependencyError, InputError
from .fracture_model import INTENDED_USE, FeatureTable, FractureModel
from .metrics import summary_metrics, threshold_for_specificity

KIND_ALIASES = {"logistic": "logistic", "gradient_boosting": "gradient_boosting", "gradient-boosting": "gradient_boosting"}


@dataclass
class TrainingResult:
    """The fitted :class:`.model.FractureModel`, the out-of-fold probabilities of the training
    exams (same order as the table) and the fitted scikit-learn pipeline."""

    model: FractureModel
    out_of_fold: np.ndarray
    pipeline: object


def _pipeline(kind: str, seed: int):
    try:
        from sklearn.ensemble import GradientBoostingClassifier
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise DependencyError("training a model needs scikit-learn: pip install scikit-learn.") from None
    if kind == "logistic":
        estimator = LogisticRegression(C=1.0, max_iter=5000)
    else:
        estimator = GradientBoostingClassifier(n_estimators=100, learning_rate=0.1, max_depth=2, subsample=1.0,
                                               random_state=seed)
    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), estimator)


def train_model(table: FeatureTable, *, kind: str = "logistic", folds: int = 5, seed: int = 0,
                target_specificity: float = 0.95, name: str | None = None, demonstration: bool = False,
                intended_use: str = INTENDED_USE, bootstrap_resamples: int = 2000) -> TrainingResult:
    """Cross-validate and fit a model on ``table`` (see the module docstring).

    Raises:
        InputError: an unknown kind, a target specificity outside (0, 1), or too few exams of a
            class for ``folds`` folds.
    """
    from sklearn.model_selection import StratifiedKFold

    kind = KIND_ALIASES.get(kind, kind)
    if kind not in ("logistic", "gradient_boosting"):
        raise InputError(f"unknown model kind {kind!r}: use logistic or gradient-boosting.")
    if not 0.0 < target_specificity < 1.0:
        raise InputError(f"the target specificity must lie between 0 and 1, got {target_specificity}.")
    y = table.labels.astype(int)
    smallest = int(min((y == 1).sum(), (y == 0).sum()))
    if folds < 2 or smallest < folds:
        raise InputError(f"{folds}-fold cross-validation needs at least {max(folds, 2)} exams of each class; "
                         f"the cohort has {int((y == 1).sum())} positive and {int((y == 0).sum())} negative.")
    usable = [j for j in range(len(table.columns)) if np.isfinite(table.values[:, j]).any()]
    dropped = [table.columns[j] for j in range(len(table.columns)) if j not in usable]
    columns = tuple(table.columns[j] for j in usable)
    x = table.values[:, usable]

    out_of_fold = np.empty(y.size)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y):
        fold_pipeline = _pipeline(kind, seed).fit(x[train], y[train])
        out_of_fold[test] = fold_pipeline.predict_proba(x[test])[:, 1]
    threshold = threshold_for_specificity(y, out_of_fold, target_specificity)
    cv_metrics = summary_metrics(y, out_of_fold, threshold=threshold, target_specificity=target_specificity,
                                 resamples=bootstrap_resamples, seed=seed)
    cv_metrics |= {"folds": folds, "seed": seed, "scheme": "stratified k-fold, whole pipeline fitted inside each fold"}

    pipeline = _pipeline(kind, seed).fit(x, y)
    imputer, scaler, estimator = pipeline[0], pipeline[1], pipeline[-1]
    if kind == "logistic":
        parameters = {"coefficients": estimator.coef_[0].tolist(), "intercept": float(estimator.intercept_[0]),
                      "regularisation": "L2, C = 1"}
    else:
        prior = float(estimator.init_.class_prior_[1])
        trees = []
        for regressor in estimator.estimators_[:, 0]:
            tree = regressor.tree_
            trees.append({"children_left": tree.children_left.tolist(), "children_right": tree.children_right.tolist(),
                          "feature": tree.feature.tolist(), "threshold": tree.threshold.tolist(),
                          "value": tree.value[:, 0, 0].tolist()})
        parameters = {"learning_rate": float(estimator.learning_rate), "init_log_odds": float(np.log(prior / (1 - prior))),
                      "max_depth": int(estimator.max_depth), "trees": trees}
    model = FractureModel(
        name=name or f"fracture model trained on {y.size} exams", kind=kind, features=columns,
        imputation_median=np.asarray(imputer.statistics_, dtype=float), scaling_mean=np.asarray(scaler.mean_, dtype=float),
        scaling_scale=np.asarray(scaler.scale_, dtype=float), threshold=threshold,
        threshold_rule=f"lowest out-of-fold probability with specificity >= {target_specificity:g}",
        parameters=parameters,
        training={"exams": int(y.size), "positives": int(y.sum()), "label": table.label,
                  "dropped_features": dropped, "unlabelled_rows_left_out": table.dropped_unlabelled,
                  "cross_validation": cv_metrics, "scikit_learn": _sklearn_version()},
        intended_use=intended_use, demonstration=demonstration,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), software_version=__version__)
    return TrainingResult(model, out_of_fold, pipeline)


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def evaluate_model(model: FractureModel, table: FeatureTable, *, bootstrap_resamples: int = 2000,
                   seed: int = 0) -> tuple[dict, np.ndarray]:
    """The model's metrics on an external cohort at its own threshold (numpy only); returns the
    metrics and the probabilities. Features the table lacks are imputed (listed in the metrics)."""
    values = table.select(model.features)
    missing_columns = [name for name in model.features if name not in table.columns]
    probabilities = model.predict_proba(values)
    metrics = summary_metrics(table.labels, probabilities, threshold=model.threshold,
                              resamples=bootstrap_resamples, seed=seed)
    metrics["missing_columns"] = missing_columns
    metrics["label"] = table.label
    return metrics, probabilities
