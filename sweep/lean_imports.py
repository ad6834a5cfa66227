"""Frameworks Transformers would import though neither side of a sweep uses them, kept out.

Importing Transformers' model code pulls in JAX where Flax is installed (``image_transforms``) and scikit-learn where
it is installed (``generation.candidate_generator``, for assisted generation's confidence threshold). On an H100
machine the two were about 4 of a training process's 24 s of imports (``python -X importtime``, docs/benchmarks.md),
paid by every training process, by the fork server before its first fork and by the sweep's own checks, all on the
way to a sweep's first trial. A sweep trains and validates with PyTorch only and never generates with an assistant
model. ``USE_TF``/``USE_FLAX`` are Transformers' own switches (a value the user set wins); scikit-learn has none, so
Transformers' flag for it is cleared when its ``import_utils`` is first executed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

IMPORT_UTILS = "transformers.utils.import_utils"


def skip_unused_frameworks() -> None:
    """Before Transformers is imported: TensorFlow, Flax/JAX and scikit-learn stay unimported by it."""
    os.environ.setdefault("USE_TF", "0")
    os.environ.setdefault("USE_FLAX", "0")
    module = sys.modules.get(IMPORT_UTILS)
    if module is not None:  # imported already (a test process): too late for the imports, right for the flag
        _no_sklearn(module)
    elif not any(isinstance(finder, _ClearSklearnFlag) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ClearSklearnFlag())


def _no_sklearn(module: ModuleType) -> None:
    module._sklearn_available = False


class _ClearSklearnFlag(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of Transformers' ``import_utils`` to clear the flag right after the
    module runs, before anything reads it, then steps out of ``sys.meta_path``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != IMPORT_UTILS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _no_sklearn(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
