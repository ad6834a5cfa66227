"""One ``xtuner train`` job in this process, and the clean-up that lets the next job start as if fresh.

Kept apart from ``worker`` (which runs as ``__main__``) so that this function has one home that a fresh
training process and a resident worker both call, and that tests can wrap.
"""

from __future__ import annotations

import sys
import time

from sweep.training import patches
from sweep.training.base_model import CACHE

BEGAN: float | None = None  # when the current job began (wall clock), for the hook's start event


def train_in_this_process(argv: list[str]) -> None:
    """``xtuner train`` with these arguments, here; a resident worker calls it once per trial."""
    global BEGAN
    BEGAN = time.time()
    patches.prepare_process()
    import torch
    from xtuner.tools import train

    CACHE.job_started()
    before = manager_instances()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the end event reports this job's peak, not the worker's
    sys.argv = ["xtuner-train", *argv]
    try:
        train.main()
    finally:
        forget_runner_state(before)


def manager_instances() -> dict[type, set[str]]:
    from mmengine.utils import ManagerMixin

    found: dict[type, set[str]] = {}
    todo = list(ManagerMixin.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "_instance_dict" in vars(cls):
            found[cls] = set(cls._instance_dict)
    return found


def forget_runner_state(before: dict[type, set[str]]) -> None:
    """After a job: drop mmengine's named instances it made and give the base model back clean.

    The job's garbage (runner, optimizer, LoRA layers: reference cycles holding GPU memory) is
    collected here, before the next job. A full collection walks every object of the process (torch,
    transformers and XTuner make hundreds of thousands), so what survives a job is frozen
    (``gc.freeze``: the collector skips it from then on) and the next job's collection walks only
    what that job made. Frozen objects are never collected, so unless the
    job reused the kept base model and it stays kept, everything is unfrozen first: a model let go
    (another model came, or this one cannot be reused) goes with a full collection, cycles and all.
    """
    import gc

    import torch

    for cls, names in manager_instances().items():
        for name in names - before.get(cls, set()):
            instance = cls._instance_dict.pop(name)
            for handler in list(getattr(instance, "handlers", [])):
                handler.close()
                instance.removeHandler(handler)
    kept = CACHE.job_ended()
    if not (CACHE.reused and kept):
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the trial held goes back to the GPU's other trials
