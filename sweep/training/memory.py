"""A training step's peak GPU memory, read before mmengine forgets it.

mmengine's LoggerHook resets the allocator's peak (``torch.cuda.reset_peak_memory_stats``) whenever it
logs ``memory``; a hook that reads the peak after it (SweepHook runs later) sees only what is still
allocated after the step. This hook runs just before LoggerHook and keeps the peak for SweepHook. It also
resets the peak before each step, so a validation point (run by SweepHook after a step) never counts as the
next step's peak.
"""

from __future__ import annotations

from typing import Any

import torch
from mmengine.hooks import Hook

PEAK_KEY = "sweep_step_peak_memory_mb"  # in the runner's message hub


class StepMemoryHook(Hook):
    priority = "NORMAL"  # LoggerHook is BELOW_NORMAL: this one runs first

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if torch.cuda.is_available():
            runner.message_hub.update_info(PEAK_KEY, torch.cuda.max_memory_allocated() / 2**20)
