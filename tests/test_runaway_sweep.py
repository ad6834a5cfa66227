"""End to end, in a GPU's dtypes on the CPU (``cpu_amp: true``): repetition and runaway answers measured at every
validation point, validation rows in two groups (one file per group), and ``objective.at_most`` limits.

Both train one epoch on the task alone. Trial 0 trains hard (lr 1e-2): the better task loss, and general chat
forgotten (val/general_loss above 4.5 from its first point on, the untrained model's about 2.0). Trial 1 barely
moves (lr 1e-6): the untrained model's losses. The limit ``val/general_loss <= 3.0`` makes trial 0 infeasible, so trial 1
is the champion although trial 0 is better on the objective; ``val/repetition <= 1.0`` always holds and is
recorded all the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import optuna
import pytest

from objectives.repetition import repeats
from sweep import study as study_mod
from sweep.report import study_report, trials_table
from sweep.spec import load_spec
from tests.conftest import ROOT, write_spec

pytestmark = pytest.mark.e2e
GROUPS = ("facts", "identity")
LIMITS = "at_most: {val/general_loss: 3.0, val/repetition: 1.0}"


@pytest.fixture(scope="module")
def runaway(tmp_path_factory, tiny_model):
    ws = tmp_path_factory.mktemp("runaway")
    rows = [json.loads(line) for line in (ROOT / "data/demo/task.jsonl").read_text(encoding="utf-8").splitlines()]
    held = {g: [r for r in rows if r["group"] == g][:6] for g in GROUPS}  # 12 validation rows, 4 of them answered
    for g, part in held.items():  # the rows as a user's per-group file holds them: no group key of their own
        (ws / f"val_{g}.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in part))
    (ws / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r not in held[r["group"]]))
    data = (f"data:\n  task: task.jsonl\n  general: {ROOT / 'data/demo/general.jsonl'}\n"
            "  val: {facts: val_facts.jsonl, identity: val_identity.jsonl}\n  test: 0.1\n  seed: 0")  # fmt: skip
    spec = load_spec(
        write_spec(
            ws, tiny_model, study="study: runaway", data=data, registry="registry: {name: runaway-model}",
            fixed="fixed: {max_length: 64, max_epochs: 1, batch_size: 4, accumulative_counts: 1, lora_r: 8, "
            "lora_alpha_ratio: 2.0, mix_ratio: 0.0}",
            search_space="search_space:\n  lr: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}",
            pruner="pruner: {type: none}", eval_every="eval_every: 48",
            n_trials=f"n_trials: 2\ncpu_amp: true\nobjective: {{metric: val/loss, {LIMITS}}}\n"
            'probes: ["你是谁？"]\ngeneration: {max_new_tokens: 8, max_rows: 4}',
        )
    )  # fmt: skip
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{ws / 'sweep.db'}", tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", work_dir=ws / "runs"
    )
    st = study_mod.open_study(spec, opts.storage)
    st.enqueue_trial({"lr": 1e-2})
    st.enqueue_trial({"lr": 1e-6})
    report = study_mod.run(spec, opts)
    study = optuna.load_study(study_name="runaway", storage=opts.storage)
    client = mlflow.MlflowClient(opts.tracking_uri, registry_uri=opts.tracking_uri)
    return {"report": report, "study": study, "client": client, "opts": opts}


def _vals(trial) -> list[dict]:
    stream = Path(trial.user_attrs["work_dir"]) / "sweep_metrics.jsonl"
    events = [json.loads(line) for line in stream.read_text(encoding="utf-8").splitlines()]
    return [e for e in events if e["kind"] == "val"]


def _table(client, trial, name: str) -> list[dict]:
    table = json.loads(Path(client.download_artifacts(trial.user_attrs["mlflow_run_id"], name)).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def test_both_trials_complete_in_bf16(runaway):
    trials = runaway["study"].trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], [t.user_attrs.get("error") for t in trials]


def test_runaway_and_group_metrics_at_every_point_in_the_stream_and_mlflow(runaway):
    client = runaway["client"]
    for t in runaway["study"].trials:
        vals = _vals(t)
        assert vals[0]["step"] == 0 and len(vals) >= 3
        run_id = t.user_attrs["mlflow_run_id"]
        for name in (
            "val/repetition",
            "val/no_stop",
            *(f"val/{m}/{g}" for m in ("loss", "rouge_l", "repetition", "no_stop") for g in GROUPS),
        ):
            assert all(0.0 <= e[name] < math.inf for e in vals), name
            history = client.get_metric_history(run_id, name)
            assert sorted(m.step for m in history) == [e["step"] for e in vals], name
        for e in vals:  # the token-weighted mean over all rows lies between the groups' own
            assert (
                min(e["val/loss/facts"], e["val/loss/identity"])
                <= e["val/loss"]
                <= max(e["val/loss/facts"], e["val/loss/identity"])
            )
            assert e["val/loss/facts"] != e["val/loss/identity"]
    assert "val/general_loss/facts" not in _vals(runaway["study"].trials[0])[0], "general chat rows have no groups"


def test_answer_tables_flag_each_answer_and_show_its_group(runaway):
    client, trial = runaway["client"], runaway["study"].trials[0]
    vals = {e["step"]: e for e in _vals(trial)}
    answers = _table(client, trial, "val_answers.json")
    assert {r["step"] for r in answers} == set(vals) and len(answers) == 4 * len(vals)
    for step, point in vals.items():
        rows = [r for r in answers if r["step"] == step]
        assert sorted(r["group"] for r in rows) == ["facts"] * 2 + ["identity"] * 2
        assert all(r["repeats"] == repeats(r["answer"]) for r in rows)
        assert point["val/repetition"] == pytest.approx(sum(r["repeats"] for r in rows) / 4)
        assert point["val/no_stop"] == pytest.approx(sum(r["no_stop"] for r in rows) / 4)
        identity = [r for r in rows if r["group"] == "identity"]
        assert point["val/no_stop/identity"] == pytest.approx(sum(r["no_stop"] for r in identity) / 2)
    probes = _table(client, trial, "samples.json")
    assert {r["step"] for r in probes} == set(vals) and {"repeats", "no_stop"} <= set(probes[0])
    assert all(r["repeats"] == repeats(r["answer"]) for r in probes)


def test_a_limit_marks_the_better_trial_infeasible_and_the_feasible_one_is_champion(runaway):
    hard, gentle = runaway["study"].trials
    assert hard.value < gentle.value - 0.5, "trial 0 is the better one on the objective"
    at_best = hard.user_attrs["metrics_at_best"]
    assert hard.constraints == {
        "oom": 0.0,
        "val/general_loss": pytest.approx(at_best["val/general_loss"] - 3.0),
        "val/repetition": pytest.approx(at_best["val/repetition"] - 1.0),
    }
    assert hard.constraints["val/general_loss"] > 0 and hard.user_attrs["infeasible"].startswith("val/general_loss=")
    assert all(v <= 0 for v in gentle.constraints.values()) and "infeasible" not in gentle.user_attrs
    report = runaway["report"]
    assert report["best"]["number"] == gentle.number and report["best"]["feasible"] is True
    registered = report["registered"]
    assert registered["moved"] and registered["alias"] == "champion"
    client = runaway["client"]
    version = client.get_model_version_by_alias("runaway-model", "champion")
    assert version.run_id == gentle.user_attrs["mlflow_run_id"]
    assert client.get_run(hard.user_attrs["mlflow_run_id"]).data.tags["infeasible"] == hard.user_attrs["infeasible"]
    for name in ("test/loss", "test/repetition", "test/no_stop", "test/loss/facts", "test/loss/identity"):
        assert math.isfinite(float(version.tags[name])), name


def test_report_shows_runaway_answers_infeasibility_and_each_groups_best_step(runaway):
    study = runaway["study"]
    table = trials_table(study)
    lines = table.splitlines()
    head = lines[0].split()
    assert head[:9] == ["#", "state", "value", "±se", "best_step", "last_step", "fit", "repetition", "no_stop"], table
    assert "best@facts" in head and "best@identity" in head
    assert lines[2].split()[1] == "COMPLETE!" and lines[3].split()[1] == "COMPLETE"
    assert "! infeasible: trial 0: val/general_loss=" in table
    report = study_report(study)
    steps = {t.number: t.user_attrs["group_best_steps"]["steps"] for t in study.trials}
    assert report["groups"]["metric"] == "val/loss" and report["groups"]["steps"] == {
        g: {n: s[g] for n, s in steps.items()} for g in GROUPS
    }
    for t in study.trials:
        curve = {e["step"]: e for e in _vals(t)}
        for g in GROUPS:
            best = min(e[f"val/loss/{g}"] for e in curve.values())
            assert curve[steps[t.number][g]][f"val/loss/{g}"] == best
    assert f"median over complete trials: facts {report['groups']['median_complete']['facts']:g}" in table
