"""Tokenize once per study: a trial trains on exactly the tokens it would have made itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sweep import data as data_mod
from sweep.knobs import trial_values
from sweep.preflight import check
from sweep.search import first_point
from sweep.spec import SpecError, load_spec
from sweep.trial.protocol import TrialFiles
from sweep.xtuner import tokenized
from sweep.xtuner.render import Device, render
from sweep.xtuner.tokenized import tokenize_once
from tests.conftest import write_spec


def _packed(config: Path) -> list[tuple[list[int], list[int]]]:
    from mmengine.config import Config
    from mmengine.registry import DATASETS

    np.random.seed(0)  # XTuner shuffles before packing with numpy's global generator, as the runner seeds it
    built = DATASETS.build(Config.fromfile(str(config)).train_dataloader.dataset)
    return [(list(r["input_ids"]), list(r["labels"])) for r in built]


def _trial(tmp_path: Path, tiny_model: Path, max_length: int = 64):
    spec = load_spec(write_spec(tmp_path, tiny_model))
    checked = check(spec)
    prepared = data_mod.prepare(spec.data, tmp_path / "data")
    values = trial_values(spec, {**first_point(spec), "mix_ratio": 0.3}, checked.base_knobs)
    values["max_length"] = max_length
    return spec, checked, prepared, values


def test_packed_training_data_is_identical(tmp_path: Path, tiny_model: Path):
    spec, checked, prepared, values = _trial(tmp_path, tiny_model)
    raw_rows = data_mod.mix(prepared, 0.3, 7, tmp_path / "raw.jsonl")
    raw_cfg = tmp_path / "raw.py"
    files = TrialFiles(tmp_path / "raw.jsonl", prepared.path("val"), tmp_path, raw_rows)
    raw_cfg.write_text(render(checked.base_cfg, spec, values, files, Device(cuda=False)))

    tokens = tokenize_once(raw_cfg, prepared)
    tok_rows = data_mod.mix(prepared, 0.3, 7, tmp_path / "tok.jsonl", source=tokens)
    tok_cfg = tmp_path / "tok.py"
    files = TrialFiles(tmp_path / "tok.jsonl", prepared.path("val"), tmp_path, tok_rows, tokenized=True)
    tok_cfg.write_text(render(checked.base_cfg, spec, values, files, Device(cuda=False)))

    assert tok_rows == raw_rows, "the same rows are mixed in"
    raw, tok = _packed(raw_cfg), _packed(tok_cfg)
    assert len(raw) > 5 and raw == tok, "token for token, in the same packed order"


def test_made_once_and_per_tokenizing_settings(tmp_path: Path, tiny_model: Path):
    spec, checked, prepared, values = _trial(tmp_path, tiny_model)
    rows = data_mod.mix(prepared, 0.3, 7, tmp_path / "raw.jsonl")
    files = TrialFiles(tmp_path / "raw.jsonl", prepared.path("val"), tmp_path, rows)
    cfg = tmp_path / "a.py"
    cfg.write_text(render(checked.base_cfg, spec, values, files, Device(cuda=False)))
    first = tokenize_once(cfg, prepared)
    stamp = (first / "train.jsonl").stat().st_mtime_ns
    # another trial with other knobs (lr, LoRA rank) but the same tokenizing settings reuses the tokens
    other = tmp_path / "b.py"
    other.write_text(render(checked.base_cfg, spec, {**values, "lr": 0.02, "lora_r": 8}, files, Device(cuda=False)))
    assert tokenize_once(other, prepared) == first and (first / "train.jsonl").stat().st_mtime_ns == stamp
    longer = tmp_path / "c.py"
    longer.write_text(render(checked.base_cfg, spec, {**values, "max_length": 96}, files, Device(cuda=False)))
    assert tokenize_once(longer, prepared) != first, "max_length changes the tokens"


def test_tokenizing_leaves_os_environ_the_same_object(tmp_path: Path, tiny_model: Path, monkeypatch):
    """datasets' map(num_proc) rebinds os.environ; a later monkeypatch undo must still reach the real one."""
    spec, checked, prepared, values = _trial(tmp_path, tiny_model, max_length=80)
    rows = data_mod.mix(prepared, 0.3, 7, tmp_path / "raw.jsonl")
    cfg = tmp_path / "a.py"
    cfg.write_text(render(checked.base_cfg, spec, values, TrialFiles(tmp_path / "raw.jsonl", prepared.path("val"),
                                                                      tmp_path, rows), Device(cuda=False)))  # fmt: skip
    environ = os.environ
    monkeypatch.setenv("XTS_ENV_PROBE", "set before tokenizing")
    tokenize_once(cfg, prepared)
    assert os.environ is environ, "os.environ was rebound while tokenizing"
    assert os.environ["XTS_ENV_PROBE"] == "set before tokenizing"
    monkeypatch.undo()
    assert "XTS_ENV_PROBE" not in os.environ


