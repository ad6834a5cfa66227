"""Start one training process for a trial and watch it to its real exit code (the sweep's side).

``xtuner train`` exits 0 even when training raised, so a trial runs XTuner's ``train.main`` through
``python -m sweep.training.worker`` (or torchrun on it) and reads that process's own exit code. The
process leads its own process group and gets SIGTERM when the sweep dies, so stopping a trial stops
everything it started. Parallel multi-GPU trials each get their own master port.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sweep import lean_imports
from sweep.trial import protocol

#: Set (by a signal handler) to stop every running trial of this process and start no new one.
STOP = threading.Event()

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")


class Interrupted(KeyboardInterrupt):
    """The sweep was asked to stop (SIGINT/SIGTERM) while this trial trained."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the sweep process dies, even by SIGKILL."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Launch:
    """One training process to start: its config, work dir, log file and resources."""

    config: Path
    work_dir: Path
    log: Path
    n_gpus: int = 0
    gpu_ids: list[int] = field(default_factory=list)
    threads: int | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(launch: Launch) -> list[str]:
    """``xtuner train``'s arguments for this launch."""
    args = [str(launch.config), "--work-dir", str(launch.work_dir)]
    if launch.n_gpus > 1:
        return [*args, "--launcher", "pytorch", "--deepspeed", "deepspeed_zero2"]
    return args


def command(launch: Launch) -> list[str]:
    """The argv that trains once: the running interpreter, or torchrun when the trial spans GPUs."""
    if launch.n_gpus > 1:
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={launch.n_gpus}", f"--master_port={free_port()}",
            "-m", protocol.WORKER_MODULE, "--once", *train_args(launch),
        ]  # fmt: skip
    return [sys.executable, "-m", protocol.WORKER_MODULE, "--once", *train_args(launch)]


def environment(launch: Launch) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            protocol.CONTROL_ENV: "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
        }
    )
    for key, value in lean_imports.ENVIRONMENT.items():  # a user's own value wins
        env.setdefault(key, value)
    if launch.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in launch.gpu_ids)
        # trials share a GPU by their planned peaks, which are the allocator's reserve; without expandable segments
        # it held well over what the trial had allocated (docs/benchmarks.md, 2026-12-06), memory no other trial
        # could use. A user's own allocator settings win.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if launch.threads:
        env["OMP_NUM_THREADS"] = str(launch.threads)
        env["MKL_NUM_THREADS"] = str(launch.threads)
    return env


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a process's group (it leads one), then SIGKILL what is left after ``grace`` seconds."""
    stop_groups([proc], grace)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the group ``proc`` leads; a forked worker (``sweep.trial.forked``) knows its own group, or has none yet."""
    own = getattr(proc, "signal_group", None)
    if own is not None:
        own(sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_groups(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """``stop_group`` for several processes at once: each signal goes to all of them before any is waited for, so
    ending n workers takes one grace period and one CUDA teardown, not n of them one after another."""
    left = [proc for proc in procs if proc.returncode is None]  # a reaped one's pid may lead someone else's group now
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in left:
            if proc.poll() is None:
                signal_group(proc, sig)
        deadline = time.monotonic() + grace
        for proc in left:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        left = [proc for proc in left if proc.poll() is None]
        if not left:
            return
    for proc in left:
        proc.wait()


class Running:
    """A started training process; ``stop`` ends it and everything it started."""

    def __init__(self, launch: Launch) -> None:
        launch.log.parent.mkdir(parents=True, exist_ok=True)
        self._log = launch.log.open("ab")
        self.proc = subprocess.Popen(
            command(launch),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment(launch),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float = 10.0) -> int:
        stop_group(self.proc, grace)
        return self.wait()

    def wait(self) -> int:
        rc = self.proc.wait()
        self._log.close()
        return rc


class Started(Protocol):
    """A training job under way: a fresh process (``Running``) or a job of a resident worker."""

    def poll(self) -> int | None: ...
    def stop(self, grace: float = 10.0) -> int: ...
    def wait(self) -> int: ...


def run(
    launch: Launch,
    on_poll: Callable[[], None],
    interval: float = 0.2,
    start: Callable[[Launch], Started] = Running,
) -> int:
    """Train to the end, calling ``on_poll`` meanwhile; returns the real exit code.

    Whatever ends this call early (an exception from ``on_poll``, Ctrl-C) also ends the training
    process group: a trial never outlives the code that watches it.
    """
    if STOP.is_set():
        raise Interrupted("the sweep is stopping; trial not started")
    running = start(launch)
    try:
        while running.poll() is None:
            if STOP.is_set():
                raise Interrupted("the sweep was asked to stop")
            on_poll()
            time.sleep(interval)
        on_poll()
        return running.wait()
    except BaseException:
        running.stop()
        raise


def log_tail(path: Path, lines: int = 80) -> str:
    """The end of a training log, from its first traceback among the last ``lines`` lines (chained
    exceptions included): what a failed trial shows as its error."""
    try:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return ""
    start = next((i for i, line in enumerate(tail) if line.startswith("Traceback (most recent call last)")), None)
    return "\n".join(tail[start:] if start is not None else tail[-30:])


def is_oom(rc: int, tail: str) -> bool:
    """CUDA out of memory in the log, or the kernel's OOM killer (SIGKILL, which nothing else here sends)."""
    return rc in (-signal.SIGKILL, 128 + signal.SIGKILL) or any(m in tail for m in OOM_MARKERS)
