"""Where the time of a joined step goes: one pass over several trials' rows against each trial alone (issue 13).

In the 12-trial benchmark a batch-4 trial joined with a batch-1 trial stepped in 0.659 s where the same trial alone
took 0.377 s. This script takes the sweep's threads, hooks, optimizers and data loaders out of the picture: real
XTuner models with PEFT LoRA over shared copies of one base (``sweep.training.cotrain``), the joined pass itself
(``JoinedSteps._pass``), timed with the GPU synchronised around it, and the time until the pass returns to Python
(its kernels launched, not run): when the two are close, the pass is bound by the CPU launching kernels, not by the
GPU. The same pass again while two other Python threads keep the interpreter busy (as other trials' set-ups,
hooks and data loading do in a worker) shows what the interpreter lock costs it; a profile of the joined pass
prints where its GPU time goes.

    python3 benchmarks/joined_pass.py                       # on a GPU: the Qwen2-1.5B shape at /tmp/big, 2048 tokens
    JP_MODEL=.cache/tiny-model JP_LENGTH=64 python3 benchmarks/joined_pass.py   # a CPU dry run

Environment: JP_MODEL, JP_LENGTH, JP_GROUPS (trials as rank:rows, groups by ';', default "64:4,8:1;64:2,16:2,8:1"),
JP_REPEAT (timed passes per case, default 8), JP_CHECKPOINTING (1: activation checkpointing), OUT (profile.txt).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = os.environ.get("JP_MODEL", "/tmp/big")
LENGTH = int(os.environ.get("JP_LENGTH", "2048"))
GROUPS = [[tuple(int(x) for x in t.split(":")) for t in g.split(",")]
          for g in os.environ.get("JP_GROUPS", "64:4,8:1;64:2,16:2,8:1").split(";")]  # fmt: skip
REPEAT = int(os.environ.get("JP_REPEAT", "8"))
CHECKPOINTING = os.environ.get("JP_CHECKPOINTING", "0") == "1"
OUT = Path(os.environ.get("OUT", "/tmp/joined-pass"))
PEAK_FLOPS = 989e12  # dense bf16 of an H100/H200


def _setup():
    from mmengine.optim import AmpOptimWrapper
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from xtuner.model import SupervisedFinetune
    from xtuner.model.modules import dispatch_modules

    from sweep.speed import FUSED_LOSS_PACKAGES, installed
    from sweep.training import cotrain
    from sweep.training.amp import CpuAmpOptimWrapper, keep_frozen_weights_16bit
    from sweep.training.base_model import upcast_like_peft

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    class Model(SupervisedFinetune):  # XTuner's model around a model object, as the worker's cache hands it one
        def build_llm_from_cfg(self, llm_cfg, use_varlen_attn, max_position_embeddings):
            llm_cfg.config.use_cache = False
            dispatch_modules(llm_cfg, use_varlen_attn=use_varlen_attn)
            return llm_cfg

    base = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    upcast_like_peft(base)
    base.to(device)
    loss_impl = next((impl for impl, (module, _) in FUSED_LOSS_PACKAGES.items() if installed(module)), "off") \
        if cuda else "off"  # fmt: skip

    def trial(rank: int, seed: int):
        torch.manual_seed(seed)
        lora = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                          target_modules="all-linear")  # fmt: skip
        model = Model(llm=cotrain.shared_copy(base), lora=lora, use_activation_checkpointing=CHECKPOINTING)
        model.to(device).train()
        keep_frozen_weights_16bit(model.llm)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        wrapper = AmpOptimWrapper(optimizer=optimizer, dtype="bfloat16") if cuda else \
            CpuAmpOptimWrapper(optimizer=optimizer)  # fmt: skip
        return model, wrapper

    return base, trial, device, loss_impl


def _rows(n: int, vocab: int, device, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, LENGTH), generator=gen)
    labels = ids.clone()
    labels[:, : LENGTH // 4] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "position_ids": torch.arange(LENGTH, device=device).expand(n, -1).contiguous()}  # fmt: skip


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeat: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``fn`` with the GPU idle before and synchronised after, and median until it returned."""
    for _ in range(warmup):
        fn()
    _sync(device)
    walls, launches = [], []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync(device)
        walls.append(time.perf_counter() - t0)
        launches.append(t1 - t0)
    return statistics.median(walls), statistics.median(launches)


