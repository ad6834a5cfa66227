"""GPU slots: several trials share a GPU while their memory fits; a multi-GPU trial takes whole GPUs.

One small LoRA trial leaves most of an H100 idle (about 3 % model FLOPs at batch 1), so a sweep packs
trials onto GPUs by memory. A trial's memory is estimated from its batch size and sequence length
(weights, the fp32 logits and their gradient, the activations kept per layer) and the estimate is
calibrated by the peak each trial really reached (after its first iterations, then at its end), so the
packing gets tighter or looser as evidence comes in; a running trial's own slot shrinks to its measured peak. ``CUDA_VISIBLE_DEVICES`` then points each trial's process at its GPU(s).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from sweep.trial.protocol import FUSED_LOSS_CHUNK

log = logging.getLogger("sweep")
CONTEXT_MB = 600.0  # a CUDA context and the allocator's slack, per process
HEADROOM = 0.92  # of each GPU's memory that trials may plan to use
FITTED_MARGIN = 1.10  # a running trial's slot, fitted to its measured reserve: room for a later validation point
MAX_PER_GPU = 8
# A trial's allocator peak (torch.cuda.max_memory_reserved) over ``MemoryModel.formula``, before any trial of the
# sweep was measured: fitted to XTuner LoRA trials on H100/H200 GPUs, and with Liger's kernels and 16-bit LoRA inputs
# (which keep no fp32 copies for the backward) to the peaks of the 12-trial H100 benchmark (docs/benchmarks.md).
CALIBRATION = 2.7
LEAN_CALIBRATION = 1.9


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (``taskset``, a batch scheduler's binding), not the machine's.

    ``os.cpu_count()`` counts every CPU of the machine, so CPU trials pinned to a few of them would each start as
    many threads as the machine has and share those few CPUs.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


@dataclass
class ModelShape:
    """What the memory of a LoRA trial grows with; read from the model's config.json and weight files."""

    weights_mb: float
    hidden: int
    layers: int
    vocab: int

    @classmethod
    def from_dir(cls, path: Path, quantize: bool = False) -> ModelShape:
        cfg = json.loads((path / "config.json").read_text())
        files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        if str(cfg.get("torch_dtype", "bfloat16")) == "float32":
            size_mb /= 2  # trained in bf16 on a GPU
        if quantize:
            size_mb *= 0.3  # nf4 weights plus the layers bitsandbytes keeps in 16 bits
        return cls(size_mb, int(cfg.get("hidden_size", 0)), int(cfg.get("num_hidden_layers", 0)),
                   int(cfg.get("vocab_size", 0)))  # fmt: skip


