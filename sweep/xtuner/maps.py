"""Two habits of ``datasets``' ``Dataset.map`` (5.0.1), undone: a pool for one process, and a rebound ``os.environ``.

XTuner's pipeline (``process_hf_dataset``: template, filter, shuffle, pack, lengths) maps rows with
``num_proc=map_num_proc``: 1 for every validation set, and for a trial's training rows where the base config says
so or the file has fewer than 4,000 rows (``sweep.xtuner.render``). datasets 5.0.1 starts a process pool (and a
manager process) for every map whose ``num_proc`` is 1, where it ran the map in the calling process before:
about 16 maps a trial, two forks each, of a training process that holds the base model; on the CPU most of a
warm trial's set-up (docs/benchmarks.md). One shard is one shard: the same function over the same rows in the same
order, the same fingerprints and cache file names (datasets names both by the shard count, 1 either way), so
``num_proc=1`` is passed on as ``None`` (``install``, in every process that builds datasets).

Where the sweep's own process builds datasets (tokenizing once, scoring the test split), ``built_here`` also keeps
``os.environ`` the object it was.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_INSTALLED = "_sweep_one_process_maps"


def install() -> None:
    """Run ``Dataset.map`` (and ``filter``, ``flatten_indices``, which call it) of ``num_proc=1`` in this process."""
    from datasets import Dataset

    original = Dataset.map
    if getattr(original, _INSTALLED, False):
        return

    @functools.wraps(original)
    def map(self, *args: Any, **kwargs: Any) -> Any:  # noqa: A001 - Dataset.map's own name
        if kwargs.get("num_proc") == 1:
            kwargs["num_proc"] = None
        return original(self, *args, **kwargs)

    setattr(map, _INSTALLED, True)
    Dataset.map = map


@contextmanager
def built_here() -> Iterator[None]:
    """Datasets built in this process: maps of one process run here (``install``), and ``os.environ`` stays the
    object it was, with the contents ``datasets`` leaves.

    ``Dataset.map(num_proc=...)`` (datasets 5.0.1, ``arrow_dataset.py``) rebinds ``os.environ`` to a
    deep copy it took before the map. In the sweep's own process (tokenizing once, scoring the
    test split) whatever held the original mapping then changed a stale one: pytest's
    ``monkeypatch`` "restored" PYTHONPATH there, and the next test's trials still ran a previous
    test's injected training hook (a CI failure).
    """
    install()
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
