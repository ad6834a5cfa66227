"""keep_adapters: only the best trials' adapters stay on disk (the champion's always, and any a gate is using)."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweep.locks import adapter_in_use
from sweep.study import _AdapterBudget
from sweep.tracking import RegistryError


def _study(tmp_path: Path, trials: list[tuple[float, TrialState]]) -> tuple[optuna.Study, dict[int, Path]]:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    dirs = {}
    for number, (value, state) in enumerate(trials):
        folder = tmp_path / f"trial_{number}" / "best_adapter"
        folder.mkdir(parents=True)
        dirs[number] = folder
        study.add_trial(
            create_trial(
                state=state,
                value=value if state == TrialState.COMPLETE else None,
                params={"lr": 0.1},
                distributions={"lr": FloatDistribution(0.01, 1.0)},
                user_attrs={"adapter_path": str(folder), "best_value": value, "mlflow_run_id": f"run{number}"},
                intermediate_values={1: value},
            )
        )
    return study, dirs


def _kept(dirs: dict[int, Path]) -> set[int]:
    return {n for n, d in dirs.items() if d.is_dir()}


def test_only_the_best_adapters_stay(tmp_path):
    study, dirs = _study(tmp_path, [(3.0, TrialState.COMPLETE), (1.0, TrialState.COMPLETE),
                                    (2.0, TrialState.COMPLETE), (0.5, TrialState.PRUNED),
                                    (4.0, TrialState.COMPLETE)])  # fmt: skip
    _AdapterBudget(keep=2, champion_run=lambda: "run4")(study, study.trials[-1])
    # completed trials rank before pruned ones; 1.0 and 2.0 are the best two; run4 is the registered champion
    assert _kept(dirs) == {1, 2, 4}


def test_the_champion_is_read_again_each_time(tmp_path):
    """Another worker's gate moves the alias during the sweep: the old champion's adapter may go, the new one stays."""
    study, dirs = _study(tmp_path, [(3.0, TrialState.COMPLETE), (1.0, TrialState.COMPLETE),
                                    (4.0, TrialState.COMPLETE), (5.0, TrialState.COMPLETE)])  # fmt: skip
    champion = ["run2"]
    budget = _AdapterBudget(keep=1, champion_run=lambda: champion[0])
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

    _AdapterBudget(keep=1, champion_run=unreadable)(study, study.trials[-1])
    assert _kept(dirs) == {0, 1}, "the champion could be trial 1's: nothing goes while it cannot be read"
