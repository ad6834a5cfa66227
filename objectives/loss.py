"""Token-mean cross-entropy over the tokens a model is trained to answer with.

XTuner marks prompt and padding tokens with label -100; only the remaining (assistant) tokens
count. Sums and counts are returned separately so that batches, and ranks, combine exactly:
the mean of per-batch means would weigh a short batch like a long one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy and the number of scored tokens of one sequence or batch.

    ``logits`` is ``[..., seq, vocab]`` and ``labels`` ``[..., seq]`` in the Hugging Face layout
    (not shifted): position t's logits predict label t+1.
    """
    logits = logits[..., :-1, :].float()
    target = labels[..., 1:].to(logits.device)
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    mask = target != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        return 0.0, 0
    loss = F.cross_entropy(logits[mask], target[mask], reduction="sum")
    return float(loss), n


def mean_loss(parts: list[tuple[float, int]]) -> float:
    """Combine ``(sum, count)`` parts into the token mean; NaN when nothing was scored."""
    total = sum(s for s, _ in parts)
    count = sum(n for _, n in parts)
    return total / count if count else float("nan")
