"""Bad input: exit code 2, a message naming the file and the row or key, and nothing created anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep.cli import main
from tests.conftest import ROOT, assert_run_refused, files_below, write_spec

GOOD_ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _task(folder: Path, bad_line: str | bytes) -> Path:
    path = folder / "task.jsonl"
    good = "".join(
        json.dumps({**GOOD_ROW, "messages": [{"role": "user", "content": f"q{i}"}, GOOD_ROW["messages"][1]]}) + "\n"
        for i in range(20)
    )
    path.write_bytes(good.encode() + (bad_line if isinstance(bad_line, bytes) else bad_line.encode()) + b"\n")
    return path


def _data_block(task: Path, extra: str = "") -> str:
    return f"data:\n  task: {task}\n  val: 0.2\n  seed: 0\n{extra}"


MIX_ONLY = "search_space:\n  mix_ratio: {type: float, low: 0.0, high: 0.3}"
CASES = {
    "malformed json": (lambda d, m: {"data": _data_block(_task(d, '{"messages": ['))}, "line 21: malformed JSON"),
    "no messages": (
        lambda d, m: {"data": _data_block(_task(d, '{"text": "x"}'))},
        "line 21: expected an object with a 'messages' list",
    ),
    "unknown role": (
        lambda d, m: {"data": _data_block(_task(d, '{"messages": [{"role": "bot", "content": "x"}]}'))},
        "messages[0].role is 'bot'",
    ),
    "empty content": (
        lambda d, m: {
            "data": _data_block(
                _task(d, '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}')
            )
        },
        "messages[1].content is empty",
    ),
    "no assistant": (
        lambda d, m: {"data": _data_block(_task(d, '{"messages": [{"role": "user", "content": "q"}]}'))},
        "no assistant turn",
    ),
    "not utf-8": (lambda d, m: {"data": _data_block(_task(d, b'{"messages": "\xff"}'))}, "line 21: not UTF-8"),
    "val overlaps train": (
        lambda d, m: {"data": f"data:\n  task: {_task(d, json.dumps(GOOD_ROW))}\n  val: {_val_file(d)}\n"},
        "also appear in the validation or test set",
    ),
    "missing model dir": (lambda d, m: {"model": f"model: {{path: {d / 'nope'}}}"}, "model.path"),
    "model without tokenizer": (lambda d, m: {"model": f"model: {{path: {_bare_model(d)}}}"}, "has no tokenizer"),
    "low > high": (
        lambda d, m: {"search_space": "search_space:\n  lr: {type: float, low: 0.1, high: 0.01}"},
        "search_space.lr: low (0.1) is greater than high",
    ),
    "log range with 0": (
        lambda d, m: {"search_space": "search_space:\n  lr: {type: float, low: 0, high: 0.1, log: true}"},
        "log range must be above 0",
    ),
    "unknown key": (lambda d, m: {"n_trials": "n_trials: 2\nn_trails: 3"}, "n_trails: unknown key"),
    "unknown metric": (
        lambda d, m: {"n_trials": "n_trials: 2\nobjective: {metric: val/bleu}"},
        "objective.metric: 'val/bleu' is produced by nothing",
    ),
    # names and values that used to pass (issue 16, item 5)
    "study ..": (lambda d, m: {"study": "study: '..'"}, "study: '..' is not a study name"),
    "study empty": (lambda d, m: {"study": "study: ''"}, "study: '' is not a study name"),
    "registry name with /": (lambda d, m: {"registry": "registry: {name: team/model}"}, "registry.name: 'team/model'"),
    "registry name with '": (lambda d, m: {"registry": 'registry: {name: "it\'s"}'}, "registry.name:"),
    "batch_size 0": (lambda d, m: {"fixed": "fixed: {batch_size: 0}"}, "fixed.batch_size: 0 is outside [1, 65536]"),
    "lr -1": (
        lambda d, m: {"fixed": "fixed: {lr: -1}", "search_space": MIX_ONLY},
        "fixed.lr: -1 is outside (0.0, 1.0]",
    ),
    "max_epochs 0": (lambda d, m: {"fixed": "fixed: {max_epochs: 0}"}, "fixed.max_epochs: 0 is outside"),
    "lora_r 0 searched": (
        lambda d, m: {"search_space": "search_space:\n  lora_r: {type: categorical, choices: [0, 8]}"},
        "search_space.lora_r: 0 is outside [1, 65536]",
    ),
    "lora_dropout 7": (
        lambda d, m: {"fixed": "fixed: {lora_dropout: 7.0}"},
        "fixed.lora_dropout: 7.0 is outside [0.0, 1.0)",
    ),
    "max_length huge": (
        lambda d, m: {"fixed": "fixed: {max_length: 100000000000}"},
        "fixed.max_length: 100000000000 is outside",
    ),
    "lr range below 0": (
        lambda d, m: {"search_space": "search_space:\n  lr: {type: float, low: -0.1, high: 0.1}"},
        "search_space.lr: -0.1 is outside",
    ),
    "full fine-tune base config": (
        lambda d, m: {
            "base_config": "base_config: internlm2_chat_1_8b_full_alpaca_e3",
            "fixed": "fixed: {max_length: 64, lora_r: 8}",
            "search_space": MIX_ONLY,
        },
        "base_config internlm2_chat_1_8b_full_alpaca_e3: has no model.lora",
    ),  # fmt: skip
    "data path is a folder": (lambda d, m: {"data": _data_block(d)}, f"{'inputs'}: is a folder"),
    "data path is a symlink loop": (lambda d, m: {"data": _data_block(_loop(d))}, "cannot be read as a data file"),
    "model with its own code": (
        lambda d, m: {"model": f"model: {{path: {_coded_model(d, m)}}}"},
        "ships its own modeling code",
    ),
    "duplicate key": (lambda d, m: {"n_trials": "n_trials: 2\nn_trials: 3"}, "key 'n_trials' given twice"),
    "tab": (lambda d, m: {"n_trials": "n_trials: 2\nprobes:\n\t- a"}, "not tabs"),
}


def _coded_model(folder: Path, model: Path) -> Path:
    """The tiny model with an ``auto_map``, as InternLM2's folder has: Transformers would import its code."""
    import shutil

    copy = folder / "coded-model"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    return copy


