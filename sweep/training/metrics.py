"""Validation losses computed from the model's own logits, never from mmengine's logs (which smooth every
key that contains "loss"): ``val/loss`` through mmengine's evaluator, ``val/general_loss`` from a second loader."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.dist import all_gather_object, get_world_size
from mmengine.evaluator import BaseMetric

from objectives.loss import mean_loss, token_loss_sum


class ValLossMetric(BaseMetric):
    """``val/loss``: token-mean cross-entropy over assistant tokens of unpacked validation rows."""

    default_prefix = "val"

    def process(self, data_batch: Any, data_samples: Any) -> None:
        labels = data_batch["data"]["labels"]
        for i, sample in enumerate(data_samples):
            self.results.append(token_loss_sum(sample["logits"], labels[i]))

    def compute_metrics(self, results: list) -> dict[str, float]:
        return {"loss": mean_loss(results)}


@torch.no_grad()
def general_loss(model: Any, loader: Any) -> float:
    """``val/loss``'s computation on held-out general chat rows (mmengine's ValLoop has one loader)."""
    model.eval()
    parts: list[tuple[float, int]] = []
    for data_batch in loader:
        outputs = model.val_step(data_batch)
        labels = data_batch["data"]["labels"]
        parts += [token_loss_sum(out["logits"], labels[i]) for i, out in enumerate(outputs)]
    if get_world_size() > 1:
        parts = [p for rank_parts in all_gather_object(parts) for p in rank_parts]
    return mean_loss(parts)
