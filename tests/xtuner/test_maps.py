"""datasets 5 runs a map of ``num_proc=1`` in a pool of one forked process; the sweep runs it in this process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk

from sweep.xtuner import maps


def _pipeline(folder: Path, num_proc: int | None) -> tuple[set[int], list[dict], list[str], list[str]]:
    """The pids the map ran in, the rows after a map, a filter, a shuffle and a flatten, and the fingerprints and cache
    files of each stage (a dataset on disk, as XTuner's ``load_dataset`` gives one)."""
    rows = load_from_disk(str(folder))
    mapped = rows.map(lambda row: {"pid": os.getpid(), "n": len(row["text"])}, num_proc=num_proc)
    kept = mapped.filter(lambda row: row["n"] > 5, num_proc=num_proc)
    flat = kept.shuffle(seed=3).flatten_indices(num_proc=num_proc)
    stages = (mapped, kept, flat)
    files = [Path(f["filename"]).name for d in stages for f in d.cache_files]
    rows_out = [{k: v for k, v in r.items() if k != "pid"} for r in flat]
    return set(mapped["pid"]), rows_out, [d._fingerprint for d in stages], files


@pytest.fixture
def stock_map():
    """datasets' own ``Dataset.map`` for this test, whatever earlier tests of this process installed."""
    installed = Dataset.map
    while getattr(Dataset.map, "_sweep_one_process_maps", False):
        Dataset.map = Dataset.map.__wrapped__
    yield Dataset.map
    Dataset.map = installed


def _disk(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    Dataset.from_dict({"text": [f"row {i}" for i in range(40)]}).save_to_disk(str(folder))
    return folder


def test_a_map_of_one_process_runs_here_with_the_same_rows_fingerprints_and_cache_files(tmp_path, stock_map):
    forked, rows_before, prints_before, files_before = _pipeline(_disk(tmp_path, "stock"), 1)
    assert forked != {os.getpid()}, "datasets 5 maps num_proc=1 in a forked pool (if it stops, this module can go)"
    maps.install()
    maps.install()  # idempotent: one wrapper
    assert Dataset.map.__wrapped__ is stock_map
    here, rows_after, prints_after, files_after = _pipeline(_disk(tmp_path, "sweep"), 1)
    assert here == {os.getpid()}
    assert rows_after == rows_before and len(rows_after) == 30  # "row 0" to "row 9" filtered out
    assert prints_after == prints_before and files_after == files_before and len(set(files_after)) == 3
    two, rows_two, _, _ = _pipeline(_disk(tmp_path, "two"), 2)
    assert os.getpid() not in two and rows_two == rows_before, "num_proc > 1 is left to datasets"
