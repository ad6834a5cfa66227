"""Code that runs only inside XTuner's training process: the worker, the hook and its metrics, the patches.

Every training process imports this package before any of its modules, so this is where the frameworks they would
import for nothing are kept out (``sweep.lean_imports``)."""

from sweep.lean_imports import skip_unused_frameworks

skip_unused_frameworks()
