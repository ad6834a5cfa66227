"""Decoder layers under ``torch.compile``: ``speed.compile``.

Regional compilation: each decoder layer is compiled, not the whole model, so the graph is one layer's
(fast to compile, reused by every layer) and PEFT, XTuner and mmengine keep calling plain modules. Packing
fixes every batch's shape to ``max_length``, so a trial compiles once per shape. Two settings keep the
math what eager PyTorch computes, unless the spec trades them for speed:
- ``fallback_random`` (``speed.compile_dropout: eager``): inductor draws dropout masks (LoRA's dropout) from its
  own generator otherwise, so a compiled trial's losses would leave the eager ones from the first step whose
  LoRA B is non-zero; with it, the masks come from the same generator in the same order as in eager mode, at the
  price of an eager dropout kernel (and its fp32 copy of the activations) in every LoRA layer. ``fused`` lets
  the compiled kernel draw them: other masks of the same distribution.
- ``emulate_precision_casts`` (``speed.compile_exact_casts``): inductor otherwise keeps a fused chain of
  pointwise ops in fp32 where eager rounds each result to bf16, which moves the curve by rounding.
- ``allow_unspec_int_on_nn_module``: a layer's ``layer_idx`` (an int attribute) is not specialised on, so
  one graph serves every layer instead of one recompile per layer (which hits dynamo's cache limit).
The batch dimension of a layer's inputs is marked dynamic, so one graph serves every batch size above 1 (dynamo
still gives batch 1 a graph of its own): a sweep's trials differ in batch size, and each static graph cost a
full compile. What still gives a new graph is LoRA's rank and scaling (its weights' shapes, a float dynamo
specialises on). Graphs land in inductor's on-disk cache, shared by the sweep's workers: a worker whose graph
another compiled loads it instead of compiling it (docs/benchmarks.md measures both).
A resident worker keeps its base model, and so its compiled layers, between trials: a later trial pays
only for recompiling what its LoRA layers changed (docs/benchmarks.md measures what it costs).
"""

from __future__ import annotations

from typing import Any

_MARK = "_sweep_compiled"  # on a layer: whether its training forward runs compiled now
_compiled_with: dict[str, bool] | None = None  # the inductor settings this process compiled layers with


def decoder_layers(llm: Any) -> list[Any]:
    """The model's repeated blocks (``model.layers`` for Qwen2, Llama and InternLM2's remote code)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"speed.compile: {type(llm).__name__} has no decoder layers (model.layers) to compile")
    return list(layers)


def use_compiled_layers(llm: Any, on: bool, *, fused_dropout: bool = False, exact_casts: bool = False) -> None:
    """Training steps of this model run its decoder layers compiled (``on``) or eager.

    Only training forward passes (grad enabled, ``layer.training``) take the compiled path: validation and
    greedy generation (a new sequence length every token) stay eager, so they never trigger a recompile.
    A layer is wrapped once and keeps its compiled code for the worker's later trials, unless a trial asks for
    other inductor settings than the code was compiled with (dynamo does not guard on them): then it recompiles.
    """
    import torch

    if on:
        import torch._dynamo
        import torch._inductor.config

        global _compiled_with
        wanted = {"fallback_random": not fused_dropout, "emulate_precision_casts": exact_casts}
        if _compiled_with not in (None, wanted):
            torch._dynamo.reset()  # compiled code of other settings: dropped, compiled again on first use
        for key, value in wanted.items():
            setattr(torch._inductor.config, key, value)
        _compiled_with = wanted
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in decoder_layers(llm) if on or _wrapped(llm) else []:
        if _MARK not in vars(layer):
            eager = layer.forward
            fast = torch.compile(eager, dynamic=False)

            def forward(*args: Any, __layer=layer, __eager=eager, __fast=fast, **kwargs: Any):
                use = (
                    getattr(__layer, _MARK) and __layer.training
                )  # reentrant checkpointing runs the forward without grad
                if not use:
                    return __eager(*args, **kwargs)
                _batch_dynamic(args, kwargs)
                return __fast(*args, **kwargs)

            layer.forward = forward
        setattr(layer, _MARK, on)


def _batch_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Mark dimension 0 dynamic on the layer's inputs that carry the batch (hidden states, positions, RoPE's
    cos and sin): marked on the hidden states alone, dynamo would specialise it again where they meet."""
    import torch

    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return
    batch = hidden.size(0)

    def mark(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() >= 2 and value.size(0) == batch:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        elif isinstance(value, tuple | list):
            for item in value:
                mark(item)

    mark(args)
    mark(tuple(kwargs.values()))


def _wrapped(llm: Any) -> bool:
    try:
        return any(_MARK in vars(layer) for layer in decoder_layers(llm))
    except ValueError:
        return False
