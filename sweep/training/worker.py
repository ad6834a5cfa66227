"""The training process: one XTuner job (``--once``, also what torchrun starts) or, resident, many.

Imports and loading the weights dominate a short trial's time outside its steps (docs/benchmarks.md).
A resident worker pays them once: it reads ``protocol.Job`` lines from stdin, trains each here (the
base model stays loaded between jobs, ``sweep.training.base_model``), sends the job's output to the
job's log and writes ``protocol.Done``. A job that fails ends the worker: whatever state a crash left
(CUDA errors, half-built runners) never reaches the next trial, which gets a fresh process.
mmengine keeps every logger, message hub and visualizer a runner made by name; those are dropped
after each job.
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

from sweep.training import job as training_job
from sweep.training import patches
from sweep.training.base_model import CACHE
from sweep.trial import protocol


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def run_job(job: protocol.Job) -> int:
    """Train one job with stdout and stderr (the file descriptors, so C++ warnings too) in its log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        training_job.train_in_this_process(job.argv)
        rc = 0
    except SystemExit as exc:
        rc = _exit_code(exc)
    except BaseException:  # noqa: BLE001 - the job's failure is its exit code, the worker reports it
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)
    return rc


def _memory_held() -> dict[str, float]:
    """What the worker still holds after a job and its clean-up: a leak would grow it job after job."""
    with open("/proc/self/status", encoding="ascii") as f:
        rss = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    held = {"rss_mb": round(rss, 1), "gc_frozen": gc.get_freeze_count()}
    import torch

    if torch.cuda.is_available():
        held["gpu_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
    return held


def _exit_when_orphaned(interval: float = 0.5) -> None:
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


def serve(jobs) -> None:
    """Run jobs until stdin closes or one fails."""
    _exit_when_orphaned()
    patches.prepare_process()
    print(f"worker {os.getpid()}: ready", flush=True)
    for n, line in enumerate(jobs, start=1):
        if not line.strip():
            continue
        job = protocol.Job.from_line(line)
        started = time.monotonic()
        rc = run_job(job)
        done = protocol.Done(rc, job=n, model_reused=CACHE.reused, seconds=round(time.monotonic() - started, 2),
                             held=_memory_held())  # fmt: skip
        done.write(Path(job.done))
        print(f"worker {os.getpid()}: job {n} ({job.argv[0]}) exit code {rc}", flush=True)
        if rc != 0:
            return


def main(argv: list[str]) -> None:
    if argv[:1] == ["--once"]:
        training_job.train_in_this_process(argv[1:])
    else:
        serve(iter(sys.stdin.readline, ""))


if __name__ == "__main__":
    main(sys.argv[1:])