def _loop(folder: Path) -> Path:
    (folder / "loop-a").symlink_to(folder / "loop-b")
    (folder / "loop-b").symlink_to(folder / "loop-a")
    return folder / "loop-a"


def _val_file(folder: Path) -> Path:
    path = folder / "val.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n")
    return path


def _bare_model(folder: Path) -> Path:
    path = folder / "bare-model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_and_creates_nothing(case, tmp_path, monkeypatch, capsys, tiny_model):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    make, expected = CASES[case]
    spec = write_spec(inputs, tiny_model, **make(inputs, tiny_model))
    err = assert_run_refused(tmp_path, monkeypatch, capsys, spec, expected)
    assert str(inputs) in err, "the message names the file"


@pytest.mark.parametrize("name", ["..", "", "a/b", "."])
def test_a_bad_study_option_exits_2_and_creates_nothing(name, tmp_path, monkeypatch, capsys, tiny_model):
    spec = write_spec(tmp_path, tiny_model)
    monkeypatch.chdir(tmp_path)
    before = files_below(tmp_path.parent)
    rc = main(["run", str(spec), "--study", name])
    err = capsys.readouterr().err
    assert rc == 2 and f"--study {name!r}" in err and "is not a study name" in err, err
    assert files_below(tmp_path.parent) == before


