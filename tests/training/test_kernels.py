"""``speed.fused_kernels`` and ``speed.lora_input_16bit`` (sweep.training.kernels) in the dtypes a GPU trains in.

Liger's Triton kernels need a GPU, so the fused path is checked here with stand-ins that compute what Liger's
functions are documented to compute (RMSNorm of X times W with eps; silu(a) * b). What this checks is the
plumbing a GPU run depends on: which modules take the fused path in XTuner's bf16 LoRA set-up (norms in fp32 after
PEFT's upcast, MLP products in bf16), with which arguments, per model instance, through a deep copy, and off
again. The kernels' own numerics on a GPU are `benchmarks/kernel_check.py`'s (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from sweep.training import kernels
from sweep.training.amp import keep_frozen_weights_16bit


class _StandIns:
    """Liger's two autograd functions, as plain PyTorch, counting their calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"rms_norm": 0, "silu_mul": 0}
        outer = self

        class RMSNorm:
            @staticmethod
            def apply(x, weight, eps, offset, casting_mode, in_place):
                assert (offset, casting_mode, in_place) == (0.0, "llama", False)
                outer.calls["rms_norm"] += 1
                variance = x.float().pow(2).mean(-1, keepdim=True)
                return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)

        class SiLUMul:
            @staticmethod
            def apply(a, b):
                outer.calls["silu_mul"] += 1
                return torch.nn.functional.silu(a) * b

        self.modules = {
            "liger_kernel": types.ModuleType("liger_kernel"),
            "liger_kernel.ops": types.ModuleType("liger_kernel.ops"),
            "liger_kernel.ops.rms_norm": types.SimpleNamespace(LigerRMSNormFunction=RMSNorm),
            "liger_kernel.ops.swiglu": types.SimpleNamespace(LigerSiLUMulFunction=SiLUMul),
        }


@pytest.fixture
def stand_ins(monkeypatch) -> _StandIns:
    fake = _StandIns()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    # the CPU has no CUDA tensors: let the fused path run on CPU tensors with the stand-ins
    monkeypatch.setattr(kernels, "_use_fused", lambda module, x: getattr(module, kernels._MARK, False))
    return fake


def _xtuner_lora_model(tiny_model: Path):
    """The tiny model as XTuner prepares a LoRA model on a GPU: loaded in bf16, PEFT's kbit preparation (which
    upcasts everything to fp32), LoRA on all linear layers with dropout, then the frozen linear weights back in
    16 bits (the hook's ``frozen_weights_16bit``)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.bfloat16)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets))
    assert keep_frozen_weights_16bit(model) > 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a trained adapter: LoRA takes part in the loss and its gradients
    return base, model


def _step(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks for both paths
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_kernels_take_the_norms_and_mlps_of_a_bf16_lora_model_and_switch_off_again(tiny_model, stand_ins):
    base, model = _xtuner_lora_model(tiny_model)
    ids = torch.randint(0, base.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    model.train()
    want, want_grads = _step(model, ids)

    layers = base.config.num_hidden_layers
    assert kernels.use_fused_kernels(base, True) == 3 * layers + 1  # 2 norms and an MLP a layer, the final norm
    got, got_grads = _step(model, ids)
    # the norms run in fp32 (PEFT upcast them) and take the fused path; so do the MLPs' bf16 products
    assert stand_ins.calls == {"rms_norm": 2 * layers + 1, "silu_mul": layers}
    assert got == pytest.approx(want, rel=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) == 2 * 7 * layers
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-5, atol=1e-8), name

    twin = copy.deepcopy(base)  # joined steps' shared copy: its modules keep their own flag, not the original's
    kernels.use_fused_kernels(base, False)
    stand_ins.calls.update(rms_norm=0, silu_mul=0)
    _step(model, ids)
    assert stand_ins.calls == {"rms_norm": 0, "silu_mul": 0}, "switched off: the modules' own forward"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        twin(input_ids=ids)
    assert stand_ins.calls == {"rms_norm": 2 * layers + 1, "silu_mul": layers}, "the copy was switched on"

    plain = AutoModelForCausalLM.from_pretrained(tiny_model)  # a model never switched on in this process's view
    assert kernels.use_fused_kernels(plain, False) == 3 * layers + 1  # classes already wrapped: flags set off


def test_a_bf16_norm_input_with_an_fp32_weight_keeps_the_modules_own_forward(tiny_model, stand_ins):
    """The kernel returns its input's dtype, Transformers' norm the promotion with the weight's: a bf16 input
    under an fp32 weight would come out in bf16, so that case stays eager."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(32)
    kernels.use_fused_kernels(torch.nn.Sequential(norm), True)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.float32 and stand_ins.calls["rms_norm"] == 0
    assert norm(x.float()).dtype == torch.float32 and stand_ins.calls["rms_norm"] == 1
    kernels.use_fused_kernels(torch.nn.Sequential(norm), False)


