"""A multi-objective study on the demo data: task loss against forgetting (loss on general chat rows).

The tiny model was pretrained on general chat, so learning the task raises its general loss: a
trial that trains hard on the task alone (low task loss, high general loss) and one that barely moves
from the pretrained model with general chat mixed in (the other way round) are both on the Pareto
front, by wide margins whatever the CPU's float rounding does to the curves. (Whether mixing alone
gives a trade-off depends on the run: with more rows per epoch the mixed trial may win on both.)
With ``keep_adapters: 1`` both adapters must stay on disk: every Pareto trial is a candidate a user may want.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sweep import study as study_mod
from sweep.report import trials_table
from sweep.spec import load_spec
from tests.conftest import write_spec

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pareto(tmp_path_factory, tiny_model):
    ws = tmp_path_factory.mktemp("pareto")
    spec = load_spec(
        write_spec(
            ws,
            tiny_model,
            study="study: pareto",
            n_trials="n_trials: 2\nkeep_adapters: 1\nobjective: {metrics: [val/loss, val/general_loss]}",
            search_space="search_space:\n  mix_ratio: {type: float, low: 0.0, high: 0.45}\n"
            "  lr: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}",
            fixed="fixed: {max_length: 64, max_epochs: 2, batch_size: 4, accumulative_counts: 1, lora_r: 8, "
            "lora_alpha_ratio: 2.0}",
            pruner="pruner: {type: none}",
            registry="registry: {name: pareto-model}",
        )
    )
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{ws / 'sweep.db'}", tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", work_dir=ws / "runs"
    )
    st = study_mod.open_study(spec, opts.storage)
    st.enqueue_trial({"mix_ratio": 0.0, "lr": 1e-2})  # task only, hard: best task loss, forgets general chat
    st.enqueue_trial({"mix_ratio": 0.45, "lr": 1e-5})  # mixed, gently: remembers general chat, learns little
    report = study_mod.run(spec, opts)
    return {"report": report, "study": optuna.load_study(study_name="pareto", storage=opts.storage)}


def test_front_has_more_than_one_trial(pareto):
    study, report = pareto["study"], pareto["report"]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    front = sorted(t.number for t in study.best_trials)
    assert front == [0, 1], [t.values for t in study.trials]
    assert [t["number"] for t in report["pareto"]] == front
    task_only, mixed = (next(t for t in study.trials if t.number == n) for n in (0, 1))
    assert task_only.values[0] < mixed.values[0] and task_only.values[1] > mixed.values[1], "a real trade-off"


def test_each_pareto_adapter_is_kept_and_values_match_it(pareto):
    for t in pareto["study"].best_trials:
        assert Path(t.user_attrs["adapter_path"], "adapter_model.safetensors").is_file(), (
            "kept despite keep_adapters: 1"
        )
        at_best = t.user_attrs["values_at_best"]
        assert [at_best["val/loss"], at_best["val/general_loss"]] == t.values, "both values from the adapter's step"


def test_champion_is_the_pareto_trial_best_on_the_first_metric(pareto):
    report = pareto["report"]
    assert report["best"]["number"] == 0 and report["registered"]["moved"]
    table = trials_table(pareto["study"])
    assert "val/general_loss" in table and "COMPLETE*" in table
