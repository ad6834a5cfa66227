"""What Transformers and bitsandbytes import though neither side of a sweep uses it, kept out.

Importing Transformers' model code pulls in JAX where Flax is installed (``image_transforms``) and scikit-learn where
it is installed (``generation.candidate_generator``, for assisted generation's confidence threshold); importing
bitsandbytes wraps its CPU kernels in ``torch.compile``, which imports TorchInductor's compiler. They are seconds of a
training process's imports on a GPU machine (docs/benchmarks.md), paid by every training process, by the fork server
before its first fork and by the sweep's own checks, all on the way to a sweep's first trial. A sweep trains and
validates with PyTorch only and never generates with an assistant model.
``USE_TF``/``USE_FLAX`` are Transformers' own switches (a value the user set wins); scikit-learn has none, so
Transformers' flag for it is cleared when its ``import_utils`` is first executed; bitsandbytes' kernels are compiled
when first called (as ``torch.compile`` does anyway), not wrapped at import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

IMPORT_UTILS = "transformers.utils.import_utils"
BITSANDBYTES = "bitsandbytes"

#: Transformers' own switches, set where the user has not: ``skip_unused_frameworks`` in this process, and
#: ``sweep.trial.launcher.environment`` for every training process (so a fork server and its workers agree on them).
ENVIRONMENT = {"USE_TF": "0", "USE_FLAX": "0"}


def skip_unused_frameworks() -> None:
    """Before Transformers and bitsandbytes are imported: TensorFlow, Flax/JAX, scikit-learn and TorchInductor's
    compiler stay unimported by them."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    module = sys.modules.get(IMPORT_UTILS)
    if module is not None:  # imported already (a test process): too late for the imports, right for the flag
        _no_sklearn(module)
    wraps = {name: wrap for name, wrap in _WRAPS.items() if name not in sys.modules}
    if wraps and not any(isinstance(finder, _AroundImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AroundImport(wraps))


@contextlib.contextmanager
def _no_sklearn_after(module: types.ModuleType) -> Iterator[None]:
    yield
    _no_sklearn(module)


def _no_sklearn(module: types.ModuleType) -> None:
    module._sklearn_available = False


@contextlib.contextmanager
def _compile_on_first_call(module: types.ModuleType) -> Iterator[None]:
    """``torch.compile`` as bitsandbytes' import sees it: the real one, called when the function is first called.

    bitsandbytes' own wrapper falls back to the plain function where compiling fails, at either moment."""
    import torch

    real = torch.compile

    def compile_later(model: Callable | None = None, **kwargs: Any) -> Any:
        if model is None:
            return lambda fn: compile_later(fn, **kwargs)
        if not isinstance(model, types.FunctionType):  # a module or other callable: what torch.compile returns
            return real(model, **kwargs)
        compiled: list[Callable] = []

        @functools.wraps(model)
        def call(*args: Any, **kw: Any) -> Any:
            if not compiled:
                try:
                    compiled.append(real(model, **kwargs))
                except Exception:
                    compiled.append(model)  # as bitsandbytes keeps the plain function where compiling fails
                    raise
            return compiled[0](*args, **kw)

        return call

    torch.compile = compile_later
    try:
        yield
    finally:
        torch.compile = real


_WRAPS: dict[str, Callable[[types.ModuleType], contextlib.AbstractContextManager]] = {
    IMPORT_UTILS: _no_sklearn_after,
    BITSANDBYTES: _compile_on_first_call,
}


class _AroundImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it for each named module and wraps the module's execution in
    its context. A spec only looked up (``importlib.util.find_spec``, as Transformers checks what is installed) is
    wrapped too; the first execution uses the wrap up, and the finder leaves ``sys.meta_path`` when none is left."""

    def __init__(self, wraps: dict[str, Callable[[types.ModuleType], contextlib.AbstractContextManager]]) -> None:
        self.wraps = wraps

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.wraps:
            return None
        spec = self._found_by_the_others(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            wrap = self.wraps.pop(fullname, None)
            if not self.wraps and self in sys.meta_path:  # not while a finder loop reads it: this is an execution
                sys.meta_path.remove(self)
            if wrap is None:
                run(module)
                return
            with wrap(module):
                run(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec

    def _found_by_the_others(self, fullname, path, target):
        """What the import system would find without this finder: every other finder, in order (editable installs
        and zip imports included, not just the file system's ``PathFinder``)."""
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                return spec
        return None
