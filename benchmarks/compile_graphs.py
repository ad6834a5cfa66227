"""What a resident worker's compiles cost over trials of different batch size and LoRA rank (speed.compile).

One process, the kept base model, a new LoRA over it per trial (as `sweep.training.base_model` does), each
trial's decoder layers run by `sweep.training.compiled`; prints each trial's first-step seconds (its compiles)
and dynamo's compiled-frame count. ``static`` turns off the batch dimension's dynamic marking (the graphs before
d0a15e6). Run it twice with the same TORCHINDUCTOR_CACHE_DIR to see what inductor's on-disk cache gives a
second worker:

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$RANDOM .venv/bin/python benchmarks/compile_graphs.py marked [MODEL_DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sweep.training import compiled  # noqa: E402

TRIALS = [(4, 64), (1, 8), (3, 16), (2, 16), (4, 16), (1, 16), (3, 64), (2, 8)]  # (batch size, LoRA r); alpha 16
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "marked"
    model_dir = sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).resolve().parents[1] / ".cache/tiny-model")
    if mode == "static":
        compiled._batch_dynamic = lambda args, kwargs: None
    elif mode != "marked":
        raise SystemExit(f"mode: {mode!r}; expected static or marked")
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    base.config.use_cache = False  # as XTuner trains
    compiled.use_compiled_layers(base, True, fused_dropout=True, exact_casts=True)
    frames = torch._dynamo.utils.counters["frames"]
    for bs, r in TRIALS:
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, target_modules=LINEAR, lora_dropout=0.1))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # PEFT's upcast of trainable weights, as XTuner's LoRA models have
        model.train()
        ids = torch.randint(0, base.config.vocab_size, (bs, 64))
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        print(f"bs {bs} r {r}: first step {time.perf_counter() - started:.1f}s, compiled frames {frames['ok']}",
              flush=True)  # fmt: skip
        base = model.unload()


if __name__ == "__main__":
    main()
