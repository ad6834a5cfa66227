"""keep_adapters: only the best trials' adapters stay on disk (the champion's always)."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweep.study import _AdapterBudget


def test_only_the_best_adapters_stay(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    dirs = {}
    for number, (value, state) in enumerate([(3.0, TrialState.COMPLETE), (1.0, TrialState.COMPLETE),
                                             (2.0, TrialState.COMPLETE), (0.5, TrialState.PRUNED),
                                             (4.0, TrialState.COMPLETE)]):  # fmt: skip
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
    _AdapterBudget(keep=2, champion_run="run4")(study, study.trials[-1])
    kept = {n for n, d in dirs.items() if d.is_dir()}
    # completed trials rank before pruned ones; 1.0 and 2.0 are the best two; run4 is the registered champion
    assert kept == {1, 2, 4}
