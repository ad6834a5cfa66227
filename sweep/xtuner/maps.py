"""``datasets``' maps of one process run in this one, as they did before datasets 5.

XTuner's pipeline (``process_hf_dataset``: template, filter, shuffle, pack, lengths) maps rows with
``num_proc=map_num_proc``: 1 for every validation set, and for a trial's training rows where the base config says
so or the file has fewer than 4,000 rows (``sweep.xtuner.render``). datasets 5.0.1 starts a process pool (and a
manager process) for every map whose ``num_proc`` is 1, where it ran the map in the calling process before:
about 16 maps a trial, two forks each, of a training process that holds the base model; on the CPU most of a
warm trial's set-up (docs/benchmarks.md). One shard is one shard: the same
function over the same rows in the same order, the same fingerprints and cache file names (datasets names both
by the shard count, 1 either way), so ``num_proc=1`` is passed on as ``None``.
"""

from __future__ import annotations

import functools
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
