"""The report of a model's training or evaluation: ROC and calibration plots (PNG) and a short
text and HTML summary, written into one folder."""

from __future__ import annotations

import html
import math
import textwrap
from pathlib import Path

from .fracture_model import DEMONSTRATION_NOTE, FractureModel
from .metrics import roc_curve


def _percent(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def _point_line(name: str, point: dict) -> str:
    return (f"{name}: threshold {point['threshold']:.3f} · sensitivity {_percent(point['sensitivity'])} · "
            f"specificity {_percent(point['specificity'])} · PPV {_percent(point['ppv'])} · NPV {_percent(point['npv'])} "
            f"(TP {point['tp']}, FP {point['fp']}, TN {point['tn']}, FN {point['fn']})")


MIN_EXAMS_PER_CLASS = 20
"""Fewer exams than this with a fracture, or without one, and the AUC and its bootstrap interval
are marked unreliable: a percentile bootstrap over so few exams often gives a perfect AUC with an
interval of zero width, which says nothing about new exams (a common rule of thumb of at least
10–20 events per class for a validation estimate; Riley et al., BMJ 2020;368:m441, ask for far
more)."""


def small_sample_note(metrics: dict) -> str | None:
    """The warning for a table with fewer than :data:`MIN_EXAMS_PER_CLASS` exams in either class."""
    positives, negatives = metrics["positives"], metrics["exams"] - metrics["positives"]
    if min(positives, negatives) >= MIN_EXAMS_PER_CLASS:
        return None
    return (f"too few exams for a reliable AUC ({positives} with fracture, {negatives} without; at least"
            f" {MIN_EXAMS_PER_CLASS} of each are needed): treat the AUC, its interval and the operating point as"
            " a check that the pipeline runs, not as a performance estimate")


def summary_lines(model: FractureModel, metrics: dict, *, what: str) -> list[str]:
    """The report's text: ``what`` says which probabilities were scored (e.g. cross-validated)."""
    low, high = metrics["auc_ci95"]
    lines = [f"{model.name} ({model.kind}, features v{model.feature_version}, {len(model.features)} features)"]
    if model.demonstration:
        lines.append(DEMONSTRATION_NOTE)
    lines += [
        f"{what}: {metrics['exams']} exams, {metrics['positives']} with fracture",
        f"AUC {metrics['auc']:.3f} (95 % CI {low:.3f}–{high:.3f}, bootstrap over exams, "
        f"{metrics['bootstrap_resamples']} resamples)",
        *([f"warning: {note}"] if (note := small_sample_note(metrics)) else []),
        _point_line("operating point" + (f" (target specificity {metrics['operating_point']['target_specificity']:g})"
                                         if "target_specificity" in metrics["operating_point"] else " (model threshold)"),
                    metrics["operating_point"]),
        _point_line("Youden's point", metrics["youden_point"]),
        f"Brier score {metrics['brier']:.3f}",
    ]
    if metrics.get("missing_columns"):
        lines.append(f"columns missing from the table (imputed): {', '.join(metrics['missing_columns'])}")
    if model.training.get("dropped_features"):
        lines.append(f"features missing in every training exam (left out): {', '.join(model.training['dropped_features'])}")
    lines.append(f"intended use: {model.intended_use}")
    return lines


def _plots(folder: Path, labels, probabilities, metrics: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    wrapped = "\n".join(textwrap.wrap(title, 50))  # a long title ran off the 5-inch figure

    def finish(figure, axes, xlabel, ylabel, legend, name):
        axes.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01))
        axes.set_title(wrapped, fontsize=10)
        axes.legend(loc=legend, fontsize=8)
        figure.tight_layout()
        figure.savefig(folder / name)
        plt.close(figure)

    fpr, tpr = roc_curve(labels, probabilities)
    figure, axes = plt.subplots(figsize=(5, 5), dpi=110)
    axes.plot(fpr, tpr, color="#1f77b4", lw=2,
              label=f"AUC {metrics['auc']:.3f} ({metrics['auc_ci95'][0]:.3f}–{metrics['auc_ci95'][1]:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    for key, marker, colour, name in (("operating_point", "o", "#d62728", "operating point"),
                                      ("youden_point", "s", "#2ca02c", "Youden")):
        point = metrics[key]
        if not math.isnan(point["specificity"]) and not math.isnan(point["sensitivity"]):
            axes.plot(1 - point["specificity"], point["sensitivity"], marker, color=colour,
                      label=f"{name} (p ≥ {point['threshold']:.2f})")
    finish(figure, axes, "1 − specificity", "sensitivity", "lower right", "roc.png")

    bins = metrics["calibration"]
    figure, axes = plt.subplots(figsize=(5, 5), dpi=110)
    axes.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    axes.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", color="#1f77b4",
              label=f"deciles of prediction (Brier {metrics['brier']:.3f})")
    finish(figure, axes, "mean predicted probability", "observed fracture rate", "upper left", "calibration.png")


def write_report(folder, model: FractureModel, metrics: dict, labels, probabilities, *, what: str) -> dict[str, Path]:
    """Write ``roc.png``, ``calibration.png``, ``report.txt`` and ``report.html`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = ("DEMONSTRATION · " if model.demonstration else "") + what
    _plots(folder, labels, probabilities, metrics, title)
    lines = summary_lines(model, metrics, what=what)
    (folder / "report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = ""
    if model.kind == "logistic":
        coefficients = sorted(zip(model.features, model.parameters["coefficients"]), key=lambda c: -abs(c[1]))
        rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{c:+.3f}</td></tr>" for n, c in coefficients)
        rows = ("<h2>Coefficients (per standard deviation of each feature)</h2><table><tr><th>feature</th>"
                f"<th>log-odds</th></tr>{rows}</table>")
    body = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    (folder / "report.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(model.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em}td,th{padding:2px 8px;text-align:left}</style>"
        f"<h1>{html.escape(title)}</h1>{body}<img src='roc.png' alt='ROC curve'>"
        f"<img src='calibration.png' alt='calibration plot'>{rows}\n", encoding="utf-8")
    return {name: folder / name for name in ("roc.png", "calibration.png", "report.txt", "report.html")}
