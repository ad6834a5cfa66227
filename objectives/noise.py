"""How sure a validation point is: the standard error of each metric over the rows it was measured on.

A validation split of a few dozen rows moves by chance from one point to the next; without its noise, "the
best point" is often only the luckiest one. Each point's metrics are means over rows (``val/loss`` a ratio:
the token-mean over rows of different lengths), so their standard errors come from the same per-row values
the metric was computed from, with no extra forward pass. They are logged as ``METRIC_se`` beside each metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

#: ``val/loss`` -> ``val/loss_se``: the name a metric's standard error is logged under.
SE_SUFFIX = "_se"


def se_name(metric: str) -> str:
    """The name of ``metric``'s standard error (``val/loss_se``)."""
    return metric + SE_SUFFIX


def is_se(name: str) -> bool:
    """Whether a logged name is a standard error rather than a metric."""
    return name.endswith(SE_SUFFIX)


def loss_se(parts: Sequence[tuple[float, int]]) -> float:
    """Standard error of the token-mean loss ``sum(s) / sum(n)`` over rows' ``(loss sum, tokens)`` parts.

    The token mean is a ratio estimator, so rows are the independent units (tokens of a row are not): its
    delta-method variance is ``k / (k - 1) * sum((s_i - L * n_i)^2) / (sum n)^2`` over the k rows that scored
    tokens. NaN with fewer than 2 such rows: one row says nothing about its own noise.
    """
    rows = [(s, n) for s, n in parts if n > 0]
    k = len(rows)
    total = sum(n for _, n in rows)
    if k < 2 or total == 0:
        return float("nan")
    mean = sum(s for s, _ in rows) / total
    spread = sum((s - mean * n) ** 2 for s, n in rows)
    return math.sqrt(k / (k - 1) * spread) / total


def mean_se(values: Sequence[float]) -> float:
    """Standard error of a plain mean over rows (ROUGE-L of each answer): ``stdev / sqrt(n)``; NaN below 2 rows."""
    finite = [v for v in values if v == v]
    n = len(finite)
    if n < 2:
        return float("nan")
    mean = sum(finite) / n
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1) / n)


def weighted_se(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The standard error of ``objectives.weighted``: ``sqrt(sum((w * se)^2))`` from each component's ``METRIC_se``.

    Components are treated as independent (general chat rows are other rows; ROUGE-L's answers come from a
    subset of the loss's rows, a small covariance this ignores). NaN when a component's error is missing.
    """
    total = 0.0
    for name, w in weights.items():
        se = values.get(se_name(name))
        if se is None or se != se:
            return float("nan")
        total += (w * float(se)) ** 2
    return math.sqrt(total)
