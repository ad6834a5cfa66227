"""Is a trial under-fitted, over-fitted or converged? A verdict from its own curves, and what a study's verdicts
suggest for its search space.

The tutorial's last question ("has the model reached the expected effect: over-fitted or under-fitted?") is
answered per trial, with the noise of each validation point (``objectives.noise``) deciding what counts as a
change: a few dozen validation rows move by chance, and a verdict that reads chance as a trend sends the next
sweep the wrong way.

- ``under-fitted``: validation still improving at the end: the last point is within its noise of the best one and
  better, beyond that noise, than every point before the run's last quarter (more epochs or a higher
  learning rate would help);
- ``over-fitted since step N``: from step N to the end, validation is worse than its best by more than each
  point's noise, while the training loss keeps falling;
- ``converged``: neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from objectives.selection import Point

UNDER, OVER, CONVERGED = "under-fitted", "over-fitted", "converged"
MIN_POINTS = 3  # fewer validation points cannot show a trend


@dataclass(frozen=True)
class Fit:
    verdict: Literal["under-fitted", "over-fitted", "converged"]
    since_step: int | None = None  # over-fitted: the first step of the run of points worse than the best
    best_step: int | None = None  # the best validation point (by value, whatever the keep rule)

    @property
    def label(self) -> str:
        """What the report, the MLflow tag and the live line say."""
        return f"{OVER} since step {self.since_step}" if self.verdict == OVER else self.verdict

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def _worse(a: Point, b: Point, direction: str) -> float:
    """How much worse ``a`` is than ``b`` (negative: better)."""
    return a.value - b.value if direction == "minimize" else b.value - a.value


def _noise(p: Point) -> float:
    return p.se if p.se == p.se and p.se >= 0 else 0.0


def _falling(train_loss: Sequence[tuple[int, float]], after: int) -> bool:
    """Whether training loss fell from step ``after`` on: the later half's mean below the earlier half's."""
    losses = [v for s, v in train_loss if s >= after and v == v]
    if len(losses) < 2:
        return False
    half = len(losses) // 2
    return sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half


def verdict(points: Sequence[Point], train_loss: Sequence[tuple[int, float]], direction: str) -> Fit | None:
    """The fit of a trial from its validation points (in step order, with standard errors) and its training loss
    by step; None with fewer than ``MIN_POINTS`` finite points."""
    pts = [p for p in points if p.value == p.value]
    if len(pts) < MIN_POINTS:
        return None
    best = pts[0]
    for p in pts[1:]:
        if _worse(p, best, direction) < 0:
            best = p
    last = pts[-1]
    after_best = [p for p in pts if p.step > best.step]
    since = None
    for p in reversed(after_best):  # the run of points, up to the last, each worse than the best beyond its noise
        if _worse(p, best, direction) <= _noise(p):
            break
        since = p.step
    if since is not None and _falling(train_loss, best.step):
        return Fit(OVER, since, best.step)
    cutoff = last.step - (last.step - pts[0].step) / 4
    earlier = [p for p in pts if p.step < cutoff]
    if earlier and _worse(last, best, direction) <= _noise(last):
        best_earlier = min(earlier, key=lambda p: _worse(p, best, direction))
        if _worse(best_earlier, last, direction) > _noise(last):
            return Fit(UNDER, None, best.step)
    return Fit(CONVERGED, None, best.step)


def suggestion(verdicts: Sequence[str], search_space: Mapping[str, Any] | None = None) -> str:
    """What a study's verdicts (of its complete trials) suggest for the next sweep's search space."""
    n = len(verdicts)
    if n == 0:
        return "no complete trial with enough validation points for a verdict"
    under, over = verdicts.count(UNDER), verdicts.count(OVER)
    epochs = (search_space or {}).get("max_epochs")
    high = f" (its high is {epochs['high']})" if isinstance(epochs, Mapping) and "high" in epochs else ""
    if under == n:
        return f"every trial was still improving at its end: raise max_epochs{high} or the lr range"
    if over == n:
        return "every trial over-fitted: lower max_epochs or the lr range, or add data (its kept point is earlier)"
    if under > n / 2:
        return f"{under} of {n} trials were still improving at their end: consider raising max_epochs{high}"
    if over > n / 2:
        return f"{over} of {n} trials over-fitted: consider lowering max_epochs or the lr range"
    return f"the space spans the fit ({under} under-fitted, {over} over-fitted, {n - under - over} converged): keep it"
