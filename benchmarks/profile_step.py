"""Where a LoRA training step's GPU time goes: torch.profiler over steady iterations of one stock trial.

    python3 benchmarks/profile_step.py BATCH_SIZE LORA_R [CHECKPOINTING]   # after `throughput.py prepare`

Runs bench_base.py (set for that trial, checkpointing off unless the third argument is 1) through XTuner's own
train main, profiles iterations 6-8 and prints the kernels by total GPU time, grouped into matmuls,
attention, elementwise/other, and the top operators. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402

if not hasattr(torch.cpu, "is_bf16_supported"):
    torch.cpu.is_bf16_supported = lambda *a, **k: False
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from xtuner.tools import train  # noqa: E402

FIRST, COUNT = 6, 3


def _sync() -> None:
    if torch.cuda.is_available():  # a CPU dry run of the benchmark has nothing to wait for
        torch.cuda.synchronize()


class ProfileHook(Hook):
    priority = "VERY_LOW"

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter == FIRST:
            _sync()
            self.started = time.perf_counter()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                           torch.profiler.ProfilerActivity.CPU])  # fmt: skip
            self.prof.__enter__()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == FIRST + COUNT - 1:
            _sync()
            wall = time.perf_counter() - self.started
            self.prof.__exit__(None, None, None)
            report(self.prof, wall)


def report(prof, wall: float | None = None) -> None:
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    kernels = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in kernels)
    groups: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        if re.search(r"gemm|cutlass|matmul|sm90|xmma|cublas|ampere_.*(h|s)\d+", name):
            g = "matmul"
        elif re.search(r"flash|attention|fmha|sdpa|softmax", name):
            g = "attention/softmax"
        elif re.search(r"cross_entropy|nll|log_softmax", name):
            g = "loss"
        elif re.search(r"copy|cast|convert|to_copy", name):
            g = "copies/casts"
        else:
            g = "elementwise/other"
        groups[g] = groups.get(g, 0.0) + e.self_device_time_total
    print(f"GPU time over {COUNT} iterations: {total / 1e3:.1f} ms ({total / 1e3 / COUNT:.1f} ms per iteration)")
    if wall:  # the kernels' sum against the clock: what the GPU waits for the host (profiler overhead included)
        print(f"wall time {wall * 1e3 / COUNT:.1f} ms per iteration: GPU busy {total / 1e6 / wall:.1%} of it")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<20} {t / 1e3 / COUNT:8.1f} ms/iter  {t / total:6.1%}")
    print("top kernels:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"  {e.self_device_time_total / 1e3 / COUNT:8.2f} ms/iter  x{e.count // COUNT:<5} {e.key[:110]}")
    print("top CPU-side operators by their GPU time:")
    for e in sorted(events, key=lambda e: -getattr(e, "device_time_total", 0))[:20]:
        print(f"  {getattr(e, 'device_time_total', 0) / 1e3 / COUNT:8.2f} ms/iter  x{e.count // COUNT:<5} {e.key[:90]}")
    sys.stdout.flush()


def main() -> None:
    bs, r = int(sys.argv[1]), int(sys.argv[2])
    checkpointing = len(sys.argv) > 3 and sys.argv[3] == "1"
    text = throughput.stock_config(bs, r)
    text = re.sub(r"^checkpointing = .*$", f"checkpointing = {checkpointing}", text, count=1, flags=re.M)
    text = re.sub(r"^iters = .*$", f"iters = {FIRST + COUNT + 1}", text, count=1, flags=re.M)
    config = throughput.WORK / f"profile_{bs}_{r}.py"
    config.write_text(text)
    original = Runner.train

    def train_with_profile(self):  # a hook object in the config would break mmengine's config dump
        self.register_hook(ProfileHook())
        return original(self)

    Runner.train = train_with_profile
    sys.argv = ["xtuner-train", str(config), "--work-dir", str(throughput.WORK / f"profile_{bs}_{r}")]
    train.main()


if __name__ == "__main__":
    main()