@dataclass
class MemoryModel:
    """A trial's peak GPU memory in MB: a formula, scaled by what finished trials measured (one ratio; a line over the
    formula once trials of two sizes were measured)."""

    shape: ModelShape
    calibration: float = 0.0  # 0: CALIBRATION, or LEAN_CALIBRATION for a ``lean`` trial
    floor: float = 0.0  # raised by an out-of-memory: measured peaks never plan below it again
    fused_loss: bool = False  # speed.fused_loss: the logits of at most one chunk of positions exist at once
    lean: bool = False  # speed.fused_kernels and lora_input_16bit both on: no fp32 norm intermediates or LoRA inputs
    # (formula, measured peak) by whose peak it is: a trial's number, or a fresh key for an unnamed observation
    _peaks: dict[Hashable, tuple[float, float]] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.calibration:
            self.calibration = LEAN_CALIBRATION if self.lean else CALIBRATION
        self._first = self.calibration  # what forgetting every measurement returns to

    @property
    def measured(self) -> list[tuple[float, float]]:
        """The (formula, measured peak) pairs the plan is calibrated by, in the order first observed."""
        return list(self._peaks.values())

    def formula(self, batch_size: int, max_length: int, checkpointing: bool = True) -> float:
        tokens = batch_size * max_length
        with_logits = min(tokens, FUSED_LOSS_CHUNK) if self.fused_loss else tokens
        logits = with_logits * self.shape.vocab * 5  # bf16 logits, their fp32 loss upcast and gradient, averaged
        per_layer = tokens * self.shape.hidden * 2 * (3 if checkpointing else 21)  # bf16 activations kept
        return self.shape.weights_mb + (logits + per_layer * self.shape.layers) / 2**20

    def estimate(self, batch_size: int, max_length: int, checkpointing: bool = True) -> float:
        formula = self.formula(batch_size, max_length, checkpointing)
        with self._lock:  # Optuna's trial threads estimate while others observe
            by_line = self._on_line(formula) if self.floor == 0 else None  # after an out-of-memory: the ratio only
            return CONTEXT_MB + (by_line if by_line is not None else formula * self.calibration)

    def _on_line(self, formula: float) -> float | None:
        """The plan for ``formula`` from a line through the measured peaks, shifted up to cover every one of them,
        plus 5 %, never below the smallest measured ratio plus 5 %; None until trials of two sizes (formula values
        20 % apart) have been measured. Called with the lock held.

        One ratio fits a trial whose fixed part (weights, optimizer, the allocator's first blocks) and per-token
        part scale alike; measured on an H100 they did not (docs/benchmarks.md, 2026-12-06), so the largest ratio
        planned the small trials larger than they grew. The line's intercept is then negative: below the measured
        sizes the smallest ratio bounds it.
        """
        xs, ys = [f for f, _ in self._peaks.values()], [p for _, p in self._peaks.values()]
        if len(xs) < 2 or max(xs) < 1.2 * min(xs):
            return None
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        if slope <= 0:
            return None
        base = my - slope * mx
        base += max(0.0, max(y - (base + slope * x) for x, y in zip(xs, ys, strict=True)))
        least = min(y / x for x, y in zip(xs, ys, strict=True))
        return max(base + slope * formula, least * formula) * 1.05

    def observe(self, batch_size: int, max_length: int, checkpointing: bool, peak_mb: float,
                key: Hashable | None = None) -> None:  # fmt: skip
        """A trial's measured peak: the calibration becomes the largest ratio seen, plus 5 %.

        Evidence replaces the default (a smaller model than the fit's packs tighter), but the plan
        never drops below a ratio that once ran out of memory. A peak observed again under the same ``key`` (a
        running trial's, then the same trial's at its end) replaces the one before.
        """
        formula = self.formula(batch_size, max_length, checkpointing)
        if formula <= 0 or peak_mb <= 0:
            return
        with self._lock:
            self._peaks[object() if key is None else key] = (formula, peak_mb)
            self._recalibrate()

    def forget(self, key: Hashable) -> None:
        """Drop the peak observed under ``key`` (a trial that failed after its early reading)."""
        with self._lock:
            if self._peaks.pop(key, None) is not None:
                self._recalibrate()

    def _recalibrate(self) -> None:
        """The largest measured ratio plus 5 % (the first calibration without any), never below the floor. Called
        with the lock held."""
        ratios = [p / f for f, p in self._peaks.values()]
        self.calibration = max(self.floor, max(ratios) * 1.05 if ratios else self._first)

    def out_of_memory(self) -> None:
        """A trial ran out of memory beside others: plan every later trial larger."""
        with self._lock:
            self.calibration *= 1.25
            self.floor = self.calibration


def checkpointing(choice: str, memory: MemoryModel | None, slots: GpuSlots | None, batch_size: int,
                  max_length: int) -> bool | None:  # fmt: skip
    """Activation checkpointing for a trial (``speed.activation_checkpointing``): what the spec says, or (auto, on
    GPUs) off when the trial fits on one GPU without it. Off computes the same gradients faster, for about twice the
    activation memory (docs/benchmarks.md). None: leave the base config's choice (no GPU plan). The trial runs by
    it and the sweep plans its workers by it."""
    if choice != "auto":
        return choice == "on"
    if slots is None or memory is None:
        return None
    return memory.estimate(batch_size, max_length, checkpointing=False) > slots.one_gpu_mb