def test_unreachable_storage_exits_2_and_hides_the_password(tmp_path, monkeypatch, capsys, tiny_model):
    spec = write_spec(tmp_path, tiny_model)
    monkeypatch.chdir(tmp_path)
    before = files_below(tmp_path)
    rc = main(["run", str(spec), "--storage", "postgresql://user:hunter2@127.0.0.1:1/none"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be reached" in err
    assert "hunter2" not in err and "***" in err
    assert files_below(tmp_path) == before


def test_validate_renders_one_config(tmp_path, capsys, tiny_model):
    out = tmp_path / "trial.py"
    assert main(["validate", str(ROOT / "configs" / "demo.yaml"), "--output", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert "sweep.training.hook.SweepHook" in out.read_text()
    assert main(["validate", str(ROOT / "configs" / "internlm2_chat_1_8b_qlora.yaml")]) == 2
    assert "internlm2_chat_1_8b_qlora.yaml: model.path" in capsys.readouterr().err


def test_work_dir_of_a_same_named_study_in_another_storage_is_refused(tmp_path, monkeypatch, capsys, tiny_model):
    """Trial folders are named by study and number: a second storage must not overwrite the first one's trials."""
    spec = write_spec(tmp_path, tiny_model)
    monkeypatch.chdir(tmp_path)
    owner = tmp_path / "sweep-runs" / "e2e" / "storage.txt"
    owner.parent.mkdir(parents=True)
    owner.write_text(f"sqlite:///{tmp_path / 'first.db'}\n")
    before = files_below(tmp_path)
    rc = main(["run", str(spec), "--storage", "sqlite:///second.db"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds the trials of study e2e in storage" in err and "--work-dir" in err, err
    assert files_below(tmp_path) == before, "no database, no MLflow store, nothing in the work dir"


def test_workers_started_before_the_checks_end_with_a_refused_run(tmp_path, monkeypatch, capsys, tiny_model):
    """`sweep run` starts its training workers before its checks when the spec says how many: a refused run
    ends them and removes their logs, so bad input still leaves nothing behind and no process running."""
    from sweep.trial.pool import WorkerPool

    started = []
    original = WorkerPool._spawn

    def spawn(self, launch):
        worker = original(self, launch)
        started.append(worker)
        return worker

    monkeypatch.setattr(WorkerPool, "_spawn", spawn)
    spec = write_spec(tmp_path, tiny_model, data=_data_block(_task(tmp_path, '{"messages": [')))
    assert_run_refused(tmp_path, monkeypatch, capsys, spec, "line 21: malformed JSON")
    assert started, "no worker was started ahead of the checks"
    assert not any(w.alive() for w in started), "a worker outlived the refused run"
    assert not any(w.log.exists() for w in started)


def test_a_refused_run_removes_only_what_its_early_workers_wrote(tmp_path, monkeypatch, capsys, tiny_model):
    """Many `sweep run`s may share one work dir (one study over many machines): a run its checks refuse removes its
    own workers' logs and the folders it made only where they are empty, never what another run wrote meanwhile."""
    from sweep import study as study_mod
    from sweep.trial.pool import WorkerPool

    started = []
    spawn = WorkerPool._spawn
    monkeypatch.setattr(WorkerPool, "_spawn", lambda self, launch: started.append(spawn(self, launch)) or started[-1])
    spec = write_spec(tmp_path, tiny_model, data=_data_block(_task(tmp_path, '{"messages": [')))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    other = work / "sweep-runs" / "e2e" / "data" / "from-another-run.txt"
    original = study_mod.check

    def check(*args, **kwargs):
        other.parent.mkdir(parents=True, exist_ok=True)
        other.write_text("another sweep run's split")  # written while this run's checks ran
        return original(*args, **kwargs)

    monkeypatch.setattr(study_mod, "check", check)
    assert main(["run", str(spec)]) == 2
    assert "line 21: malformed JSON" in capsys.readouterr().err
    assert other.read_text() == "another sweep run's split"
    assert started and not any(w.alive() or w.log.exists() for w in started)
    assert not (work / "sweep-runs" / "e2e" / "workers").exists(), "this run's workers folder, emptied, is gone"
