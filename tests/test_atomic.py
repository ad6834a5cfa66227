"""sweep.atomic: a reader sees the old file or folder or the whole new one, whatever the writers' PIDs."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from sweep import atomic


def test_write_text_replaces_whole_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "verdict.json"
    atomic.write_text(target, "old")
    atomic.write_text(target, "new ünïcode")
    assert target.read_text(encoding="utf-8") == "new ünïcode"
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(target, "half \udc80 written")  # fails in the middle of writing
    assert target.read_text(encoding="utf-8") == "new ünïcode", "a failed write leaves the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["verdict.json"], "and no temp file"


def _publish_as_pid_1(target: Path, start, results) -> None:
    start.wait()
    real = os.getpid
    os.getpid = lambda: 1
    try:
        tmp = atomic.temp_dir_beside(target)
        (tmp / "who").write_text(tmp.name)
        (tmp / "payload").write_text("x" * 100_000)
        outcome = ("won" if atomic.publish_dir(tmp, target) else "lost", tmp.name)
    except BaseException as err:  # noqa: BLE001 - reported to the test, which fails on it
        outcome = ("error", f"{type(err).__name__}: {err}")
    finally:
        os.getpid = real  # before the queue: multiprocessing's own clean-up compares PIDs
    results.put(outcome)


def test_same_pid_writers_publish_one_folder(tmp_path: Path):
    ctx = multiprocessing.get_context("fork")
    target = tmp_path / "tokens"
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_publish_as_pid_1, args=(target, start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sorted(kind for kind, _ in outcomes) == ["lost", "lost", "lost", "won"], outcomes
    assert len({name for _, name in outcomes}) == 4, "every writer had a temp folder of its own"
    winner = next(name for kind, name in outcomes if kind == "won")
    assert (target / "who").read_text() == winner and (target / "payload").read_text() == "x" * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["tokens"], "the losers' temp folders are gone"


def test_replace_dir_swaps_a_folder_in(tmp_path: Path):
    target = tmp_path / "best_adapter"
    for version in ("first", "second"):
        tmp = atomic.temp_dir_beside(target)
        (tmp / "adapter_config.json").write_text(version)
        atomic.replace_dir(tmp, target)
    assert (target / "adapter_config.json").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["best_adapter"]
