"""Standard errors of a validation point's metrics (objectives.noise), against textbook computations."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from objectives.loss import mean_loss
from objectives.noise import is_se, loss_se, mean_se, se_name, weighted_se


def test_mean_se_is_the_textbook_standard_error():
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    assert mean_se(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert math.isnan(mean_se([0.3])), "one row says nothing about its own noise"
    assert mean_se([0.2, float("nan"), 0.4]) == pytest.approx(mean_se([0.2, 0.4])), "NaN rows are left out"


def test_loss_se_of_rows_of_one_length_is_the_se_of_their_means():
    """With every row the same number of tokens, the token mean is the mean of row means: the same error."""
    rows = [(2.0 * 4, 4), (3.0 * 4, 4), (2.5 * 4, 4), (4.0 * 4, 4)]
    assert loss_se(rows) == pytest.approx(mean_se([2.0, 3.0, 2.5, 4.0]))


def test_loss_se_matches_the_spread_of_resampled_splits():
    """The delta-method error of the ratio agrees with the spread of the token mean over bootstrap resamples."""
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        n = rng.randint(3, 40)
        rows.append((n * rng.uniform(1.0, 4.0), n))
    boot = [mean_loss([rng.choice(rows) for _ in rows]) for _ in range(3000)]
    assert loss_se(rows) == pytest.approx(statistics.stdev(boot), rel=0.1)
    assert math.isnan(loss_se([(3.0, 2)])) and math.isnan(loss_se([(3.0, 2), (0.0, 0)]))


def test_weighted_se_combines_the_components_and_is_nan_without_one():
    values = {"val/loss": 2.0, "val/loss_se": 0.3, "val/rouge_l": 0.2, "val/rouge_l_se": 0.05}
    assert weighted_se(values, {"val/loss": 1.0, "val/rouge_l": -2.0}) == pytest.approx(math.hypot(0.3, 0.1))
    assert math.isnan(weighted_se(values, {"val/loss": 1.0, "val/general_loss": 0.5}))
    assert se_name("val/loss") == "val/loss_se" and is_se("val/loss_se") and not is_se("val/loss")
