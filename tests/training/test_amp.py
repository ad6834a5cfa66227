"""The CPU's AMP wrapper and the autocast that validation borrows from training."""

from __future__ import annotations

import pytest
import torch
from mmengine.optim import OptimWrapper

from sweep.training.amp import CpuAmpOptimWrapper, training_autocast, trains_under_autocast


def _linear_16bit():
    layer = torch.nn.Linear(8, 8).to(torch.bfloat16)
    layer.requires_grad_(False)
    return layer


def test_the_cpu_wrapper_autocasts_steps_in_bf16_and_steps_like_a_plain_one():
    torch.manual_seed(0)
    frozen, lora = _linear_16bit(), torch.nn.Linear(8, 8)
    wrapper = CpuAmpOptimWrapper(optimizer=torch.optim.SGD(lora.parameters(), lr=0.1))
    x = torch.randn(4, 8)  # fp32 activations, as PEFT's upcast leaves them
    before = lora.weight.detach().clone()
    with wrapper.optim_context(lora):
        out = lora(frozen(x))
        assert out.dtype == torch.bfloat16
    wrapper.update_params(out.float().sum())
    assert not torch.equal(before, lora.weight) and lora.weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match="same dtype"):
        frozen(x)  # the crash a forward pass outside autocast meets


def test_validation_borrows_the_training_autocast():
    frozen = _linear_16bit()
    wrapper = CpuAmpOptimWrapper(optimizer=torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    assert trains_under_autocast(wrapper)
    with torch.no_grad(), training_autocast(wrapper):
        assert frozen(torch.randn(2, 8)).dtype == torch.bfloat16
    plain = OptimWrapper(optimizer=torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    assert not trains_under_autocast(plain)
    with training_autocast(plain):
        assert not torch.is_autocast_enabled("cpu")


def test_the_cpu_wrapper_refuses_fp16():
    with pytest.raises(ValueError, match="bfloat16 only"):
        CpuAmpOptimWrapper(optimizer=torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), dtype="float16")
