"""What a trial is scored by: metric names, their direction, and the pure functions behind them.

A metric name here is what a spec's ``objective`` may name (``metric``, ``metrics``, the keys of
``weights`` or ``at_most``); the spec refuses a metric that nothing in a trial produces, before any training
starts. When validation rows carry a ``group``, each metric marked ``per_group`` is also measured on the rows
of each group and named ``METRIC/GROUP`` (``val/loss/identity``): ``lookup`` resolves such names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Literal["minimize", "maximize"]
    doc: str
    test_name: str | None = None  # what the test gate measures for it (the test split holds task rows only)
    answers: bool = False  # computed from greedy answers: a trial must generate them
    per_group: bool = False  # also measured per group of validation rows, as METRIC/GROUP


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "val/loss",
            "minimize",
            "token-mean cross-entropy of assistant tokens on the validation split",
            "test/loss",
            per_group=True,
        ),
        Metric(
            "val/rouge_l",
            "maximize",
            "ROUGE-L F1 (CJK-aware) of greedy answers to the first validation rows",
            "test/rouge_l",
            answers=True,
            per_group=True,
        ),
        Metric(
            "val/repetition",
            "minimize",
            "share of those greedy answers that say a phrase again right after itself (objectives.repetition)",
            "test/repetition",
            answers=True,
            per_group=True,
        ),
        Metric(
            "val/no_stop",
            "minimize",
            "share of those greedy answers cut off at max_new_tokens without the template's stop word",
            "test/no_stop",
            answers=True,
            per_group=True,
        ),
        Metric(
            "val/general_loss", "minimize", "val/loss on held-out general chat rows: falls as forgetting is avoided"
        ),
    )
}

#: A group name, as rows carry it (``"group": "identity"``) and metric names end with it (``val/loss/identity``).
GROUP_NAME = r"[\w.\-]+"


def lookup(name: str) -> Metric | None:
    """The metric a name stands for: one of ``METRICS``, or one measured on a group's rows; None if neither."""
    if name in METRICS:
        return METRICS[name]
    base, _, group = name.rpartition("/")
    metric = METRICS.get(base)
    if metric is None or not metric.per_group or not re.fullmatch(GROUP_NAME, group):
        return None
    test_name = f"{metric.test_name}/{group}" if metric.test_name else None
    return Metric(name, metric.direction, f"{metric.doc}, on the rows of group {group}", test_name, metric.answers)


def by_group(items: Sequence[T], groups: Sequence[str | None]) -> dict[str, list[T]]:
    """Items split by the group of the row each belongs to (same order); items of rows without a group are left out."""
    if len(items) != len(groups):
        raise ValueError(f"{len(items)} items for {len(groups)} rows' groups")
    out: dict[str, list[T]] = {}
    for item, group in zip(items, groups, strict=True):
        if group is not None:
            out.setdefault(group, []).append(item)
    return out


def group_of(name: str) -> str | None:
    """The group a metric name is measured on (``val/loss/identity`` -> ``identity``), or None for all rows."""
    return None if name in METRICS or lookup(name) is None else name.rpartition("/")[2]


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
