"""One ``xtuner train`` job in this process, and the clean-up that lets the next job start as if fresh.

Kept apart from ``worker`` (which runs as ``__main__``) so that this function has one home that a fresh
training process and a resident worker both call, and that tests can wrap.

A worker that trains several jobs at once runs each in its own thread (``sweep.training.cotrain``): a
job's set-up (argument parsing through ``sys.argv``, the runner's seeding of torch's global generator,
LoRA's initialisation, mmengine's named instances) then holds ``cotrain.SETUP`` until the hook says the
runner is built (``setup_done``), so the instances made meanwhile are this job's alone.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import threading
import time
from pathlib import Path

from sweep.training import cotrain, patches
from sweep.training.base_model import CACHE
from sweep.trial import protocol

_job = threading.local()  # this thread's job: when it began, whether it holds SETUP, the instances it made


def began() -> float | None:
    """When the current thread's job began (wall clock), for the hook's start event."""
    return getattr(_job, "began", None)


def train_in_this_process(argv: list[str]) -> None:
    """``xtuner train`` with these arguments, here; a resident worker calls it once per trial."""
    _job.began = time.time()
    _job.profile = _start_profile(argv)
    try:
        patches.prepare_process()
        import torch
        from xtuner.tools import train

        CACHE.job_started()
        if CACHE.shared:
            cotrain.SETUP.acquire()
            _job.holds_setup = True
        before = manager_instances()
        _job.before, _job.made = before, None
        if torch.cuda.is_available() and not CACHE.shared:
            torch.cuda.reset_peak_memory_stats()  # the end event reports this job's peak, not the worker's
        sys.argv = ["xtuner-train", *argv]
        try:
            train.main()
        finally:
            cotrain.leave_thread()
            setup_done()  # a job that failed before its hooks' before_train: SETUP ends here
            forget_runner_state(before, _job.made)
    finally:
        _end_profile()  # the same for the profiler, even when the job failed before its set-up began


def _start_profile(argv: list[str]) -> tuple[cProfile.Profile, Path] | None:
    """This job's set-up under cProfile when ``protocol.PROFILE_SETUP_ENV`` asks for it (a diagnosis of where a
    trial's time before its first step goes; the profiler slows what it watches). Not in a worker that trains jobs
    at once (from Python 3.12 a profiler watches every thread of the process: the others' steps would be in it), and
    only on the first rank of a trial that spans GPUs."""
    wanted = os.environ.get(protocol.PROFILE_SETUP_ENV, "") not in ("", "0")
    if not wanted or CACHE.shared or "--work-dir" not in argv or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    profile = cProfile.Profile()
    try:
        profile.enable()
    except ValueError:  # Python 3.12+: another profiler is active in this process
        return None
    return profile, Path(argv[argv.index("--work-dir") + 1]) / protocol.SETUP_PROFILE


def _end_profile() -> None:
    """Stop this job's profiler and write its largest entries as text and all of it for pstats (``.prof``); a
    profile that cannot be written is a warning, never the trial's failure."""
    found = getattr(_job, "profile", None)
    if found is None:
        return
    _job.profile = None
    profile, path = found
    profile.disable()
    try:
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(25)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.getvalue())
        stats.dump_stats(path.with_suffix(".prof"))
    except Exception as err:  # noqa: BLE001 - a diagnosis, not part of training
        print(f"xtuner-sweep: could not write the set-up profile {path}: {err}", file=sys.stderr)


def setup_done() -> None:
    """The runner is built: other jobs of this worker may build theirs (no-op unless this thread holds SETUP);
    the set-up's profile, if one is taken, ends here."""
    if getattr(_job, "holds_setup", False):
        after = manager_instances()
        _job.made = {cls: names - _job.before.get(cls, set()) for cls, names in after.items()}
        _job.holds_setup = False
        cotrain.SETUP.release()
    _end_profile()


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


def forget_runner_state(before: dict[type, set[str]], made: dict[type, set[str]] | None = None) -> None:
    """After a job: drop mmengine's named instances it made and give the base model back clean.

    The job's garbage (runner, optimizer, LoRA layers: reference cycles holding GPU memory) is
    collected here, before the next job. A full collection walks every object of the process (torch,
    transformers and XTuner make hundreds of thousands), so what survives a job is frozen
    (``gc.freeze``: the collector skips it from then on) and the next job's collection walks only
    what that job made. Frozen objects are never collected, so unless the
    job reused the kept base model and it stays kept, everything is unfrozen first: a model let go
    (another model came, or this one cannot be reused) goes with a full collection, cycles and all.
    With jobs at once, only the instances this job ``made`` during its set-up go, and nothing is frozen
    (the other jobs' live objects would never be collected).
    """
    import gc

    import torch

    if CACHE.shared:
        found = made or {}
    else:
        found = {cls: names - before.get(cls, set()) for cls, names in manager_instances().items()}
    for cls, names in found.items():
        for name in names:
            instance = cls._instance_dict.pop(name, None)
            if instance is None:
                continue
            for handler in list(getattr(instance, "handlers", [])):
                handler.close()
                instance.removeHandler(handler)
    kept = CACHE.job_ended()
    if CACHE.shared:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    if not (CACHE.reused and kept):
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the trial held goes back to the GPU's other trials