def _config(tmp_path: Path, tiny_model: Path):
    spec, checked, prepared, values = _trial(tmp_path, tiny_model)
    rows = data_mod.mix(prepared, 0.3, 7, tmp_path / "raw.jsonl")
    cfg = tmp_path / "a.py"
    files = TrialFiles(tmp_path / "raw.jsonl", prepared.path("val"), tmp_path, rows)
    cfg.write_text(render(checked.base_cfg, spec, values, files, Device(cuda=False)))
    return cfg, prepared


def _tokenize_as_pid_1(cfg: Path, prepared, start, results) -> None:
    """One worker of a container: its PID is 1, like every other worker's."""
    start.wait()
    real = os.getpid
    os.getpid = lambda: 1
    try:
        outcome = ("ok", str(tokenize_once(cfg, prepared)))
    except BaseException as err:  # noqa: BLE001 - reported to the test, which fails on it
        outcome = ("error", f"{type(err).__name__}: {err}")
    finally:
        os.getpid = real  # before the queue: multiprocessing's own clean-up compares PIDs
    results.put(outcome)


def test_processes_with_the_same_pid_tokenize_into_one_folder(tmp_path: Path, tiny_model: Path):
    """A temp folder named by the PID was removed (or renamed) by another worker of the same PID."""
    import multiprocessing

    cfg, prepared = _config(tmp_path, tiny_model)
    # datasets 5 forks a pool even for num_proc=1, and multiprocessing cannot end a pool forked while
    # os.getpid is patched: tokenize in the process itself (the tokens are the same either way)
    text = cfg.read_text()
    assert "'map_num_proc': 1" in text
    cfg.write_text(text.replace("'map_num_proc': 1", "'map_num_proc': None"))
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_tokenize_as_pid_1, args=(cfg, prepared, start, results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    folders = {path for kind, path in outcomes if kind == "ok"}
    assert len(folders) == 1 and all(kind == "ok" for kind, _ in outcomes), outcomes
    assert tokenize_once(cfg, prepared) == Path(folders.pop()), "this process checks and uses the same folder"
    assert not [p.name for p in prepared.folder.iterdir() if p.name.startswith(".")], "no temp folder left behind"


def test_a_tokens_folder_is_checked_and_other_writers_are_left_alone(tmp_path: Path, tiny_model: Path):
    cfg, prepared = _config(tmp_path, tiny_model)
    folder = tokenize_once(cfg, prepared)
    tokenized._CHECKED.discard(folder)  # as a new sweep process finds it
    with (folder / "train.jsonl").open("a") as f:
        f.write('{"input_ids": [1], "labels": [1]}\n')
    with pytest.raises(SpecError) as err:
        tokenize_once(cfg, prepared)
    assert str(folder / "train.jsonl") in str(err.value) and f"rm -r {folder}" in str(err.value)

    (folder / "manifest.json").unlink()
    with pytest.raises(SpecError, match="has no manifest.json"):
        tokenize_once(cfg, prepared)

    shutil.rmtree(folder)
    theirs = prepared.folder / f".{folder.name}.another-writer.tmp"  # a worker still writing its own copy
    theirs.mkdir()
    (theirs / "train.jsonl").write_text("half\n")
    assert tokenize_once(cfg, prepared) == folder and (folder / "manifest.json").is_file()
    assert (theirs / "train.jsonl").read_text() == "half\n", "another writer's temp folder is not ours to remove"
