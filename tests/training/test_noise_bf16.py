"""Standard errors computed inside training (``val/loss_se``, ``val/general_loss_se``) from a bf16 model's logits
under the CPU's bf16 autocast, as a GPU's bf16 validation produces them: checked against float64 by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sweep.training.amp import CpuAmpOptimWrapper, training_autocast
from sweep.training.metrics import ValLossMetric, general_loss


class _XTunerLike(torch.nn.Module):
    """What ``general_loss`` calls: XTuner's ``val_step``, a list of per-row outputs with logits."""

    def __init__(self, llm) -> None:
        super().__init__()
        self.llm = llm

    def val_step(self, data_batch):
        data = data_batch["data"]
        logits = self.llm(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        return [{"logits": row} for row in logits]


@pytest.fixture(scope="module")
def bf16_llm(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.bfloat16).eval()


def _batches() -> list[dict]:
    """Rows of different answer lengths (label -100 on prompt and padding), in two batches."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for answer_lengths in ([3, 9, 5], [12, 2]):
        ids = torch.randint(5, 200, (len(answer_lengths), 16), generator=gen)
        labels = torch.full_like(ids, -100)
        for i, n in enumerate(answer_lengths):
            labels[i, 16 - n :] = ids[i, 16 - n :]
        batches.append({"data": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}})
    return batches


def _by_hand(logits: list[torch.Tensor], batches: list[dict]) -> tuple[float, float]:
    """Token-mean loss and its ratio-estimator standard error, in float64 from per-row sums."""
    labels = [row for b in batches for row in b["data"]["labels"]]
    sums, counts = [], []
    for lg, lab in zip(logits, labels, strict=True):
        target, lg = lab[1:], lg[:-1].double()
        mask = target != -100
        sums.append(float(torch.nn.functional.cross_entropy(lg[mask], target[mask], reduction="sum")))
        counts.append(int(mask.sum()))
    mean = sum(sums) / sum(counts)
    k = len(sums)
    var = k / (k - 1) * sum((s - mean * n) ** 2 for s, n in zip(sums, counts, strict=True)) / sum(counts) ** 2
    return mean, math.sqrt(var)


def test_val_loss_se_from_bf16_logits_under_autocast(bf16_llm):
    wrapper = CpuAmpOptimWrapper(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    model, metric, logits = _XTunerLike(bf16_llm), ValLossMetric(), []
    with torch.no_grad(), training_autocast(wrapper):
        for batch in _batches():
            outputs = model.val_step(batch)
            assert outputs[0]["logits"].dtype == torch.bfloat16, "the path a GPU's bf16 validation takes"
            metric.process(batch, outputs)
            logits += [o["logits"] for o in outputs]
    found = metric.compute_metrics(metric.results)
    loss, se = _by_hand(logits, _batches())
    assert found["loss"] == pytest.approx(loss, rel=1e-5)
    assert found["loss_se"] == pytest.approx(se, rel=1e-4) and 0 < found["loss_se"] < found["loss"]


def test_general_loss_and_its_se_under_autocast(bf16_llm):
    wrapper = CpuAmpOptimWrapper(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    model = _XTunerLike(bf16_llm)
    with training_autocast(wrapper):
        loss, se = general_loss(model, _batches())
        with torch.no_grad():
            logits = [o["logits"] for b in _batches() for o in model.val_step(b)]
    expected_loss, expected_se = _by_hand(logits, _batches())
    assert loss == pytest.approx(expected_loss, rel=1e-5) and se == pytest.approx(expected_se, rel=1e-4)
