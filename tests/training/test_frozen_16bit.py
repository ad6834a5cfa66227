"""Frozen weights under LoRA back in 16 bits: the same loss and the same LoRA gradients under autocast."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from sweep.training.hook import keep_frozen_weights_16bit


def _lora_model(path, seed: int):
    """What XTuner builds for a LoRA trial: a bf16 checkpoint, PEFT's fp32 upcast, then LoRA."""
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )  # B random: both paths carry
    return get_peft_model(model, config)


def _step(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_same_loss_and_gradients_with_frozen_weights_in_16bit(tiny_model):
    stock, ours = _lora_model(tiny_model, 0), _lora_model(tiny_model, 0)
    assert {p.dtype for p in stock.parameters()} == {torch.float32}, "PEFT upcast everything (the stock state)"
    stock_bytes = _bytes(ours)
    converted = keep_frozen_weights_16bit(ours)
    assert converted > 0 and _bytes(ours) < stock_bytes - converted  # 2 bytes saved per converted weight
    lora = [p for n, p in ours.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora), "trainable LoRA parameters stay fp32"

    batch = torch.randint(0, stock.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    loss_a, grads_a = _step(stock, batch)
    loss_b, grads_b = _step(ours, batch)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_weights_loaded_in_fp32_are_left_alone(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert keep_frozen_weights_16bit(model) == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}
