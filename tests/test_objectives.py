"""Token-mean cross-entropy over assistant tokens, and a trial's best value."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from objectives import best_of, is_better, weighted
from objectives.loss import IGNORE_INDEX, mean_loss, token_loss_sum


def test_matches_hugging_face_causal_lm_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = IGNORE_INDEX  # prompt tokens
    labels[1, 5:] = IGNORE_INDEX  # padding
    parts = [token_loss_sum(logits[i], labels[i]) for i in range(2)]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert math.isclose(mean_loss(parts), float(expected), rel_tol=1e-6)
    assert sum(n for _, n in parts) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_token_mean_weighs_tokens_not_rows():
    assert mean_loss([(10.0, 10), (1.0, 1)]) == 1.0
    assert math.isnan(mean_loss([(0.0, 0)]))


def test_best_of_is_the_best_point_not_the_last():
    assert best_of([3.0, 2.0, 2.5], "minimize") == 2.0
    assert best_of([0.1, 0.4, 0.3], "maximize") == 0.4
    assert best_of([float("nan"), 1.0], "minimize") == 1.0


def test_weighted_sum_and_missing_parts():
    assert weighted({"val/loss": 2.0, "val/rouge_l": 0.5}, {"val/loss": 1.0, "val/rouge_l": -2.0}) == 1.0
    assert math.isnan(weighted({"val/loss": 2.0}, {"val/loss": 1.0, "val/general_loss": 0.5}))
    assert math.isnan(weighted({"val/loss": float("nan")}, {"val/loss": 1.0}))


def test_is_better_never_prefers_nan():
    assert is_better(1.0, 2.0, "minimize") and not is_better(2.0, 1.0, "minimize")
    assert is_better(2.0, 1.0, "maximize")
    assert not is_better(1.0, 1.0, "minimize"), "a tie keeps the champion"
    assert is_better(5.0, float("nan"), "minimize") and not is_better(float("nan"), 5.0, "minimize")
