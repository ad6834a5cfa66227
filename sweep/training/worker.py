"""The training process: one XTuner job (``--once``, also what torchrun starts) or, resident, many.

Imports and loading the weights dominate a short trial's time outside its steps (docs/benchmarks.md).
A resident worker pays them once: it reads ``protocol.Job`` lines from stdin, trains each here (the
base model stays loaded between jobs, ``sweep.training.base_model``), sends the job's output to the
job's log and writes ``protocol.Done``. A job that fails ends the worker: whatever state a crash left
(CUDA errors, half-built runners) never reaches the next trial, which gets a fresh process.
mmengine keeps every logger, message hub and visualizer a runner made by name; those are dropped
after each job.

With ``protocol.JOBS_AT_ONCE_ENV`` above 1, up to that many jobs train at once, each in its own thread,
over one shared base model, their steps joined (``sweep.training.cotrain``). A job's Python output goes
to its own log through ``sys.stdout``/``sys.stderr`` (file descriptors are the process's: C output stays
in the worker's log); mmengine's "current" instances are per thread. A failed job ends the worker only
once the jobs beside it have finished, and no job is started after it.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from sweep.training import cotrain, patches
from sweep.training import job as training_job
from sweep.training.base_model import CACHE
from sweep.trial import protocol

#: The fork server's pid, in a worker forked from it (``sweep.training.forkserver``); 0 in one started on its own.
FORKED_FROM = 0


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def _train(job: protocol.Job) -> int:
    """The job's exit code: 0, what it exited with, or 1 with its traceback printed (the worker reports it)."""
    try:
        training_job.train_in_this_process(job.argv)
        return 0
    except SystemExit as exc:
        return _exit_code(exc)
    except BaseException:  # noqa: BLE001 - the job's failure is its exit code
        traceback.print_exc()
        return 1


def run_job(job: protocol.Job) -> int:
    """Train one job with stdout and stderr (the file descriptors, so C++ warnings too) in its log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        rc = _train(job)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)
    return rc


class _ThreadOutput:
    """A ``sys.stdout``/``sys.stderr`` that writes to the log of the job the calling thread trains."""

    def __init__(self, fallback: Any, local: threading.local) -> None:
        self._fallback, self._local = fallback, local

    def _target(self) -> Any:
        return getattr(self._local, "log", None) or self._fallback

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)


_OUTPUT = threading.local()


def run_job_in_thread(job: protocol.Job) -> int:
    """Train one job (one of several at once) with this thread's Python output in the job's log."""
    with open(job.log, "a", encoding="utf-8", buffering=1) as log:
        _OUTPUT.log = log
        try:
            return _train(job)
        finally:
            _OUTPUT.log = None


def _current_instance_per_thread() -> None:
    """mmengine's ``get_current_instance`` (the latest logger, message hub, visualizer) answers per thread.

    Hooks and loggers ask for "the current" message hub or logger; with runners in several threads the latest
    one made would be another trial's.
    """
    from mmengine.utils import ManagerMixin

    get_instance = ManagerMixin.get_instance.__func__
    get_current = ManagerMixin.get_current_instance.__func__
    made = threading.local()

    def get_instance_here(cls, name: str, **kwargs: Any):
        new = name not in cls._instance_dict
        instance = get_instance(cls, name, **kwargs)
        if new:
            mine = getattr(made, "names", None)
            if mine is None:
                mine = made.names = {}
            mine[cls] = name
        return instance

    def get_current_here(cls):
        name = (getattr(made, "names", None) or {}).get(cls)
        if name is not None and name in cls._instance_dict:
            return cls._instance_dict[name]
        return get_current(cls)

    ManagerMixin.get_instance = classmethod(get_instance_here)
    ManagerMixin.get_current_instance = classmethod(get_current_here)


def _memory_held() -> dict[str, float]:
    """What the worker still holds after a job and its clean-up: a leak would grow it job after job."""
    with open("/proc/self/status", encoding="ascii") as f:
        rss = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    held = {"rss_mb": round(rss, 1), "gc_frozen": gc.get_freeze_count()}
    import torch

    if torch.cuda.is_available():
        held["gpu_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
    return held


def exit_when_orphaned(interval: float = 0.5) -> None:
    """End this worker's process group when the sweep process is gone, even mid-job.

    A resident worker outlives the thread that started it, so the parent-death signal (which the
    kernel ties to that thread) cannot be used; a re-parented worker is an orphan.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _finish(job: protocol.Job, n: int, rc: int, started: float) -> None:
    done = protocol.Done(rc, job=n, model_reused=CACHE.reused, seconds=round(time.monotonic() - started, 2),
                         held=_memory_held())  # fmt: skip
    done.write(Path(job.done))
    print(f"worker {os.getpid()}: job {n} ({job.argv[0]}) exit code {rc}", flush=True)


