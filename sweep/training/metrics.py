"""Validation losses computed from the model's own logits, never from mmengine's logs (which smooth every
key that contains "loss"): ``val/loss`` through mmengine's evaluator, ``val/general_loss`` from a second loader.
Each comes with its standard error over rows (``val/loss_se``, ``objectives.noise``), from the same per-row sums."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.dist import all_gather_object, get_world_size
from mmengine.evaluator import BaseMetric

from objectives import by_group
from objectives.loss import mean_loss, token_loss_sum
from objectives.noise import loss_se


class ValLossMetric(BaseMetric):
    """``val/loss``: token-mean cross-entropy over assistant tokens of unpacked validation rows; with ``groups``,
    also ``val/loss/GROUP`` over each group's rows.

    mmengine hands ``compute_metrics`` the results of every rank in the dataset's order (padding dropped), so
    result i is row i of the validation dataset: ``groups`` is that dataset's own ``group`` column (set by the
    hook), which stays aligned whatever rows XTuner's pipeline dropped on its way.
    """

    default_prefix = "val"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups: list[str | None] | None = None

    def process(self, data_batch: Any, data_samples: Any) -> None:
        labels = data_batch["data"]["labels"]
        for i, sample in enumerate(data_samples):  # a LLaVA model hands back its own labels (sweep.training.llava)
            self.results.append(token_loss_sum(sample["logits"], sample.get("labels", labels[i])))

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = {"loss": mean_loss(results), "loss_se": loss_se(results)}
        if self.groups is not None:
            if len(self.groups) != len(results):
                raise RuntimeError(f"{len(results)} validation rows scored, but {len(self.groups)} rows' groups")
            for g, parts in by_group(results, self.groups).items():
                metrics.update({f"loss/{g}": mean_loss(parts), f"loss/{g}_se": loss_se(parts)})
        return metrics


@torch.no_grad()
def general_loss(model: Any, loader: Any) -> tuple[float, float]:
    """``val/loss``'s computation on held-out general chat rows (mmengine's ValLoop has one loader), and its
    standard error over those rows."""
    model.eval()
    parts: list[tuple[float, int]] = []
    for data_batch in loader:
        outputs = model.val_step(data_batch)
        labels = data_batch["data"]["labels"]
        parts += [token_loss_sum(out["logits"], out.get("labels", labels[i])) for i, out in enumerate(outputs)]
    if get_world_size() > 1:
        parts = [p for rank_parts in all_gather_object(parts) for p in rank_parts]
    return mean_loss(parts), loss_se(parts)
