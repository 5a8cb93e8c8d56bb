"""How a method's answer is scored against a planted mechanism: localisation and faithfulness.

Localisation (MIB, Mueller et al. 2025; InterpBench's AUROC): a method scores every cell of
its grid; the planted cells should score highest.

- `auroc(scores, truth)`: the probability that a planted cell outscores an unplanted one
  (ties count one half), i.e. the area under the ROC curve of the scores as a detector.
- `precision_recall(returned, truth)`: of the cells the method returns (its scores above its
  own threshold), the share that are planted, and the share of planted cells returned.

Faithfulness (MIB's circuit track): keep only the top-k components of the method's ranking,
ablate every other one with its counterfactual value, and measure how much of the full
model's behaviour remains, f = (m(circuit) - m(empty)) / (m(full) - m(empty)). Over MIB's
circuit sizes (`SIZES`, shares of all components):

- CPR: the area under f (higher is better);
- CMD: the area between f and 1, |1 - f| (lower is better; 0 is a perfect circuit).

Both use MIB's trapezoids over the shares themselves, so large circuits weigh most: a random
ranking scores CPR ~0.5 on a dense mechanism; a sparse planted one is found or not at the
small sizes, which is where CPR and CMD separate the methods here.

    auroc(np.array([0.9, 0.1, 0.4]), np.array([True, False, False]))    # 1.0
    cpr, cmd = curve_areas(SIZES, faithfulness)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""MIB's circuit sizes: shares of all components kept."""


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of `scores` detecting `truth` (NaN scores rank lowest).

    The Mann-Whitney form: the share of (planted, unplanted) pairs in which the planted cell
    scores higher, ties counting one half. NaN when either class is empty.
    """
    scores = np.asarray(scores, dtype=float).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    if scores.shape != truth.shape:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} differ in shape")
    if truth.all() or not truth.any():
        return math.nan
    filled = np.where(np.isnan(scores), -np.inf, scores)
    positive, negative = filled[truth], filled[~truth]
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


def precision_recall(returned: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of the returned cells; precision is NaN when nothing is returned."""
    returned = np.asarray(returned, dtype=bool).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    hits = int((returned & truth).sum())
    precision = hits / int(returned.sum()) if returned.any() else math.nan
    recall = hits / int(truth.sum()) if truth.any() else math.nan
    return precision, recall


def circuit_sizes(n_components: int, sizes: Sequence[float] = SIZES) -> list[int]:
    """Components kept at each share: at least one, at most all (MIB rounds up)."""
    return [min(n_components, max(1, math.ceil(share * n_components))) for share in sizes]


def faithfulness(circuit: float, empty: float, full: float) -> float:
    """f = (m(circuit) - m(empty)) / (m(full) - m(empty)); NaN when full equals empty."""
    gap = full - empty
    return (circuit - empty) / gap if gap != 0 else math.nan


def curve_areas(sizes: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """(CPR, CMD): trapezoid areas under f and between f and 1, over the shares `sizes`."""
    if len(sizes) != len(values) or len(sizes) < 2:
        raise ValueError("give one faithfulness value per circuit size, at least two sizes")
    cpr = cmd = 0.0
    for i in range(len(sizes) - 1):
        width = sizes[i + 1] - sizes[i]
        cpr += width * (values[i] + values[i + 1]) / 2
        cmd += width * (abs(1 - values[i]) + abs(1 - values[i + 1])) / 2
    return cpr, cmd
