"""datasets 5 runs a map of ``num_proc=1`` in a pool of one forked process; the sweep runs it in this process."""

from __future__ import annotations

import os

import pytest
from datasets import Dataset

from sweep.xtuner import maps


def _pids_and_rows(num_proc: int | None) -> tuple[set[int], list[dict]]:
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(40)]})
    mapped = rows.map(lambda row: {"pid": os.getpid(), "n": len(row["text"])}, num_proc=num_proc)
    kept = mapped.filter(lambda row: row["n"] > 5, num_proc=num_proc).shuffle(seed=3).flatten_indices(num_proc=num_proc)
    return set(mapped["pid"]), [{k: v for k, v in r.items() if k != "pid"} for r in kept]


@pytest.fixture
def restored():
    original = Dataset.map
    yield
    Dataset.map = original


def test_a_map_of_one_process_runs_here_with_the_same_rows(restored):
    forked, rows_before = _pids_and_rows(1)
    assert forked != {os.getpid()}, "datasets 5 maps num_proc=1 in a forked pool (if it stops, this module can go)"
    datasets_own = Dataset.map
    maps.install()
    maps.install()  # idempotent: one wrapper
    assert Dataset.map.__wrapped__ is datasets_own
    here, rows_after = _pids_and_rows(1)
    assert here == {os.getpid()}
    assert rows_after == rows_before and len(rows_after) == 30  # "row 0" to "row 9" filtered out
    two, rows_two = _pids_and_rows(2)
    assert os.getpid() not in two and rows_two == rows_before, "num_proc > 1 is left to datasets"
