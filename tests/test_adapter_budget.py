"""keep_adapters: only the best trials stay whole on disk (the champion's, Pareto trials and any a gate uses).

A finished trial that is not kept leaves its config, metric stream, logs and data reference; its
adapter, checkpoints and copies of the training rows go, the copies only where a digest proves
they can be made again. Real SQLite storages, real data splits and mixes, the real callback.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweep import data as data_mod
from sweep.callbacks import AdapterBudget
from sweep.registry.locks import adapter_in_use
from sweep.registry.tracking import RegistryError
from sweep.spec import DataSpec, SpecError

RECORD = {"config.py", "sweep_metrics.jsonl", "train.log", "data.json"}  # what a thinned-out trial keeps


def _study(tmp_path: Path, trials: list[tuple[float, TrialState]]) -> tuple[optuna.Study, dict[int, Path]]:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    dirs = {}
    for number, (value, state) in enumerate(trials):
        work = tmp_path / f"trial_{number}"
        (work / "best_adapter").mkdir(parents=True)
        dirs[number] = work / "best_adapter"
        _add(study, work, number, state, value)
    return study, dirs


def _kept(dirs: dict[int, Path]) -> set[int]:
    return {n for n, d in dirs.items() if d.is_dir()}


def test_only_the_best_adapters_stay(tmp_path):
    study, dirs = _study(tmp_path, [(3.0, TrialState.COMPLETE), (1.0, TrialState.COMPLETE),
                                    (2.0, TrialState.COMPLETE), (0.5, TrialState.PRUNED),
                                    (4.0, TrialState.COMPLETE)])  # fmt: skip
    AdapterBudget(keep=2, champion_run=lambda: "run4")(study, study.trials[-1])
    # completed trials rank before pruned ones; 1.0 and 2.0 are the best two; run4 is the registered champion
    assert _kept(dirs) == {1, 2, 4}


def test_an_infeasible_trial_never_takes_the_place_of_a_feasible_one(tmp_path):
    """The best value above an ``objective.at_most`` limit can never become champion: the best feasible trial stays."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    dirs = {}
    for number, (value, constraint) in enumerate([(1.0, 0.3), (2.0, -0.1), (3.0, 0.0)]):
        work = tmp_path / f"trial_{number}"
        (work / "best_adapter").mkdir(parents=True)
        dirs[number] = work / "best_adapter"
        _add(study, work, number, TrialState.COMPLETE, value, {"val/repetition": constraint})
    assert study.best_trial.number == 1, "Optuna's own best trial skips the infeasible one"
    AdapterBudget(keep=1)(study, study.trials[-1])
    assert _kept(dirs) == {1}


def test_the_champion_is_read_again_each_time(tmp_path):
    """Another worker's gate moves the alias during the sweep: the old champion's adapter may go, the new one stays."""
    study, dirs = _study(tmp_path, [(3.0, TrialState.COMPLETE), (1.0, TrialState.COMPLETE),
                                    (4.0, TrialState.COMPLETE), (5.0, TrialState.COMPLETE)])  # fmt: skip
    champion = ["run2"]
    budget = AdapterBudget(keep=1, champion_run=lambda: champion[0])
    with adapter_in_use(dirs[0]):  # a gate is registering trial 0 right now
        budget(study, study.trials[-1])
    assert _kept(dirs) == {0, 1, 2}, "trial 0 in use, trial 2 the champion"
    champion[0] = "run0"  # that gate crowned trial 0
    budget(study, study.trials[-1])
    assert _kept(dirs) == {0, 1}


def test_a_registry_error_removes_nothing(tmp_path):
    study, dirs = _study(tmp_path, [(1.0, TrialState.COMPLETE), (2.0, TrialState.COMPLETE)])

    def unreadable() -> str:
        raise RegistryError("registry sqlite:///m.db: cannot read alias 'champion' of model 'm': busy")

    AdapterBudget(keep=1, champion_run=unreadable)(study, study.trials[-1])
    assert _kept(dirs) == {0, 1}, "the champion could be trial 1's: nothing goes while it cannot be read"


