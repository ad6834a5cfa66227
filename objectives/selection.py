"""Which validation point a trial keeps: its adapter, and the value it is worth to Optuna and to the ranking.

``objective.keep`` names the rule, and both processes apply it through ``Keeper`` so that they agree by
construction: the training hook saves the adapter of the point the rule keeps, and the trial reports that
point's value. ``best`` keeps the point with the best value; with a few dozen validation rows that is often a
lucky early point. ``better_beyond_noise`` moves on to a later point only when it is better beyond the later
point's standard error. ``latest_within_noise`` keeps the latest point within its standard error of the best,
which on the demo picked checkpoints that do as well on the test split far more often (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

KeepRule = Literal["best", "better_beyond_noise", "latest_within_noise"]
KEEP_RULES: tuple[str, ...] = ("best", "better_beyond_noise", "latest_within_noise")
DEFAULT_KEEP: KeepRule = "latest_within_noise"


@dataclass(frozen=True)
class Point:
    """One validation point of the objective: its step, its value and the value's standard error (NaN: unknown)."""

    step: int
    value: float
    se: float = float("nan")


def _gap(a: float, b: float, direction: str) -> float:
    """How much better ``a`` is than ``b`` (negative: worse)."""
    return b - a if direction == "minimize" else a - b


def _noise(se: float) -> float:
    return se if se == se and se >= 0 else 0.0  # an unknown error counts as none: the rule falls back to `best`


class Keeper:
    """The rule applied one point at a time, as the hook meets them; ``offer`` says whether to keep the new one."""

    def __init__(self, direction: str, rule: str = DEFAULT_KEEP) -> None:
        if rule not in KEEP_RULES:
            raise ValueError(f"objective.keep: expected one of {', '.join(KEEP_RULES)}, got {rule!r}")
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction: expected minimize or maximize, got {direction!r}")
        self.direction, self.rule = direction, rule
        self.best: Point | None = None  # the best value so far, whatever the rule
        self.kept: Point | None = None

    def offer(self, point: Point) -> bool:
        """Take the next point (steps in order); True when it becomes the kept one. NaN values are never kept."""
        if point.value != point.value:
            return False
        if self.best is None or _gap(point.value, self.best.value, self.direction) > 0:
            self.best = point
        if self.kept is None:
            keep = True
        elif self.rule == "best":
            keep = _gap(point.value, self.kept.value, self.direction) > 0
        elif self.rule == "better_beyond_noise":
            keep = _gap(point.value, self.kept.value, self.direction) > _noise(point.se)
        else:  # latest_within_noise: no worse than the best by more than its own noise
            keep = self.best is point or -_gap(point.value, self.best.value, self.direction) <= _noise(point.se)
        if keep:
            self.kept = point
        return keep


def kept_point(points: Iterable[Point], direction: str, rule: str = DEFAULT_KEEP) -> Point | None:
    """The point ``rule`` keeps among a trial's points (in step order); None when none has a value."""
    keeper = Keeper(direction, rule)
    for p in points:
        keeper.offer(p)
    return keeper.kept
