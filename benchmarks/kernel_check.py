"""Are ``speed.lora_input_16bit`` and ``speed.fused_kernels`` exact where they run? Prints what differs, per piece.

    python3 benchmarks/kernel_check.py          # on a GPU machine (also runs on the CPU: eager pieces only)

- A PEFT LoRA layer (bf16 frozen weight, fp32 adapter, dropout 0.1, under bf16 autocast) fed a bf16 input, with
  PEFT's cast of the input to fp32 and without: output, input gradient and LoRA gradients, same seed. Equal only
  if the dropout kernel draws the same mask and scales the same way for a bf16 and an fp32 input.
- Liger's RMSNorm (fp32, as the norms are after PEFT's preparation) and SiLU-times-up (bf16) against
  Transformers' Qwen2 modules: forward and backward, largest difference and the share of equal elements.
"""

from __future__ import annotations

import sys

import torch


def _compare(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    equal = torch.equal(a, b)
    diff = (a.float() - b.float()).abs()
    rel = (diff.max() / b.float().abs().max().clamp(min=1e-30)).item()
    print(f"  {name:34s} equal={equal!s:5s} max abs {diff.max().item():.3e} (rel to max {rel:.2e}), "
          f"equal elements {(a == b).float().mean().item():.4%}")  # fmt: skip
    return equal


def lora_input(device: str) -> bool:
    from peft import LoraConfig, get_peft_model

    print(f"LoRA input cast ({device}): cast to fp32 (PEFT's default) against kept bf16")
    results = []
    for width_in, width_out in ((1536, 1536), (8960, 1536)):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(width_in, width_out, bias=False)).to(device)
        model = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=["0"]))
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # B = 0 would hide the dropout's effect on the output
        layer = model.base_model.model[0]
        x = torch.randn(4, 2048, width_in, device=device).to(torch.bfloat16).requires_grad_()
        outs = []
        for cast in (True, False):
            layer.cast_input_dtype_enabled = cast
            torch.manual_seed(1)
            if device == "cuda":
                torch.cuda.manual_seed(1)
            x.grad = None
            model.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16):
                y = model(x)
            y.float().square().mean().backward()
            grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]
            outs.append((y.detach(), x.grad.clone(), *grads))
        print(f" in {width_in} -> out {width_out}:")
        for label, a, b in zip(("output", "input grad", "lora_A grad", "lora_B grad"), *outs, strict=True):
            results.append(_compare(label, b, a))
    return all(results)


def fused(device: str) -> None:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    print("Liger RMSNorm (fp32 in, fp32 weight) against Qwen2RMSNorm")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    norm = Qwen2RMSNorm(1536, eps=1e-6).to(device)
    norm.weight.data.normal_(1, 0.1)
    x = torch.randn(4, 2048, 1536, device=device, requires_grad=True)
    g = torch.randn_like(x)
    ref = norm(x)
    (ref_dx,) = torch.autograd.grad(ref, x, g)
    out = LigerRMSNormFunction.apply(x, norm.weight, 1e-6, 0.0, "llama", False)
    (dx,) = torch.autograd.grad(out, x, g)
    _compare("forward", out, ref)
    _compare("input grad", dx, ref_dx)

    print("Liger SiLU-times-up (bf16) against silu(gate) * up")
    a = torch.randn(4, 2048, 8960, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn_like(a, requires_grad=True)
    g = torch.randn_like(a)
    ref = torch.nn.functional.silu(a) * b
    ref_da, ref_db = torch.autograd.grad(ref, (a, b), g)
    out = LigerSiLUMulFunction.apply(a, b)
    da, db = torch.autograd.grad(out, (a, b), g)
    _compare("forward", out, ref)
    _compare("gate grad", da, ref_da)
    _compare("up grad", db, ref_db)


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(torch.__version__, device, torch.cuda.get_device_name() if device == "cuda" else "")
    exact = lora_input(device)
    print(f"LoRA input kept in bf16 is exact here: {exact}")
    if device == "cuda":
        fused(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
