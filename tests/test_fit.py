"""Fit verdicts from a trial's curves (sweep.fit), and what a study's verdicts suggest."""

from __future__ import annotations

from objectives.selection import Point
from sweep.fit import CONVERGED, OVER, UNDER, suggestion, verdict

FALLING = [(s, 3.0 - s / 100) for s in range(0, 257, 8)]  # training loss that keeps falling
FLAT = [(s, 1.0) for s in range(0, 257, 8)]


def _curve(values: list[float], se: float = 0.05) -> list[Point]:
    return [Point(32 * i, v, se) for i, v in enumerate(values)]


def test_still_improving_at_the_end_is_under_fitted():
    fit = verdict(_curve([5.0, 4.0, 3.5, 3.2, 3.0, 2.8, 2.6, 2.4, 2.2]), FALLING, "minimize")
    assert fit.verdict == UNDER and fit.label == "under-fitted"


def test_worse_beyond_the_noise_while_training_falls_is_over_fitted_since_the_first_worse_point():
    fit = verdict(_curve([5.0, 3.0, 2.5, 2.7, 2.9, 3.1, 3.3]), FALLING, "minimize")
    assert fit.verdict == OVER and fit.since_step == 96 and fit.best_step == 64
    assert fit.label == "over-fitted since step 96"


def test_worse_by_less_than_the_noise_is_converged_not_over_fitted():
    wide = verdict(_curve([5.0, 3.0, 2.5, 2.6, 2.65, 2.7], se=0.3), FALLING, "minimize")
    assert wide.verdict == CONVERGED
    narrow = verdict(_curve([5.0, 3.0, 2.5, 2.6, 2.65, 2.7], se=0.01), FALLING, "minimize")
    assert narrow.verdict == OVER, "the same curve with a tenth of the noise is a real rise"


def test_a_rise_without_training_loss_falling_is_not_over_fitting():
    assert verdict(_curve([5.0, 3.0, 2.5, 2.7, 2.9, 3.1]), FLAT, "minimize").verdict == CONVERGED


def test_a_plateau_within_the_noise_is_converged_and_few_points_say_nothing():
    assert verdict(_curve([5.0, 3.0, 2.5, 2.45, 2.47, 2.44, 2.46, 2.43]), FALLING, "minimize").verdict == CONVERGED
    assert verdict(_curve([5.0, 3.0]), FALLING, "minimize") is None


def test_maximize_reads_the_curve_the_other_way():
    rising = [0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
    assert verdict(_curve(rising, se=0.01), FALLING, "maximize").verdict == UNDER
    assert verdict(_curve(rising[::-1], se=0.01), FALLING, "maximize").verdict == OVER


def test_suggestions_follow_the_verdicts():
    space = {"max_epochs": {"type": "int", "low": 2, "high": 8}}
    assert "raise max_epochs (its high is 8)" in suggestion([UNDER, UNDER, UNDER], space)
    assert "lower max_epochs" in suggestion([OVER, OVER], space)
    assert suggestion([UNDER, UNDER, CONVERGED], space).startswith("2 of 3 trials were still improving")
    assert "spans the fit" in suggestion([UNDER, OVER, CONVERGED], space)
    assert "no complete trial" in suggestion([], space)
