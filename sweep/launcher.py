"""Start XTuner training in its own process, and run it there: the one place that knows XTuner's quirks.

Quirks handled here (see docs/xtuner-notes in the team's shared notes):
- ``xtuner train`` returns exit code 0 even when training raised, so we run ``xtuner/tools/train.py``'s
  ``main`` through ``python -m sweep.launcher`` (or torchrun on it) and read the real exit code.
- XTuner 0.2.0 calls ``torch.cpu.is_bf16_supported()``, which current torch lacks: defined (False)
  in the training process before the model is built.
- XTuner's configs warm up for ``warmup_ratio * max_epochs`` epochs; on small data that rounds to
  0 iterations (mmengine refuses: "end should be larger than begin") or to 1, where LinearLR never
  ramps and the learning rate stays at ``start_factor * lr`` (1e-5 of it) for the whole run. Such a
  range is widened to 2 iterations, the shortest warm-up that reaches the full rate.
- Resuming a checkpoint this tool wrote needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` on torch >= 2.6.
- With several GPUs the entry point picks a random master port; we pass our own so parallel trials
  cannot collide.
The training process runs in its own process group, so stopping a trial stops its workers too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Set for the training process: the sweep hook then waits for a verdict after each validation point.
CONTROL_ENV = "XTUNER_SWEEP_CONTROL"

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
    deepspeed: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launch: Launch) -> list[str]:
    """The argv that trains: the running interpreter, or torchrun when the trial spans GPUs."""
    args = [str(launch.config), "--work-dir", str(launch.work_dir)]
    if launch.n_gpus > 1:
        args += ["--launcher", "pytorch", "--deepspeed", launch.deepspeed or "deepspeed_zero2"]
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={launch.n_gpus}", f"--master_port={free_port()}",
            "-m", "sweep.launcher", *args,
        ]  # fmt: skip
    if launch.deepspeed:
        args += ["--deepspeed", launch.deepspeed]
    return [sys.executable, "-m", "sweep.launcher", *args]


def environment(launch: Launch) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            CONTROL_ENV: "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
        }
    )
    if launch.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in launch.gpu_ids)
    if launch.threads:
        env["OMP_NUM_THREADS"] = str(launch.threads)
        env["MKL_NUM_THREADS"] = str(launch.threads)
    return env


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
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return self.wait()

    def wait(self) -> int:
        rc = self.proc.wait()
        self._log.close()
        return rc


def run(launch: Launch, on_poll: Callable[[], None], interval: float = 0.2) -> int:
    """Train to the end, calling ``on_poll`` meanwhile; returns the real exit code.

    Whatever ends this call early (an exception from ``on_poll``, Ctrl-C) also ends the training
    process group: a trial never outlives the code that watches it.
    """
    if STOP.is_set():
        raise Interrupted("the sweep is stopping; trial not started")
    running = Running(launch)
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


def _widen_short_schedules() -> None:
    """Give every parameter scheduler at least 2 iterations (see the module docstring)."""
    import functools
    import inspect

    from mmengine.optim.scheduler import param_scheduler as ps

    for cls in (ps._ParamScheduler, ps.LinearParamScheduler):
        original = cls.__init__
        signature = inspect.signature(original)

        @functools.wraps(original)
        def init(self, *args, __original=original, __signature=signature, **kwargs):
            bound = __signature.bind(self, *args, **kwargs)
            begin = bound.arguments.get("begin", 0)
            end = bound.arguments.get("end", ps.INF)
            if end - begin < 2:
                bound.arguments["end"] = begin + 2
            __original(*bound.args, **bound.kwargs)

        cls.__init__ = init


def merge_adapter(base_model: Path, adapter: Path, out: Path) -> None:
    """``xtuner convert merge``: the adapter folded into the base weights, saved as a Hugging Face model.

    Run as XTuner's own module in a child process (it parses sys.argv and may load the model onto a
    GPU); the merged model is written next to ``out`` and renamed into place, so a failure never
    leaves half a model where the user asked for one.
    """
    import torch

    tmp = out.with_name(out.name + ".tmp-merge")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "xtuner.tools.model_converters.merge", str(base_model), str(adapter), str(tmp),
        "--safe-serialization", "--device", "cuda" if torch.cuda.is_available() else "cpu",
    ]  # fmt: skip
    env = {**environment(Launch(config=Path(), work_dir=Path(), log=Path())), CONTROL_ENV: "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"XTuner's merge exited with code {proc.returncode}:\n{tail}")
    tmp.rename(out)


def _train_in_this_process(argv: list[str]) -> None:
    import torch

    if not hasattr(torch.cpu, "is_bf16_supported"):
        torch.cpu.is_bf16_supported = lambda *a, **k: False  # XTuner 0.2.0 calls it on every device
    _widen_short_schedules()
    from xtuner.tools import train

    sys.argv = ["xtuner-train", *argv]
    train.main()


if __name__ == "__main__":
    _train_in_this_process(sys.argv[1:])