def _row(q: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"answer to {q}"}]}


def _split(tmp_path: Path, root: Path, tag: str = "q") -> data_mod.PreparedData:
    """The study's split, and a tokens folder beside it as sweep.tokenized leaves one (ids stand in for tokens)."""
    task = tmp_path / f"task-{tag}.jsonl"
    general = tmp_path / f"general-{tag}.jsonl"
    task.write_text("".join(json.dumps(_row(f"{tag}{i}")) + "\n" for i in range(40)))
    general.write_text("".join(json.dumps(_row(f"g{tag}{i}")) + "\n" for i in range(20)))
    data = data_mod.prepare(DataSpec(task=task, general=general, val=0.2, general_val=0.0), root / "data")
    tokens = data.folder / "tokens-test"
    if not tokens.exists():
        tokens.mkdir()
        for split in ("train", "general_train"):
            rows = data.path(split).read_text().splitlines()
            ids = [json.dumps({"input_ids": [i, len(r)], "labels": [-100, len(r)]}) for i, r in enumerate(rows)]
            (tokens / f"{split}.jsonl").write_text("".join(line + "\n" for line in ids))
    return data


def _trial_dir(root: Path, number: int, data: data_mod.PreparedData) -> Path:
    """What a trial leaves after training: its record, an adapter, checkpoints and its copies of the rows."""
    work = root / f"trial_{number:04d}"
    work.mkdir(parents=True)
    for name in ("config.py", "sweep_metrics.jsonl", "train.log"):
        (work / name).write_text(f"{name} of trial {number}\n")
    (work / "best_adapter").mkdir()
    (work / "best_adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    for name in ("iter_8.pth", "best_val_loss_iter_4.pth"):
        (work / name).write_bytes(b"\0" * 5000)
    (work / "last_checkpoint").write_text(str(work / "iter_8.pth"))
    mix_ratio, seed = 0.25, 7 + number
    data_mod.mix(data, mix_ratio, seed, work / "rows.jsonl")
    data_mod.mix(data, mix_ratio, seed, work / "train.jsonl", data.folder / "tokens-test")
    data_mod.write_reference(
        work, data, mix_ratio, seed, {"rows.jsonl": data.folder, "train.jsonl": data.folder / "tokens-test"}
    )
    return work


def _add(study: optuna.Study, work: Path, number: int, state: TrialState, value: float | None,
         constraints: dict[str, float] | None = None) -> None:  # fmt: skip
    study.add_trial(
        create_trial(
            state=state,
            constraints=constraints,
            value=value if state == TrialState.COMPLETE else None,
            params={"lr": 0.1},
            distributions={"lr": FloatDistribution(0.01, 1.0)},
            user_attrs={
                "adapter_path": str(work / "best_adapter"),
                "work_dir": str(work),
                "best_value": value,
                "mlflow_run_id": f"run{number}",
            },  # fmt: skip
            intermediate_values={1: value} if value is not None else {},
        )
    )


def _files(work: Path) -> dict[str, bytes]:
    """A trial folder's files and contents; the adapter's lock file (sweep.locks) is no content."""
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}  # fmt: skip


