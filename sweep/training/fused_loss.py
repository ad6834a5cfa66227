"""The training loss without the whole logits tensor: ``speed.fused_loss``.

A causal LM's loss multiplies every position's hidden state by the output embedding and takes a
cross-entropy over the vocabulary. Stock Transformers builds the whole logits tensor first (batch x
length x vocabulary) and upcasts it to fp32: with a 150k vocabulary that tensor, its copies and its
gradient are most of a LoRA step's activation memory. Here the model's own decoder runs as usual, and
the last projection and the loss are computed together, in chunks (``chunked``, plain PyTorch: any
device) or by a fused kernel (``cce``: Apple's cut-cross-entropy; ``liger``: Liger-Kernel's fused
linear cross-entropy; both GPU only). The value is the same mean over the assistant tokens (labels other
than -100, shifted by one) that Transformers' ``ForCausalLMLoss`` computes, in the same dtypes: the
projection under training's autocast, the softmax in fp32.

It replaces ``forward`` of the Transformers model instance (the one PEFT wraps) only while training
and only when labels are given: validation and generation still see logits. Works for any model whose
head is ``get_output_embeddings()`` after ``get_decoder()`` (Qwen2, Llama, InternLM2's remote code); a
model that rescales or caps its logits is left alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sweep.trial import protocol

IGNORE_INDEX = -100
CHUNK_TOKENS = protocol.FUSED_LOSS_CHUNK
IMPLEMENTATIONS = ("off", "chunked", "cce", "liger")
_MARK = "_sweep_fused_loss"  # the instance attribute that says a model's forward is ours


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None):
    """Mean cross-entropy over labels != -100, one chunk of positions at a time; each chunk's logits are
    recomputed in the backward pass instead of kept (activation checkpointing of the head alone)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        part = slice(start, start + CHUNK_TOKENS)
        if hidden.requires_grad or weight.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, hidden[part], weight, bias, labels[part], use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hidden[part], weight, bias, labels[part])
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _cce_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None):
    from cut_cross_entropy import linear_cross_entropy

    if bias is not None:
        raise ValueError("cut-cross-entropy takes no output bias")
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
    return linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels, ignore_index=IGNORE_INDEX)


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    return liger_fused_linear_cross_entropy(h, weight.to(dtype), labels.reshape(-1), bias, ignore_index=IGNORE_INDEX)


LOSSES = {"chunked": chunked_loss, "cce": _cce_loss, "liger": _liger_loss}


def why_not(llm: Any, impl: str) -> str | None:
    """Why ``impl`` cannot replace this model's loss (None: it can)."""
    if impl not in LOSSES:
        return f"unknown fused_loss {impl!r}; expected one of {list(IMPLEMENTATIONS)}"
    config = getattr(llm, "config", None)
    for key in protocol.LOGIT_SCALING_KEYS:  # Gemma, Cohere, Granite, MiniCPM: the head's output is rescaled
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"the model scales or caps its logits ({key})"
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "its output embedding is not a plain Linear layer"
    if _decoder(llm) is None:
        return "it has no decoder to run without its head (get_decoder)"
    if impl in ("cce", "liger") and not torch.cuda.is_available():
        return f"{impl} runs on CUDA GPUs only"
    return None


def _decoder(llm: Any) -> Any:
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    return decoder if decoder is not None else getattr(llm, "model", None)


def install(llm: Any, impl: str) -> None:
    """Route this model's training loss through ``impl`` (idempotent; ``uninstall`` undoes it)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    reason = why_not(llm, impl)
    if reason is not None:
        raise ValueError(f"speed.fused_loss {impl}: cannot be used with {type(llm).__name__}: {reason}")
    uninstall(llm)
    original = llm.forward  # the class's bound forward
    decoder, head, loss_fn = _decoder(llm), llm.get_output_embeddings(), LOSSES[impl]

    def forward(*args: Any, labels: torch.Tensor | None = None, **kwargs: Any):
        if labels is None or not llm.training or args:
            return original(*args, labels=labels, **kwargs)
        for key in ("num_logits_to_keep", "logits_to_keep", "num_items_in_batch", "return_dict", "use_cache"):
            kwargs.pop(key, None)
        out = decoder(**kwargs, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state[:, :-1]
        shifted = labels[:, 1:].to(hidden.device)
        loss = loss_fn(hidden.contiguous(), head.weight, shifted.contiguous(), head.bias)
        return CausalLMOutputWithPast(loss=loss)

    llm.forward = forward
    setattr(llm, _MARK, impl)


def uninstall(llm: Any) -> None:
    """The class's own forward again (a resident worker's next trial may not want the fused loss)."""
    if getattr(llm, _MARK, None) is not None:
        vars(llm).pop("forward", None)
        delattr(llm, _MARK)