class GpuSlots:
    """Hands out GPUs to trials by memory (and at most ``per_gpu`` trials on one GPU).

    ``acquire`` blocks until the trial fits; ``release`` gives its memory back. Thread-safe: the
    trials of ``--n-jobs`` call it from their own threads.
    """

    def __init__(self, gpus: dict[int, float], per_gpu: int | None = None) -> None:
        if not gpus:
            raise ValueError("no GPUs to hand out")
        self.total = dict(gpus)  # GPU index -> memory in MB
        self.per_gpu = per_gpu or MAX_PER_GPU
        self.used = dict.fromkeys(gpus, 0.0)
        self.count = dict.fromkeys(gpus, 0)
        self._cond = threading.Condition()
        self._waiting: dict[int, tuple[float, int]] = {}  # order -> (MB, GPUs) of each trial waiting with an order

    @property
    def one_gpu_mb(self) -> float:
        """What one trial may plan to use of the smallest GPU: what a trial that runs alone reserves."""
        return min(self.total.values()) * HEADROOM

    def too_large(self, need_mb: float) -> bool:
        """Whether a trial of ``need_mb`` fits on none of the GPUs: it then takes one alone (and may go OOM)."""
        return all(need_mb > t * HEADROOM for t in self.total.values())

    def _fits(self, gpu: int, need_mb: float, used: dict[int, float], count: dict[int, int]) -> bool:
        return count[gpu] < self.per_gpu and used[gpu] + need_mb <= self.total[gpu] * HEADROOM

    def _options(self, n: int, need_mb: float, used: dict[int, float], count: dict[int, int]) -> list[list[int]]:
        """Where a trial of ``need_mb`` on ``n`` GPUs could go, best first, given ``used`` and ``count``."""
        if n == 1:
            fitting = [g for g in self.total if self._fits(g, need_mb, used, count)]
            # the emptiest GPU first: trials spread before they stack
            return [[g] for g in sorted(fitting, key=lambda g: (count[g], used[g], g))]
        idle = [g for g in sorted(self.total) if count[g] == 0 and need_mb <= self.total[g] * HEADROOM]
        return [idle[:n]] if len(idle) >= n else []  # a multi-GPU trial takes whole GPUs

    def _choose(self, n: int, need_mb: float, order: int | None = None) -> list[int] | None:
        """The best place for the trial that also leaves the earliest waiting trial before ``order`` room beside it
        (an unordered trial counts as the last); None if there is none. Called with the lock held. The check works
        on copies: adding and taking back float MB in ``used`` would leave a remainder on a GPU no trial holds."""
        earlier = [k for k in self._waiting if order is None or k < order]
        head = self._waiting[min(earlier)] if earlier else None
        for chosen in self._options(n, need_mb, self.used, self.count):
            if head is None:
                return chosen
            used, count = dict(self.used), dict(self.count)
            for g in chosen:
                used[g] += need_mb
                count[g] += 1
            if self._options(head[1], head[0], used, count):
                return chosen
        return None

    def acquire(self, need_mb: float, n: int = 1, timeout: float | None = None) -> list[int]:
        """``acquire_estimated`` for a fixed estimate: the GPUs."""
        return self.acquire_estimated(lambda: need_mb, n, timeout)[0]

    def acquire_estimated(
        self, estimate: Callable[[], float], n: int = 1, timeout: float | None = None, order: int | None = None
    ) -> tuple[list[int], float]:
        """The GPUs for a trial and the MB reserved there (what ``release`` gives back), blocking until it fits.

        ``estimate`` is asked again each time a slot frees: a trial that waits while finished trials' peaks
        recalibrate the memory model is then placed by what they taught it, not by the guess it began waiting with.

        ``order`` (the trial's number) keeps the earliest waiting trial from starving: a later one starts only where
        the earliest waiting one would still fit beside it (``_choose``). Without it, small trials that keep
        fitting into the room a large one waits for would run first, one after another, and the large trial last,
        alone (seen on an H100: docs/benchmarks.md).
        """
        if n > len(self.total):
            raise ValueError(f"gpus_per_trial {n}: only {len(self.total)} GPU(s) given ({sorted(self.total)})")
        need_mb = 0.0

        def fits() -> bool:
            nonlocal need_mb
            need_mb = estimate()
            if self.too_large(need_mb):  # it runs alone on a GPU (the caller has warned)
                need_mb = self.one_gpu_mb
            if order is not None:
                self._waiting[order] = (need_mb, n)
            return self._choose(n, need_mb, order) is not None

        with self._cond:
            if not self._cond.wait_for(fits, timeout=timeout):
                # still waiting, in its place: the caller asks again, or ``withdraw``s
                raise TimeoutError(f"no GPU slot for {need_mb:.0f} MB within {timeout}s")
            if order is not None:
                self._waiting.pop(order, None)
                self._cond.notify_all()  # a trial behind this one may start beside it
            chosen = self._choose(n, need_mb, order)
            for g in chosen:
                self.used[g] += need_mb
                self.count[g] += 1
            return chosen, need_mb

    def withdraw(self, order: int) -> None:
        """A trial that waited with ``order`` and will not start (the sweep stops): the trials behind it go on."""
        with self._cond:
            if self._waiting.pop(order, None) is not None:
                self._cond.notify_all()

    def resize(self, gpus: list[int], from_mb: float, to_mb: float) -> None:
        """A running trial's reservation becomes ``to_mb`` (what ``release`` then gives back); waiters are woken."""
        with self._cond:
            for g in gpus:
                self.used[g] = max(0.0, self.used[g] - from_mb + to_mb)
            self._cond.notify_all()

    def shared(self, gpus: list[int]) -> bool:
        """Whether another trial runs on any of these GPUs now."""
        with self._cond:
            return any(self.count[g] > 1 for g in gpus)

    def room(self, gpu: int) -> float:
        """MB of this GPU that trials may still plan to use."""
        with self._cond:
            return self.total[gpu] * HEADROOM - self.used[gpu]

    def release(self, gpus: list[int], need_mb: float) -> None:
        with self._cond:
            for g in gpus:
                self.count[g] -= 1
                # a GPU no trial holds is empty: float remainders of the MB added and taken back never block it
                self.used[g] = max(0.0, self.used[g] - need_mb) if self.count[g] else 0.0
            self._cond.notify_all()

    def capacity(self, need_mb: float) -> int:
        """How many trials of this size could run at once: the thread count worth starting."""
        per = [min(self.per_gpu, math.floor(t * HEADROOM / max(need_mb, 1.0))) for t in self.total.values()]
        return max(1, sum(per))


def gpu_query(field: str) -> dict[int, str]:
    """GPU index -> one of nvidia-smi's ``--query-gpu`` fields ({} without nvidia-smi): the sweep process asks it,
    not CUDA, so that it never holds a CUDA context itself."""
    if not shutil.which("nvidia-smi"):
        return {}
    out = subprocess.run(["nvidia-smi", f"--query-gpu=index,{field}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    found = {}
    for line in out.stdout.strip().splitlines():
        index, _, value = line.partition(",")
        if index.strip().isdigit():
            found[int(index)] = value.strip()
    return found


def visible_gpus(selected: list[int] | None = None) -> dict[int, float]:
    """GPU index -> memory in MB, from nvidia-smi."""
    found = {index: float(total) for index, total in gpu_query("memory.total").items()}
    if selected is not None:
        missing = [g for g in selected if g not in found]
        if missing:
            raise ValueError(f"--gpus {','.join(map(str, selected))}: no GPU {missing} (found {sorted(found)})")
        found = {g: found[g] for g in selected}
    return found
