"""Start XTuner training in its own process, and run it there: the one place that knows XTuner's quirks.

Quirks handled here (see docs/xtuner-notes in the team's shared notes):
- ``xtuner train`` returns exit code 0 even when training raised, so we run ``xtuner/tools/train.py``'s
  ``main`` through ``python -m sweep.worker`` (or torchrun on it) and read the real exit code.
- XTuner 0.2.0 calls ``torch.cpu.is_bf16_supported()``, which current torch lacks: defined (False)
  in the training process before the model is built.
- XTuner's configs warm up for ``warmup_ratio * max_epochs`` epochs; on small data that rounds to
  0 iterations (mmengine refuses: "end should be larger than begin") or to 1, where LinearLR never
  ramps and the learning rate stays at ``start_factor * lr`` (1e-5 of it) for the whole run. Such a
  range is widened to 2 iterations, the shortest warm-up that reaches the full rate.
- Resuming a checkpoint this tool wrote needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` on torch >= 2.6.
- With several GPUs the entry point picks a random master port; we pass our own so parallel trials
  cannot collide.
- A resident worker (``sweep.worker``) trains many trials in one process. XTuner builds the base model
  in ``SupervisedFinetune.build_llm_from_cfg`` and injects LoRA into it in place; between trials the
  LoRA layers, gradient checkpointing and the input-grad hooks are taken off again, so the next
  trial starts from the same model a fresh process would load. Loading never draws from the random
  generators (it runs under ``fork_rng``), so a trial's LoRA initialisation is the same either way.
  mmengine keeps every logger, message hub and visualizer a runner made by name (the name is the
  config file's name and the second it started): those are dropped after each job.
- XTuner's dataset pipeline runs ``datasets``' ``map(num_proc=...)``, which rebinds ``os.environ``
  to a copy; where the sweep's own process builds datasets (tokenizing once, scoring) the original
  object is put back (``same_os_environ``).
- mmengine writes the config out through yapf several times a trial, and its iteration-based loop
  sleeps 2 s at every epoch boundary: both skipped in training processes (no effect on the math).
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sweep import atomic

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


def train_args(launch: Launch) -> list[str]:
    """``xtuner train``'s arguments for this launch."""
    args = [str(launch.config), "--work-dir", str(launch.work_dir)]
    if launch.n_gpus > 1:
        return [*args, "--launcher", "pytorch", "--deepspeed", launch.deepspeed or "deepspeed_zero2"]
    return [*args, "--deepspeed", launch.deepspeed] if launch.deepspeed else args


def command(launch: Launch) -> list[str]:
    """The argv that trains once: the running interpreter, or torchrun when the trial spans GPUs."""
    if launch.n_gpus > 1:
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={launch.n_gpus}", f"--master_port={free_port()}",
            "-m", "sweep.worker", "--once", *train_args(launch),
        ]  # fmt: skip
    return [sys.executable, "-m", "sweep.worker", "--once", *train_args(launch)]


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


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a process's group (it leads one), then SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
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


