"""What a trial is scored by: metric names, their direction, and the pure functions behind them.

A metric name here is what a spec's ``objective.metric`` may say; the study refuses a metric that
nothing in a trial produces, before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Literal["minimize", "maximize"]
    doc: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("val/loss", "minimize", "token-mean cross-entropy of assistant tokens on the validation split"),
        Metric("val/rouge_l", "maximize", "ROUGE-L F1 (CJK-aware) of greedy answers to the first validation rows"),
    )
}


def best_of(values: list[float], direction: str) -> float:
    """The best of a trial's validation values: a trial is worth its best point, not its last."""
    finite = [v for v in values if v == v]
    if not finite:
        return float("nan")
    return min(finite) if direction == "minimize" else max(finite)
