"""XTuner 0.2.0's and mmengine's quirks, fixed once per training process before the first job.

Each fix leaves a trial's math as stock XTuner computes it:
- XTuner calls ``torch.cpu.is_bf16_supported()``, which current torch lacks: defined (False).
- Warm-up ranges that round to 0 or 1 iterations are widened to 2 (``_widen_short_schedules``).
- Config text skips yapf, the 2 s pause at epoch boundaries is skipped for in-process loaders, and
  ``model.train()`` walks the model only when a module's mode may have changed: all three cost time and
  change no value.
- LLaVA's ``predict`` also returns the labels of the sequence it ran (``sweep.training.llava``).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from sweep.training import base_model, llava
from sweep.xtuner import maps

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

_PREPARED = False


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
    _train_mode_walked_on_change()
    _mmcv_probed_once()
    maps.install()
    llava.predict_with_labels()
    base_model.CACHE.install()
    from xtuner.tools import train  # noqa: F401 - imported once, for every job of a resident worker

    _PREPARED = True


def _plain_config_text() -> None:
    """Configs made in this process skip yapf when they are turned back into text.

    mmengine runs the whole config through yapf every time it writes it out (the runner's config
    dump, the visualizer's copy, the environment log, every checkpoint's metadata): most of a short
    trial's setup on a CPU (``benchmarks/config_text.py`` measures it). The unformatted text is the
    same config (``format_python_code=False``, an mmengine option): it loads back to equal values.
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


def _mmcv_probed_once() -> None:
    """mmengine asks whether mmcv-full is installed once per module of the model when it wraps it (2,335 times for a
    Qwen2-1.5B with LoRA), each a failed import that searches the whole ``sys.path``: a fixed part of every job's
    set-up (docs/benchmarks.md). The answer cannot change within a process, so it is asked once."""
    import functools

    import mmengine.model.utils as model_utils
    import mmengine.optim.optimizer.default_constructor as constructor
    import mmengine.utils.dl_utils as dl_utils
    from mmengine.utils.dl_utils import misc

    cached = functools.cache(misc.mmcv_full_available)
    for module in (misc, dl_utils, model_utils, constructor):
        module.mmcv_full_available = cached


def _no_pause_between_epochs() -> None:
    """No 2 s sleep at an epoch boundary of a data loader that has no worker processes.

    mmengine's iteration-based loop (XTuner's ``TrainLoop`` is one) sleeps 2 s whenever its data
    loader starts a new epoch, "to prevent a possible deadlock" of the loader's worker processes. A
    sweep's loaders load in the training process (``num_workers`` 0), so there is nothing to wait
    for, and a trial of N epochs waited N - 1 times. The sleep is skipped only for such loaders; the
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


def _train_mode_walked_on_change() -> RemovableHandle | None:
    """``module.train()`` skips its walk where no module can have left training mode since its own last walk.

    mmengine's iteration-based loop calls ``runner.model.train()`` before every iteration. On a LoRA model of
    the Qwen2-1.5B shape that walk visits thousands of modules each step, outside the step, where the GPU of a
    trial alone waits for it (docs/benchmarks.md measures it). A token stands for "nothing left training mode":
    every ``eval()``/``train(False)`` replaces it, and so does attaching a module that is in eval mode (its own
    flag is read, not its children's; not every attachment: Qwen2's forward slices its ModuleList of layers,
    which attaches each layer to a new list, every step).
    A ``train(True)`` walk records the token it began under, and is skipped while that token is still current,
    so every flag below it is still True. ``eval()`` always walks. What the skip also skips: a submodule's own
    ``train()`` override (PEFT's DoRA clears an eval-mode cache there: unaffected), and ``module.training``
    assigned directly, which nothing in a trial's stack does. Tokens are compared by identity: a copied or
    unpickled module never matches, and concurrent jobs' threads can only make a walk happen, never skip one.
    Returns the registration hook's handle (None where the patch was already in place).
    """
    import torch
    from torch.nn.modules import module as torch_module

    original = torch.nn.Module.train
    if getattr(original, "_sweep_walk_on_change", False):
        return None
    token = [object()]

    def changed() -> None:
        token[0] = object()

    def attached(parent: torch.nn.Module, name: str, child: torch.nn.Module | None) -> None:
        if child is not None and not child.training:
            changed()

    def train(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
        if mode is not True:
            changed()
            return original(self, mode)
        began = token[0]
        if self.__dict__.get("_sweep_walked") is began:
            return self
        result = original(self, mode)
        self.__dict__["_sweep_walked"] = began  # not through Module.__setattr__: a plain attribute
        return result

    train._sweep_walk_on_change = True  # type: ignore[attr-defined]
    handle = torch_module.register_module_module_registration_hook(attached)
    torch.nn.Module.train = train
    return handle


def _widen_short_schedules() -> None:
    """Give every parameter scheduler at least 2 iterations.

    XTuner's configs warm up for ``warmup_ratio * max_epochs`` epochs; on small data that rounds to 0
    iterations (mmengine refuses: "end should be larger than begin") or to 1, where LinearLR never ramps
    and the learning rate stays at ``start_factor * lr`` for the whole run. 2 is the shortest warm-up
    that reaches the full rate.
    """
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
