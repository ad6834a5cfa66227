"""Data checks, the once-per-study split, and the per-trial mix: held-out rows never reach training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sweep.data import load_rows, mix, prepare, row_key, split_rows
from sweep.spec import DataSpec, SpecError


def _row(q: str, a: str = "an answer") -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "line 2: malformed JSON"),
        ('{"text": "hi"}', "line 2: expected an object with a 'messages' list"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "line 2: messages[0].role is 'bot'"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}',
            "messages[1].content is empty",
        ),
        ('{"messages": [{"role": "user", "content": "q"}]}', "line 2: no assistant turn"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, line: str, expected: str):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(_row("ok")) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SpecError) as err:
        load_rows(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_json_list_and_non_utf8(tmp_path: Path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps([_row("a"), _row("b")]), encoding="utf-8")
    assert len(load_rows(path)) == 2
    path.write_bytes(b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    with pytest.raises(SpecError, match="line 1: not UTF-8"):
        load_rows(path)


def test_split_is_deterministic_disjoint_and_dedupes(tmp_path: Path):
    rows = [_row(f"q{i}", f"a{i}") for i in range(50)] + [_row("q1", "a1")] * 3  # duplicates of one row
    general = [_row(f"g{i}") for i in range(20)] + [_row("q3", "a3")]  # a general row equal to a task row
    spec = DataSpec(
        task=_jsonl(tmp_path / "t.jsonl", rows),
        general=_jsonl(tmp_path / "g.jsonl", general),
        val=0.2,
        test=0.1,
        seed=7,
    )
    a, b = split_rows(spec), split_rows(spec)
    assert a == b
    keys = {name: {row_key(r) for r in part} for name, part in a.items()}
    assert len(a["train"]) + len(a["val"]) + len(a["test"]) == 50
    held = keys["val"] | keys["test"]
    assert not (keys["train"] & held)
    assert not (keys["general_train"] & held)
    assert not (keys["general_val"] & keys["general_train"])
    other_seed = split_rows(spec.model_copy(update={"seed": 8}))
    assert other_seed["val"] != a["val"]


def test_validation_file_overlapping_training_is_refused(tmp_path: Path):
    rows = [_row(f"q{i}") for i in range(10)]
    spec = DataSpec(task=_jsonl(tmp_path / "t.jsonl", rows), val=_jsonl(tmp_path / "v.jsonl", rows[:2]))
    with pytest.raises(SpecError, match="also appear in the validation or test set"):
        split_rows(spec)


def test_prepare_writes_once_and_detects_other_data(tmp_path: Path):
    rows = [_row(f"q{i}") for i in range(30)]
    spec = DataSpec(task=_jsonl(tmp_path / "t.jsonl", rows), val=0.2)
    first = prepare(spec, tmp_path / "study" / "data")
    again = prepare(spec, tmp_path / "study" / "data")
    assert first.digest == again.digest and first.counts["val"] == 6
    _jsonl(tmp_path / "t.jsonl", rows + [_row("new")])
    with pytest.raises(SpecError, match="made from other data"):
        prepare(spec, tmp_path / "study" / "data")


def test_mix_ratio_is_the_general_share(tmp_path: Path):
    rows = [_row(f"q{i}") for i in range(40)]
    general = [_row(f"g{i}") for i in range(40)]
    spec = DataSpec(
        task=_jsonl(tmp_path / "t.jsonl", rows),
        general=_jsonl(tmp_path / "g.jsonl", general),
        val=0.25,
        general_val=0.25,
    )
    data = prepare(spec, tmp_path / "data")
    n = mix(data, 0.25, seed=0, out=tmp_path / "train.jsonl")
    mixed = [json.loads(x) for x in (tmp_path / "train.jsonl").open()]
    n_general = sum(r["messages"][0]["content"].startswith("g") for r in mixed)
    assert n == len(mixed) == 30 + 10 and n_general == 10
    assert mix(data, 0.0, seed=0, out=tmp_path / "t0.jsonl") == 30


def _big_spec(tmp_path: Path) -> DataSpec:
    """Enough rows (a few MB of splits) that writers which start together overlap while writing."""
    filler = "x" * 400
    rows = [_row(f"q{i} {filler}", f"a{i} {filler}") for i in range(3000)]
    general = [_row(f"g{i} {filler}") for i in range(1000)]
    return DataSpec(
        task=_jsonl(tmp_path / "t.jsonl", rows), general=_jsonl(tmp_path / "g.jsonl", general), val=0.2, test=0.1
    )


def _prepare_as_pid_1(spec: DataSpec, folder: Path, start, results) -> None:
    """One worker of a container: its PID is 1, like every other worker's."""
    import os

    start.wait()
    real = os.getpid
    os.getpid = lambda: 1
    try:
        outcome = ("ok", prepare(spec, folder).digest)
    except BaseException as err:  # noqa: BLE001 - reported to the test, which fails on it
        outcome = ("error", f"{type(err).__name__}: {err}")
    finally:
        os.getpid = real  # before the queue: multiprocessing's own clean-up compares PIDs
    results.put(outcome)