@contextmanager
def same_os_environ() -> Iterator[None]:
    """Keep ``os.environ`` the object it was, with the contents ``datasets`` leaves.

    ``Dataset.map(num_proc=...)`` (datasets 5.0.1, ``arrow_dataset.py``) rebinds ``os.environ`` to a
    deep copy it took before the map. In the sweep's own process (tokenizing once, scoring the
    test split) whatever held the original mapping then changed a stale one: pytest's
    ``monkeypatch`` "restored" PYTHONPATH there, and the next test's trials still ran a previous
    test's injected training hook (a CI failure).
    """
    environ = os.environ
    try:
        yield
    finally:
        if os.environ is not environ:
            left = dict(os.environ)
            os.environ = environ  # noqa: B003 (the original object back; its contents are synced below)
            for key in [k for k in environ if k not in left]:
                del environ[key]
            for key, value in left.items():
                if environ.get(key) != value:
                    environ[key] = value


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

    tmp = atomic.temp_dir_beside(out)  # unique: two merges to one place never remove each other's
    cmd = [
        sys.executable, "-m", "xtuner.tools.model_converters.merge", str(base_model), str(adapter), str(tmp),
        "--safe-serialization", "--device", "cuda" if torch.cuda.is_available() else "cpu",
    ]  # fmt: skip
    env = {**environment(Launch(config=Path(), work_dir=Path(), log=Path())), CONTROL_ENV: "0"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    except BaseException:  # Ctrl-C while it runs: leave no half model behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"XTuner's merge exited with code {proc.returncode}:\n{tail}")
    if not atomic.publish_dir(tmp, out):
        raise FileExistsError(f"{out}: was filled by another writer while the merge ran; the merged model was not kept")


# -- inside the training process (sweep.worker) ------------------------------------------------

_PREPARED = False
_BASE: dict[str, Any] = {}  # the base model this process built, by its XTuner llm config
_REUSED = False  # whether the current job's base model was already loaded


def prepare_process() -> None:
    """Once per training process, before the first job: the quirk fixes and the base-model cache."""
    global _PREPARED
    if _PREPARED:
        return
    import torch

    if not hasattr(torch.cpu, "is_bf16_supported"):
        torch.cpu.is_bf16_supported = lambda *a, **k: False  # XTuner 0.2.0 calls it on every device
    _widen_short_schedules()
    _plain_config_text()
    _no_pause_between_epochs()
    _keep_base_model()
    from xtuner.tools import train  # noqa: F401 - imported once, for every job of a resident worker

    _PREPARED = True


def _plain_config_text() -> None:
    """Configs made in this process skip yapf when they are turned back into text.

    mmengine runs the whole config through yapf every time it writes it out: the runner's config
    dump, the visualizer's copy, the environment log, and every checkpoint's metadata: 8 times in a
    16-iteration trial, 0.76-0.89 s each for the demo's config on a 2-core machine
    (``benchmarks/config_text.py`` measures it). The unformatted text is the same config
    (``format_python_code=False``, an mmengine option): it loads back to equal values.
    """
    import functools

    from mmengine.config import Config

    original = Config.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        if len(args) >= 5:  # cfg_dict, cfg_text, filename, env_variables, format_python_code
            args = (*args[:4], False, *args[5:])
        else:
            kwargs["format_python_code"] = False
        original(self, *args, **kwargs)

    Config.__init__ = init


def _no_pause_between_epochs() -> None:
    """No 2 s sleep at an epoch boundary of a data loader that has no worker processes.

    mmengine's iteration-based loop (XTuner's ``TrainLoop`` is one) sleeps 2 s whenever its data
    loader starts a new epoch, "to prevent a possible deadlock" of the loader's worker processes. A
    sweep's loaders load in the training process (``num_workers`` 0), so there is nothing to wait
    for, and a trial of 8 epochs waited 7 x 2 s. The sleep is skipped only for such loaders; the
    sampler's epoch and the data order are untouched.
    """
    import functools
    import types

    from mmengine.runner import loops

    iterator = loops._InfiniteDataloaderIterator
    original = iterator.__next__
    state = threading.local()

    class _Time(types.ModuleType):  # what mmengine's loops module calls ``time``
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def sleep(self, seconds: float) -> None:
            if not getattr(state, "loader_in_process", False):
                time.sleep(seconds)

    @functools.wraps(original)
    def __next__(self):
        state.loader_in_process = getattr(self._dataloader, "num_workers", 1) == 0
        try:
            return original(self)
        finally:
            state.loader_in_process = False

    loops.time = _Time("time")
    iterator.__next__ = __next__


def _keep_base_model() -> None:
    """Build a trial's base model once per process; later jobs with the same llm config reuse it."""
    import torch
    from xtuner.model.sft import SupervisedFinetune

    original = SupervisedFinetune.build_llm_from_cfg

    def build_llm_from_cfg(self, llm_cfg, use_varlen_attn, max_position_embeddings):
        key = repr((llm_cfg, use_varlen_attn, max_position_embeddings))
        global _REUSED
        if key in _BASE:
            _REUSED = True
            return _BASE[key]
        _BASE.clear()  # another model: the old one goes (one base model per worker)
        with torch.random.fork_rng():  # loading draws no random numbers: LoRA's init is the same either way
            llm = original(self, llm_cfg, use_varlen_attn, max_position_embeddings)
        _BASE[key] = llm
        return llm

    SupervisedFinetune.build_llm_from_cfg = build_llm_from_cfg


def _strip_training_state(llm: Any) -> bool:
    """Take off what a trial added to the shared base model: LoRA layers, checkpointing, grad hooks.

    Returns whether the base model can serve another trial: not when no LoRA layers were found (the
    base weights were trained) or when the LoRA initialisation changed the base weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = [(n, m) for n, m in llm.named_modules() if n and isinstance(m, BaseTunerLayer)]
    configs = getattr(llm, "peft_config", {}) or {}
    if any(getattr(c, "init_lora_weights", True) not in (True, False, "gaussian") for c in configs.values()):
        return False  # PiSSA, OLoRA, LoftQ, ...: the initialisation rewrote the base weights themselves
    for name, module in adapters:
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent) if parent else llm, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded", "_require_grads_hook"):
        if attr in vars(llm):
            delattr(llm, attr)
    if getattr(llm, "is_gradient_checkpointing", False):
        llm.gradient_checkpointing_disable()
    hooks = llm.get_input_embeddings()._forward_hooks
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
            del hooks[key]
    llm.requires_grad_(False)
    llm.zero_grad(set_to_none=True)
    return bool(adapters)


def _manager_instances() -> dict[type, set[str]]:
    from mmengine.utils import ManagerMixin

    found: dict[type, set[str]] = {}
    todo = list(ManagerMixin.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "_instance_dict" in vars(cls):
            found[cls] = set(cls._instance_dict)
    return found


def train_in_this_process(argv: list[str]) -> None:
    """``xtuner train`` with these arguments, here; a resident worker calls it once per trial."""
    prepare_process()
    import torch
    from xtuner.tools import train

    global _REUSED
    _REUSED = False
    before = _manager_instances()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the end event reports this job's peak, not the worker's
    sys.argv = ["xtuner-train", *argv]
    try:
        train.main()
    finally:
        _forget_runner_state(before)


def _forget_runner_state(before: dict[type, set[str]]) -> None:
    """After a job: drop mmengine's named instances it made and give the base model back clean.

    The job's garbage (runner, optimizer, LoRA layers: reference cycles holding GPU memory) is
    collected here, before the next job. A full collection walks every object of the process, about
    700,000 once torch, transformers and XTuner are imported: 0.33 s per job on a 2-core CPU. So what
    survives a job is frozen (``gc.freeze``: the collector skips it from then on) and the next job's
    collection walks only what that job made: 0.003 s. Frozen objects are never collected, so unless the
    job reused the kept base model and it stays kept, everything is unfrozen first: a model let go
    (another model came, or this one cannot be reused) goes with a full collection, cycles and all.
    """
    import gc

    import torch

    for cls, names in _manager_instances().items():
        for name in names - before.get(cls, set()):
            instance = cls._instance_dict.pop(name)
            for handler in list(getattr(instance, "handlers", [])):
                handler.close()
                instance.removeHandler(handler)
    try:
        for llm in list(_BASE.values()):
            if not _strip_training_state(llm):
                _BASE.clear()  # no LoRA in it: the job trained the base weights themselves
    except Exception:  # noqa: BLE001 - a model that cannot be cleaned is not reused
        _BASE.clear()
    if not (_REUSED and _BASE):
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the trial held goes back to the GPU's other trials


def model_was_reused() -> bool:
    """Whether the last job's base model came from this process's cache."""
    return _REUSED