def test_a_norm_of_other_math_keeps_its_own_forward(stand_ins):
    """Gemma's norms also end in RMSNorm but scale by 1 + weight: only Llama-style norms are switched."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    gemma, qwen = GemmaRMSNorm(16), Qwen2RMSNorm(16)
    assert kernels.use_fused_kernels(torch.nn.Sequential(gemma, qwen), True) == 1
    x = torch.randn(2, 3, 16)
    want = gemma.__class__.forward(gemma, x)
    assert torch.equal(gemma(x), want) and stand_ins.calls["rms_norm"] == 0
    qwen(x)
    assert stand_ins.calls["rms_norm"] == 1
    kernels.use_fused_kernels(torch.nn.Sequential(qwen), False)


def test_fused_kernels_are_refused_where_they_cannot_run(tmp_path, tiny_model, monkeypatch):
    from sweep import speed
    from sweep.preflight import check
    from sweep.spec import SpecError, load_spec
    from sweep.xtuner.render import Device
    from tests.conftest import write_spec

    spec = load_spec(write_spec(tmp_path, tiny_model, speed="speed: {fused_kernels: on}"))
    assert spec.speed.fused_kernels == "on", "YAML's on/off booleans"
    with pytest.raises(SpecError, match="speed.fused_kernels: on runs Triton kernels, on CUDA GPUs only"):
        check(spec, Device(cuda=False))
    monkeypatch.setattr(speed, "installed", lambda module: module != "liger_kernel")
    with pytest.raises(SpecError, match=r"speed.fused_kernels: on needs the package liger-kernel \(pip install"):
        check(spec, Device(cuda=True))
    auto = load_spec(write_spec(tmp_path, tiny_model, speed="speed: {fused_kernels: auto}"))
    assert speed.fused_kernels(auto, Device(cuda=True)) is False, "auto: off where the package is missing"
    monkeypatch.setattr(speed, "installed", lambda module: True)
    assert speed.fused_kernels(auto, Device(cuda=True)) is True
    assert speed.fused_kernels(auto, Device(cuda=False)) is False


def test_lora_input_16bit_turns_off_only_peft_s_cast(tiny_model):
    """PEFT casts a LoRA layer's input to the adapter's fp32; kept off, a 16-bit input reaches lora_A as it is and
    autocast multiplies the same bf16 values. Without dropout that is the same step to the bit, on any device."""
    base, model = _xtuner_lora_model(tiny_model)
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            for dropout in module.lora_dropout.values():
                dropout.p = 0.0
    ids = torch.randint(0, base.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    seen: list[torch.dtype] = []
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj  # its input: attention's bf16 output
    o_proj.lora_A["default"].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    model.train()
    want, want_grads = _step(model, ids)
    assert kernels.keep_lora_input_16bit(model, True) == 7 * base.config.num_hidden_layers
    got, got_grads = _step(model, ids)
    assert seen == [torch.float32, torch.bfloat16], "PEFT's fp32 copy of the input, then none"
    assert got == want
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name
    kernels.keep_lora_input_16bit(model, False)
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