def serve(jobs) -> None:
    """Run jobs until stdin closes or one fails."""
    exit_when_orphaned()
    patches.prepare_process()
    at_once = int(os.environ.get(protocol.JOBS_AT_ONCE_ENV, "1") or 1)
    # the clock time: the sweep's benchmark places it on its timeline (when the imports stop delaying a first trial)
    import torch

    forked = f" (forked from {FORKED_FROM})" if FORKED_FROM else ""
    print(f"worker {os.getpid()}: ready at {time.time():.3f}{forked}, GPUs {os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}"
          f", {torch.get_num_threads()} CPU threads" + (f", {at_once} jobs at once" if at_once > 1 else ""),
          flush=True)  # fmt: skip
    if at_once > 1:
        serve_at_once(jobs, at_once)
        return
    for n, line in enumerate(jobs, start=1):
        if not line.strip():
            continue
        job = protocol.Job.from_line(line)
        started = time.monotonic()
        rc = run_job(job)
        _finish(job, n, rc, started)
        if rc != 0:
            return


def serve_at_once(jobs, at_once: int) -> None:
    """Each job in its own thread, up to ``at_once`` of them; after a failure, finish the running ones and answer
    every later job ``protocol.NOT_STARTED`` (the sweep ends this worker once its running jobs are done)."""
    sys.stdout = _ThreadOutput(sys.stdout, _OUTPUT)
    sys.stderr = _ThreadOutput(sys.stderr, _OUTPUT)
    _current_instance_per_thread()
    cotrain.guard_data_loaders()
    room = threading.Semaphore(at_once)
    failed = threading.Event()
    running: list[threading.Thread] = []

    def train(job: protocol.Job, n: int) -> None:
        started = time.monotonic()
        try:
            rc = run_job_in_thread(job)
            if rc != 0:
                failed.set()
            _finish(job, n, rc, started)
        finally:
            room.release()

    for n, line in enumerate(jobs, start=1):
        if not line.strip():
            continue
        room.acquire()
        if failed.is_set():  # sent before the sweep saw the failure: answered, not started, so it goes elsewhere
            room.release()
            protocol.Done(protocol.NOT_STARTED, job=n).write(Path(protocol.Job.from_line(line).done))
            continue
        thread = threading.Thread(target=train, args=(protocol.Job.from_line(line), n), name=f"job-{n}", daemon=True)
        thread.start()
        running.append(thread)
    for thread in running:
        thread.join()


def job_lines():
    """The job lines on stdin, read without a lock a forked child could inherit held.

    While jobs train in threads, the main thread waits in a read; a job that forks then (XTuner's dataset
    ``map``/``filter`` with ``num_proc``) copies the stdin reader's lock, held, into the child, whose start-up
    closes stdin and waits on it forever. An unbuffered read holds no such lock, and the children get /dev/null.
    """
    raw = os.fdopen(os.dup(0), "rb", buffering=0)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - the process's stdin from now on
    for line in iter(raw.readline, b""):
        yield line.decode("utf-8")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--once"]:
        training_job.train_in_this_process(argv[1:])
    else:
        serve(job_lines())


if __name__ == "__main__":
    main(sys.argv[1:])