def test_a_trial_not_kept_leaves_its_record_only(tmp_path: Path):
    root = tmp_path / "sweep-runs" / "study"
    data = _split(tmp_path, root)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    plan = [(3.0, TrialState.COMPLETE), (1.0, TrialState.COMPLETE), (0.5, TrialState.PRUNED),
            (2.0, TrialState.COMPLETE), (None, TrialState.FAIL)]  # fmt: skip
    works = {}
    for number, (value, state) in enumerate(plan):
        works[number] = _trial_dir(root, number, data)
        _add(study, works[number], number, state, value)
    running = study.ask()  # trial 5: RUNNING, in a worker somewhere
    works[5] = _trial_dir(root, 5, data)
    running.set_user_attr("work_dir", str(works[5]))
    running.set_user_attr("adapter_path", str(works[5] / "best_adapter"))
    before = {n: _files(w) for n, w in works.items()}

    AdapterBudget(keep=1, champion_run=lambda: "run3")(study, study.trials[-1])

    for n in (1, 3, 4, 5):  # the best, the champion, a failed and a running trial: untouched
        assert _files(works[n]) == before[n], f"trial {n}"
    for n in (0, 2):  # a completed and a pruned trial that are not kept
        assert set(_files(works[n])) == RECORD, f"trial {n}"
        assert not (works[n] / "best_adapter").exists()
        made = data_mod.remake(works[n])  # the reference gives the dropped copies back, byte for byte
        assert sorted(p.name for p in made) == ["rows.jsonl", "train.jsonl"]
        assert {k: v for k, v in _files(works[n]).items() if k.endswith(".jsonl")} == {
            k: v for k, v in before[n].items() if k.endswith(".jsonl")
        }
    reference = json.loads((works[0] / "data.json").read_text())
    assert reference["data_digest"] == data.digest and reference["copies"]["rows.jsonl"]["rows"] > 30


def test_copies_stay_unless_a_digest_proves_them_remakeable(tmp_path: Path):
    root = tmp_path / "runs" / "study"
    data = _split(tmp_path, root)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    for number, value in enumerate([1.0, 2.0, 3.0]):
        _add(study, _trial_dir(root, number, data), number, TrialState.COMPLETE, value)
    edited = root / "trial_0001" / "rows.jsonl"
    edited.write_text(edited.read_text() + json.dumps(_row("added by hand")) + "\n")
    AdapterBudget(keep=1)(study, study.trials[-1])
    assert edited.is_file() and not (root / "trial_0002" / "rows.jsonl").exists(), "only the copy its hash proves"
    assert not (root / "trial_0001" / "train.jsonl").exists() and not list(root.glob("trial_0001/*.pth"))

    shutil.rmtree(data.folder)  # the split made again from other data: nothing proves the old copies any more
    _split(tmp_path, root, tag="other")
    _add(study, _trial_dir(root, 3, data), 3, TrialState.COMPLETE, 4.0)  # data.json names the old digest
    AdapterBudget(keep=1)(study, study.trials[-1])
    assert {"rows.jsonl", "train.jsonl"} <= set(_files(root / "trial_0003")), "kept: its split is gone"
    assert not list(root.glob("trial_0003/*.pth")), "its checkpoints go anyway"
    with pytest.raises(SpecError, match="is not the split with digest"):
        data_mod.remake(root / "trial_0002")


def test_files_of_a_running_trial_stay_until_its_result_is_recorded(tmp_path: Path):
    """Two trials at once (Optuna n_jobs=2): the better one ends first; the other is still RUNNING."""
    root = tmp_path / "runs" / "study"
    data = _split(tmp_path, root)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    second_recorded = threading.Event()
    seen: dict[str, object] = {}

    def objective(trial: optuna.Trial) -> float:
        work = _trial_dir(root, trial.number, data)
        trial.set_user_attr("work_dir", str(work))
        trial.set_user_attr("adapter_path", str(work / "best_adapter"))
        if trial.number == 1:
            return 1.0
        seen["waited"] = second_recorded.wait(timeout=60)  # trial 1 is COMPLETE and its callbacks have run
        seen["files while running"] = set(_files(work))
        return 5.0

    def after_trial_1(_study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if t.number == 1:
            second_recorded.set()

    study.optimize(objective, n_trials=2, n_jobs=2, callbacks=[AdapterBudget(keep=1), after_trial_1])
    assert seen["waited"], "trial 1 did not finish while trial 0 ran"
    assert {"iter_8.pth", "rows.jsonl", "best_adapter/adapter_model.safetensors"} <= seen["files while running"]
    assert set(_files(root / "trial_0000")) == RECORD, "thinned out once its own result was recorded"
    assert "iter_8.pth" in _files(root / "trial_0001"), "the best trial is kept whole"
