"""Faster eager decoder layers without compiling: ``speed.fused_kernels`` and ``speed.lora_input_16bit``.

Eager PyTorch runs a decoder layer's pointwise work as chains of small kernels, each reading and writing whole
activations; ``speed.compile`` fuses them but costs a compile per LoRA rank, which a short trial does not win
back (docs/benchmarks.md). These two levers take the largest chains that need no compiling:

- ``fused_kernels``: Liger-Kernel's RMSNorm (one kernel for the fp32 upcast, the mean of squares, the scale and
  the weight) and SiLU-times-up kernels, bound on the model's own norm and MLP instances. GPU only (Triton).
  Norms run in fp32 here (PEFT's preparation upcast them), so only the order of the fp32 sum differs; the SwiGLU
  backward rounds once where eager rounds twice: near-exact, not bit-exact (the GPU run in docs/benchmarks.md
  compares the curves).
- ``lora_input_16bit``: PEFT casts each LoRA layer's input to its adapter's fp32 dtype, then autocast casts the
  dropped-out copy back to 16 bits for the matmul. For an input that is already 16 bits (the attention output
  and the MLP's product, the inputs of o_proj and down_proj) that is two full-size copies per layer and an fp32
  dropout for nothing: the matmul sees the same 16-bit values. PEFT's own switch (``cast_input_dtype_enabled``)
  turns the cast off; inputs in fp32 (the norms' outputs) are unchanged.

Both are set per trial on the trial's model, so a resident worker's next trial gets what its spec asks. Joined steps
(``cotrain``) run a joint model that keeps its own norm and MLP code.
Compiled layers (``speed.compile``) trace the plain forwards: inductor fuses those chains itself.
"""

from __future__ import annotations

from typing import Any

import torch

_MARK = "_sweep_fused_kernel"  # on a norm or MLP instance: whether its forward runs the fused kernel now


#: Norm classes whose math is Llama's, ``weight * (x / rms(x))``, by name prefix: Gemma's norms also end in RMSNorm but
#: scale by ``1 + weight``, and any other model keeps its own code.
LLAMA_STYLE_NORMS = ("Llama", "Qwen2", "Qwen3", "Mistral", "Mixtral", "InternLM2", "InternLM3")


def _is_rms_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("RMSNorm") and name.startswith(LLAMA_STYLE_NORMS) and _eps(module) is not None \
        and isinstance(getattr(module, "weight", None), torch.Tensor)  # fmt: skip


def _eps(module: torch.nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, int | float) else None


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and isinstance(
        getattr(module, "act_fn", None), torch.nn.SiLU
    )


def _use_fused(module: torch.nn.Module, x: torch.Tensor) -> bool:
    return getattr(module, _MARK, False) and x.is_cuda and not torch.compiler.is_compiling()


def _fused_rms_norm(eager: Any) -> Any:
    def forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # the kernel returns the input's dtype, Transformers' norm promotes it with the weight's: equal ones only
        if args or kwargs or not _use_fused(self, hidden_states) or hidden_states.dtype != self.weight.dtype:
            return eager(self, hidden_states, *args, **kwargs)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # "llama" casting is Transformers' Llama/Qwen2 order; in_place=False leaves the incoming gradient intact
        return LigerRMSNormFunction.apply(hidden_states, self.weight, _eps(self), 0.0, "llama", False)

    return forward


def _fused_swiglu(eager: Any) -> Any:
    def forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not _use_fused(self, x):
            return eager(self, x, *args, **kwargs)
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))

    return forward


def use_fused_kernels(model: Any, on: bool) -> int:
    """Norms and SwiGLU MLPs of ``model`` run Liger's kernels (``on``) or their own forward; returns how many.

    The class's forward is wrapped once (an instance attribute would follow a deep copy, such as joined steps'
    shared copy, back to the original module); each instance carries its own flag, so the switch is per model
    and a resident worker's next trial can turn it off again.
    """
    switched = 0
    for module in model.modules():
        kind = _fused_rms_norm if _is_rms_norm(module) else _fused_swiglu if _is_swiglu_mlp(module) else None
        if kind is None:
            continue
        cls = type(module)
        if _MARK not in vars(cls):
            if not on:
                continue  # never switched on in this process: nothing to switch off
            cls.forward = kind(cls.forward)
            setattr(cls, _MARK, False)  # every instance eager unless switched
        setattr(module, _MARK, on)
        switched += 1
    return switched


def keep_lora_input_16bit(model: Any, on: bool) -> int:
    """LoRA layers take their input in the dtype it comes in (``on``) or PEFT's cast to the adapter's dtype;
    returns how many LoRA layers were set."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = not on
    return len(layers)
