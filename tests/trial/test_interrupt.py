"""A stop (Ctrl-C, SIGTERM) loses no trial's values: every claimed, unfinished trial is queued again."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from sweep import study as study_mod
from sweep.spec import load_spec
from sweep.trial import launcher
from tests.conftest import write_spec

pytestmark = pytest.mark.e2e
QUEUED = [{"lr": 1e-2}, {"lr": 5e-3}, {"lr": 2e-3}]


def test_a_stopped_sweep_resumes_with_every_queued_value(tmp_path, tiny_model):
    """The stop comes as the first queued trial is claimed (before it trains): at be84680 its values were
    failed and never queued again, so the resumed sweep ran two of the three."""
    fixed = "fixed: {max_length: 64, max_iters: 2, batch_size: 4, accumulative_counts: 1, lora_r: 8, mix_ratio: 0.1}"
    spec = load_spec(write_spec(tmp_path, tiny_model, n_trials="n_trials: 3", fixed=fixed, pruner="pruner: {type: none}", registry="",
                                search_space="search_space:\n  lr: {type: float, low: 1.0e-3, high: 2.0e-2, log: true}"))  # fmt: skip
    opts = study_mod.RunOptions(storage=f"sqlite:///{tmp_path / 'sweep.db'}",
                                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", work_dir=tmp_path / "runs")  # fmt: skip
    st = study_mod.open_study(spec, opts.storage)
    for values in QUEUED:
        st.enqueue_trial(values)
    launcher.STOP.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            study_mod.run(spec, opts)
    finally:
        launcher.STOP.clear()
    st = optuna.load_study(study_name="e2e", storage=opts.storage)
    waiting = [t.system_attrs["fixed_params"] for t in st.trials if t.state == TrialState.WAITING]
    assert sorted(v["lr"] for v in waiting) == sorted(v["lr"] for v in QUEUED), waiting

    study_mod.run(spec, opts)  # the same command again
    st = optuna.load_study(study_name="e2e", storage=opts.storage)
    done = [t for t in st.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in done) == sorted(v["lr"] for v in QUEUED)
    assert not [t for t in st.trials if t.state == TrialState.WAITING]