class _Busy:
    """Two threads of pure Python while a pass runs: what other trials' set-ups and hooks do to the interpreter lock."""

    def __init__(self, n: int = 2) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._spin, daemon=True) for _ in range(n)]

    def _spin(self) -> None:
        while not self.stop.is_set():
            sum(i * i for i in range(2000))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def main() -> None:

    OUT.mkdir(parents=True, exist_ok=True)
    base, trial, device, loss_impl = _setup()
    params = sum(p.numel() for p in base.parameters())
    print(f"model {MODEL}: {params / 1e9:.3f} B parameters, rows of {LENGTH} tokens, loss {loss_impl}, "
          f"checkpointing {CHECKPOINTING}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")  # fmt: skip

    def mfu(rows: int, seconds: float) -> str:
        tokens = rows * LENGTH
        return f"{tokens / seconds:,.0f} tokens/s, {100 * 4 * params * tokens / seconds / PEAK_FLOPS:.1f} % MFU"

    for g, group in enumerate(GROUPS):
        _group(g, group, base, trial, device, loss_impl, mfu)
        if device.type == "cuda":
            print(f"group {g} peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _group(g: int, group: list[tuple[int, int]], base, trial, device, loss_impl: str, mfu) -> None:
    """One group of trials: each alone, joined, joined beside busy threads, their optimizers, (last) a profile."""
    from sweep.training import cotrain

    vocab = base.config.vocab_size
    built = [trial(rank, 10 * g + i) for i, (rank, _) in enumerate(group)]
    solo = []
    for i, (model, wrapper) in enumerate(built):  # each trial alone: a joined group of one
        steps = cotrain.JoinedSteps(base, CHECKPOINTING)
        member = steps.join(model, wrapper, seed=i, loss_impl=loss_impl)
        solo.append((steps, member, wrapper))
    joint = cotrain.JoinedSteps(base, CHECKPOINTING)
    members = [joint.join(model, wrapper, seed=i, loss_impl=loss_impl) for i, (model, wrapper) in enumerate(built)]
    data = [_rows(rows, vocab, device, 100 * g + i) for i, (_, rows) in enumerate(group)]

    def zero() -> None:
        for model, _ in built:
            model.zero_grad(set_to_none=True)

    alone_total = 0.0
    for i, ((steps, member, wrapper), (rank, rows)) in enumerate(zip(solo, group, strict=True)):
        wall, launch = _time(lambda s=steps, m=member, w=wrapper, d=data[i]: (s._pass([(m, d, w)]), zero()),
                             device, REPEAT)  # fmt: skip
        alone_total += wall
        print(f"group {g} trial {i} (r {rank}, {rows} rows) alone: pass {wall:.3f} s, returned after {launch:.3f} s;"
              f" {mfu(rows, wall)}")  # fmt: skip
    rows_all = sum(rows for _, rows in group)
    batch = [(m, d, w) for m, d, (_, w) in zip(members, data, built, strict=True)]
    wall, launch = _time(lambda: (joint._pass(batch), zero()), device, REPEAT)
    print(f"group {g} joined ({rows_all} rows): pass {wall:.3f} s, returned after {launch:.3f} s; {mfu(rows_all, wall)};"
          f" the trials alone one after another {alone_total:.3f} s ({alone_total / wall:.2f}x)")  # fmt: skip
    with _Busy():
        busy, busy_launch = _time(lambda: (joint._pass(batch), zero()), device, 2, warmup=0)
    print(f"group {g} joined, two busy Python threads beside it: pass {busy:.3f} s, returned after "
          f"{busy_launch:.3f} s ({busy / wall:.2f}x the quiet pass)")  # fmt: skip
    default = sys.getswitchinterval()
    for interval in (1e-3, 1e-4):  # how long a thread that wants the lock back waits before it is handed over
        sys.setswitchinterval(interval)
        with _Busy():
            busy_i, _ = _time(lambda: (joint._pass(batch), zero()), device, 2, warmup=0)
        sys.setswitchinterval(default)
        print(f"group {g} joined, busy threads, switch interval {interval * 1e3:g} ms (default {default * 1e3:g}):"
              f" pass {busy_i:.3f} s ({busy_i / wall:.2f}x the quiet pass)")  # fmt: skip
    if g == 0:
        _beside_setup(g, trial, lambda: (joint._pass(batch), zero()), device, wall)
    # the optimizers step on the pass's gradients (an AMP wrapper's scaler refuses a step without them): timed together
    with_steps, _ = _time(lambda: (joint._pass(batch), [w.step() for _, w in built], zero()), device, REPEAT)
    print(f"group {g} joined pass and the {len(built)} optimizer steps: {with_steps:.3f} s "
          f"(the steps about {with_steps - wall:.3f} s)")  # fmt: skip
    if g == len(GROUPS) - 1:
        _profile(lambda: (joint._pass(batch), zero()), device, OUT / "profile.txt")
    for m in members:
        joint.leave(m)


def _beside_setup(g: int, trial, fn, device, quiet: float) -> None:
    """Joined passes while another trial is set up in a thread beside them (a worker's case: each job builds its
    runner in its own thread while the others train), at the default switch interval and a short one."""
    t0 = time.perf_counter()
    trial(8, 999)
    alone = time.perf_counter() - t0
    default = sys.getswitchinterval()
    for interval in (default, 1e-4):
        sys.setswitchinterval(interval)
        done = threading.Event()
        took: list[float] = []

        def build(done: threading.Event = done, took: list[float] = took) -> None:
            t = time.perf_counter()
            trial(8, 999)
            took.append(time.perf_counter() - t)
            done.set()

        thread = threading.Thread(target=build, daemon=True)
        passes = []
        thread.start()
        while not done.is_set():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            passes.append(time.perf_counter() - t)
        thread.join()
        sys.setswitchinterval(default)
        print(f"group {g} joined while a trial is set up beside it (switch interval {interval * 1e3:g} ms): "
              f"{len(passes)} passes, median {statistics.median(passes):.3f} s ({statistics.median(passes) / quiet:.2f}x "
              f"the quiet pass); the set-up {took[0]:.2f} s (alone {alone:.2f} s)")  # fmt: skip


def _profile(fn, device, path: Path) -> None:
    """The joined pass under torch's profiler: GPU kernel time against the wall, and the largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=25)
    path.write_text(table)
    if device.type == "cuda":
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        print(f"profile: 3 joined passes {wall:.3f} s under the profiler, GPU kernels {kernel_us / 1e6:.3f} s "
              f"({100 * kernel_us / 1e6 / wall:.0f} % busy), {launches / 3:,.0f} kernel launches a pass; table in {path}")  # fmt: skip
    print("\n".join(table.splitlines()[:18]))


if __name__ == "__main__":
    main()
