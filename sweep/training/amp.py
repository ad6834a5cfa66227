"""Mixed precision in the training process: the CPU's bf16 AMP, and one autocast for every forward pass.

On a GPU, XTuner trains LoRA under mmengine's ``AmpOptimWrapper``: weights loaded in 16 bits, PEFT's
upcast of the rest to fp32, every step under autocast. A forward pass outside the steps (validation,
generation, the step-0 baseline) must run under the same autocast, or fp32 activations meet 16-bit
frozen weights (``mat1 and mat2 must have the same dtype``). ``training_autocast`` gives that context.

``AmpOptimWrapper`` refuses a machine without an accelerator, so CI could never see those dtypes.
``CpuAmpOptimWrapper`` is the same wrapper on the CPU (autocast in bf16, the one dtype CPU autocast
has); a spec with ``cpu_amp: true`` trains with it and loads the model in bf16, as a GPU would.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CpuAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` on the CPU: the same autocast context, in bf16, without loss scaling.

    bf16 has fp32's exponent range, so it needs no loss scaler (a GPU's dynamic scaler multiplies by
    powers of two, which bf16 represents exactly); a disabled ``GradScaler`` passes losses and
    gradients through unchanged.
    """

    def __init__(self, loss_scale: Any = "dynamic", dtype: Any = "bfloat16", use_fsdp: bool = False, **kwargs) -> None:
        OptimWrapper.__init__(self, **kwargs)  # AmpOptimWrapper.__init__ asserts an accelerator
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler("cpu", enabled=False)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f"optim_wrapper.dtype: CPU autocast runs in bfloat16 only, not {dtype}")
        self.cast_dtype = torch.bfloat16


def training_autocast(optim_wrapper: Any) -> AbstractContextManager:
    """The autocast the training steps run under, for a forward pass outside them; none without AMP.

    DeepSpeed's wrapper is not an ``AmpOptimWrapper``: its engine casts the whole model to one dtype,
    so there is nothing to mix.
    """
    if not isinstance(optim_wrapper, AmpOptimWrapper):
        return nullcontext()
    from mmengine.runner.amp import autocast

    return autocast(dtype=optim_wrapper.cast_dtype)  # what AmpOptimWrapper.optim_context enters, minus no_sync


def trains_under_autocast(optim_wrapper: Any) -> bool:
    """Whether training steps autocast: only then may frozen weights stay in 16 bits beside fp32 activations."""
    return isinstance(optim_wrapper, AmpOptimWrapper)


def keep_frozen_weights_16bit(llm: Any) -> int:
    """Put the frozen weights under LoRA layers back in the 16-bit dtype they were loaded in.

    XTuner prepares every LoRA model with PEFT's ``prepare_model_for_kbit_training``, quantized or
    not, and it upcasts every bf16/fp16 weight to fp32: twice the memory, and under AMP every linear
    call casts its weight back to 16 bits (docs/benchmarks.md measures those copies). Autocast
    multiplies with the same 16-bit values either way, so the math is unchanged; each weight is checked to round-trip exactly before it is replaced. LoRA parameters,
    norms and embeddings stay fp32, so activations are fp32: only call this when every forward pass
    runs under autocast (training's and ``SweepHook``'s validation). Returns the number of weights
    (elements) now held in 16 bits.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    dtype = getattr(llm.config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return 0  # loaded in fp32 (the CPU): nothing to give back
    done = 0
    for module in llm.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        for param in (getattr(base, "weight", None), getattr(base, "bias", None)):
            if param is not None and not param.requires_grad and param.dtype == dtype:
                done += param.numel()  # a shared base model's weight that another trial's call already gave back
            if param is None or param.requires_grad or param.dtype != torch.float32:
                continue
            low = param.data.to(dtype)
            if torch.equal(low.float(), param.data):  # exact: these values came from the 16-bit checkpoint
                param.data = low
                done += param.numel()
    return done
