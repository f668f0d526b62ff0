"""Agreement of fracture grades with expert readers: confusion matrix, sensitivity, specificity and
linearly weighted kappa (pure functions, no I/O).

Grades are integers 0–3 (Genant). Inputs are paired sequences ``(expert, tool)``, one pair per
vertebra that both graded. The kappa is Cohen's weighted kappa with linear disagreement weights
``|i - j| / 3`` (Cohen, Psychol Bull 1968): the agreement measure that inter-reader studies of
Genant's method report (about 0.6 between expert readers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GRADES = (0, 1, 2, 3)


def confusion(expert: Sequence[int], tool: Sequence[int]) -> list[list[int]]:
    """4 x 4 counts, rows the expert's grade, columns the tool's."""
    if len(expert) != len(tool):
        raise ValueError("expert and tool grades must pair up")
    table = [[0] * len(GRADES) for _ in GRADES]
    for e, t in zip(expert, tool):
        table[int(e)][int(t)] += 1
    return table


def weighted_kappa(expert: Sequence[int], tool: Sequence[int]) -> float:
    """Cohen's linearly weighted kappa of two gradings (NaN when undefined: no pairs, or both
    raters used one grade only)."""
    table = confusion(expert, tool)
    n = sum(map(sum, table))
    if n == 0:
        return float("nan")
    k = len(GRADES)
    rows = [sum(r) / n for r in table]
    cols = [sum(table[i][j] for i in range(k)) / n for j in range(k)]
    weight = [[abs(i - j) / (k - 1) for j in range(k)] for i in range(k)]
    observed = sum(weight[i][j] * table[i][j] / n for i in range(k) for j in range(k))
    chance = sum(weight[i][j] * rows[i] * cols[j] for i in range(k) for j in range(k))
    return float("nan") if chance == 0 else 1.0 - observed / chance


@dataclass(frozen=True)
class Agreement:
    """Per-vertebra agreement. Sensitivities: share of expert grade ≥ g called ≥ g by the tool;
    specificities: share of expert grade 0 not called ≥ 1 (``specificity``) and not called ≥ 2
    (``specificity_g2``). Counts beside each share (NaN share when its count is 0)."""

    vertebrae: int
    sensitivity_g1: float
    sensitivity_g2: float
    specificity: float
    specificity_g2: float
    kappa: float
    confusion: list
    fractured_g1: int
    fractured_g2: int
    normal: int


def _share(hits: int, count: int) -> float:
    return hits / count if count else float("nan")


def agreement(expert: Sequence[int], tool: Sequence[int]) -> Agreement:
    """Agreement of the tool's grades with the expert's (see :class:`Agreement`)."""
    pairs = list(zip(expert, tool))
    g1 = [t for e, t in pairs if e >= 1]
    g2 = [t for e, t in pairs if e >= 2]
    normal = [t for e, t in pairs if e == 0]
    return Agreement(
        vertebrae=len(pairs),
        sensitivity_g1=_share(sum(t >= 1 for t in g1), len(g1)),
        sensitivity_g2=_share(sum(t >= 2 for t in g2), len(g2)),
        specificity=_share(sum(t == 0 for t in normal), len(normal)),
        specificity_g2=_share(sum(t < 2 for t in normal), len(normal)),
        kappa=weighted_kappa(expert, tool),
        confusion=confusion(expert, tool),
        fractured_g1=len(g1), fractured_g2=len(g2), normal=len(normal),
    )