def test_processes_with_the_same_pid_prepare_one_folder(tmp_path: Path):
    """Temp names made from the PID collided here (1 crash in 6 runs, files rewritten after the rename)."""
    import multiprocessing

    spec = _big_spec(tmp_path)
    expected = prepare(spec, tmp_path / "reference").digest
    ctx = multiprocessing.get_context("fork")
    n_workers = 4
    for round_ in range(3):
        folder = tmp_path / f"study{round_}" / "data"
        start, results = ctx.Barrier(n_workers), ctx.Queue()
        procs = [ctx.Process(target=_prepare_as_pid_1, args=(spec, folder, start, results)) for _ in range(n_workers)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == [("ok", expected)] * n_workers, outcomes
        manifest = json.loads((folder / "manifest.json").read_text())
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{n}.jsonl" for n in manifest["hashes"]] + ["manifest.json"]
        )
        for name, digest in manifest["hashes"].items():
            assert hashlib.sha256((folder / f"{name}.jsonl").read_bytes()).hexdigest() == digest, name
        assert [p.name for p in folder.parent.iterdir()] == ["data"], "no temp folder is left behind"


def test_a_data_folder_without_manifest_is_repaired_or_refused(tmp_path: Path):
    rows = [_row(f"q{i}") for i in range(30)]
    spec = DataSpec(task=_jsonl(tmp_path / "t.jsonl", rows), val=0.2)
    reference = prepare(spec, tmp_path / "reference" / "data")

    empty = tmp_path / "empty" / "data"
    empty.mkdir(parents=True)  # this recursed until RecursionError
    assert prepare(spec, empty).digest == reference.digest and (empty / "manifest.json").is_file()

    half = tmp_path / "half" / "data"
    half.mkdir(parents=True)
    (half / "train.jsonl").write_bytes(reference.path("train").read_bytes())  # a writer died before the rest
    assert prepare(spec, half).digest == reference.digest
    assert (half / "val.jsonl").read_bytes() == reference.path("val").read_bytes()

    other = tmp_path / "other" / "data"
    other.mkdir(parents=True)
    (other / "train.jsonl").write_text(json.dumps(_row("not this study's row")) + "\n")
    with pytest.raises(SpecError) as err:
        prepare(spec, other)
    assert str(other) in str(err.value) and "train.jsonl" in str(err.value) and "rm -r" in str(err.value)
    assert json.loads((other / "train.jsonl").read_text()) == _row("not this study's row"), "left as it was"


def test_saved_files_are_checked_against_the_manifest(tmp_path: Path, caplog):
    rows = [_row(f"q{i}") for i in range(30)]
    spec = DataSpec(task=_jsonl(tmp_path / "t.jsonl", rows), val=0.2)
    folder = tmp_path / "data"
    first = prepare(spec, folder)
    whole = first.path("val").read_bytes()
    first.path("val").write_bytes(whole[: len(whole) // 2])  # cut short
    with caplog.at_level("WARNING", logger="sweep"):
        again = prepare(spec, folder)
    assert again == first and first.path("val").read_bytes() == whole
    assert "val.jsonl did not match the hashes in manifest.json" in caplog.text

    (folder / "manifest.json").write_text("{")  # a manifest cut short: its files are checked against the data
    assert prepare(spec, folder) == first
    assert json.loads((folder / "manifest.json").read_text())["digest"] == first.digest
