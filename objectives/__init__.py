"""What a trial is scored by: metric names, their direction, and the pure functions behind them.

A metric name here is what a spec's ``objective`` may name (``metric``, ``metrics`` or the keys of
``weights``); the spec refuses a metric that nothing in a trial produces, before any training starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Literal["minimize", "maximize"]
    doc: str
    test_name: str | None = None  # what the test gate measures for it (the test split holds task rows only)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "val/loss", "minimize", "token-mean cross-entropy of assistant tokens on the validation split", "test/loss"
        ),
        Metric(
            "val/rouge_l",
            "maximize",
            "ROUGE-L F1 (CJK-aware) of greedy answers to the first validation rows",
            "test/rouge_l",
        ),
        Metric(
            "val/general_loss", "minimize", "val/loss on held-out general chat rows: falls as forgetting is avoided"
        ),
    )
}

#: The name of a weighted combination (``objective.weights``); it is logged like any other metric.
WEIGHTED = "val/weighted"


def weighted(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``sum(w * value)``; NaN when a weighted metric is missing, so that a broken point never looks best.

    Signs are the user's: to minimize loss while maximizing ROUGE-L, weigh ROUGE-L negatively.
    """
    total = 0.0
    for name, w in weights.items():
        v = values.get(name)
        if v is None or v != v:
            return float("nan")
        total += w * float(v)
    return total


def best_of(values: list[float], direction: str) -> float:
    """The best of a trial's validation values: a trial is worth its best point, not its last."""
    finite = [v for v in values if v == v]
    if not finite:
        return float("nan")
    return min(finite) if direction == "minimize" else max(finite)


def is_better(a: float, b: float, direction: str) -> bool:
    """Strictly better; NaN is never better, and anything finite beats NaN."""
    if a != a:
        return False
    if b != b:
        return True
    return a < b if direction == "minimize" else a > b
