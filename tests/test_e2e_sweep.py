"""End-to-end: one real sweep on the tiny model (the `e2e` fixture), checked against the real stores."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from objectives.selection import DEFAULT_KEEP, Point, kept_point
from sweep.data import row_key

pytestmark = pytest.mark.e2e


def _client(e2e) -> MlflowClient:
    return MlflowClient(tracking_uri=e2e["opts"].tracking_uri, registry_uri=e2e["opts"].tracking_uri)


def _trial(e2e, number):
    return next(t for t in e2e["study"].trials if t.number == number)


def test_states_of_the_planned_trials(e2e):
    states = {t.number: t.state for t in e2e["study"].trials}
    assert states[0] == TrialState.COMPLETE
    assert states[1] == TrialState.FAIL
    assert states[2] == TrialState.PRUNED
    assert states[3] in (TrialState.COMPLETE, TrialState.PRUNED), "the sweep must go on after a failed trial"


def test_failed_trial_records_the_error_tail(e2e):
    failed = _trial(e2e, 1)
    assert "injected training failure for the test" in failed.user_attrs["error"]
    run = _client(e2e).get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "injected training failure" in run.data.tags["error"]


def test_pruned_trial_stops_early_and_keeps_its_adapter(e2e):
    pruned = _trial(e2e, 2)
    done = _trial(e2e, 0)
    assert max(pruned.intermediate_values) < max(done.intermediate_values), "pruned trial trained to the end"
    adapter = Path(pruned.user_attrs["adapter_path"])
    assert (adapter / "adapter_config.json").is_file()
    arts = {a.path for a in _client(e2e).list_artifacts(pruned.user_attrs["mlflow_run_id"], "best_adapter")}
    assert "best_adapter/adapter_config.json" in arts


def _points(t) -> list[Point]:
    """The trial's val/loss points with their standard errors, from its stream."""
    events = [json.loads(x) for x in (Path(t.user_attrs["work_dir"]) / "sweep_metrics.jsonl").open()]
    return [Point(e["step"], e["val/loss"], e["val/loss_se"]) for e in events if e["kind"] == "val"]


def test_value_is_the_kept_validation_point_and_adapter_is_kept(e2e):
    """The trial is worth the point its keep rule keeps (the rule the hook saved the adapter by)."""
    rule = e2e["spec"].objective.keep
    assert rule == DEFAULT_KEEP
    for t in e2e["study"].trials:
        if t.state != TrialState.COMPLETE:
            continue
        kept = kept_point(_points(t), "minimize", rule)
        assert t.value == pytest.approx(kept.value) == pytest.approx(t.intermediate_values[kept.step])
        assert t.user_attrs["best_step"] == kept.step and t.user_attrs["keep_rule"] == rule
        assert (Path(t.user_attrs["adapter_path"]) / "adapter_model.safetensors").is_file()


def test_kept_step_is_within_the_noise_of_the_best(e2e):
    """The kept point is never worse than the best one by more than its own standard error, and no later point is
    within its noise of the best (else the rule would have kept that one)."""
    for t in e2e["study"].trials:
        if t.state != TrialState.COMPLETE:
            continue
        points = _points(t)
        best = min(p.value for p in points)
        kept = next(p for p in points if p.step == t.user_attrs["best_step"])
        assert kept.se > 0 and kept.value - best <= kept.se
        assert all(p.value - best > p.se for p in points if p.step > kept.step)
    # the hook's own record agrees with Optuna's
    for t in e2e["study"].trials:
        if t.state == TrialState.COMPLETE:
            events = [json.loads(x) for x in (Path(t.user_attrs["work_dir"]) / "sweep_metrics.jsonl").open()]
            end = next(e for e in events if e["kind"] == "end")
            assert end["best_step"] == t.user_attrs["best_step"]


def test_checkpoints_on_disk_are_bounded(e2e):
    keep = e2e["spec"].keep_checkpoints
    for t in e2e["study"].trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            work = Path(t.user_attrs["work_dir"])
            regular = [p for p in work.glob("iter_*.pth")]
            best = list(work.glob("best_*.pth"))
            assert len(regular) <= keep
            assert len(best) == 1


def test_no_held_out_row_reaches_training(e2e):
    data = Path(e2e["first"]["best"]["adapter_path"]).parents[1] / "data"
    held = {row_key(json.loads(x)) for name in ("val", "test", "general_val") for x in (data / f"{name}.jsonl").open()}
    assert held
    for t in e2e["study"].trials:
        work = Path(t.user_attrs["work_dir"])
        keys = {row_key(json.loads(x)) for x in (work / "rows.jsonl").open()}
        assert keys and not (keys & held), f"trial {t.number} trains on held-out rows"
        tokens = [json.loads(x) for x in (work / "train.jsonl").open()]  # tokenize_once: the same rows, as tokens
        assert len(tokens) == len(keys) and set(tokens[0]) == {"input_ids", "labels"}
    mixed = Path(_trial(e2e, 0).user_attrs["work_dir"]) / "rows.jsonl"
    general = {row_key(json.loads(x)) for x in (data / "general_train.jsonl").open()}
    assert {row_key(json.loads(x)) for x in mixed.open()} & general, "mix_ratio 0.2 mixed no general rows in"


def test_mlflow_parent_and_child_runs(e2e):
    client = _client(e2e)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("xtuner_sweep.role") == "study"]
    assert len(parents) == 1, "a second `sweep run` must continue the same parent run"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(e2e["study"].trials)
    assert parent.data.params["data_digest"] == e2e["study"].user_attrs["data_digest"]
    assert "data_hash.val" in parent.data.tags
    assert parent.data.tags["fit_suggestion"] == e2e["second"]["fit"]["suggestion"]
    complete = client.get_run(_trial(e2e, 0).user_attrs["mlflow_run_id"])
    assert complete.data.tags["state"] == "COMPLETE"
    assert complete.data.tags["best_step"] == str(_trial(e2e, 0).user_attrs["best_step"])
    assert complete.data.tags["fit"] == _trial(e2e, 0).user_attrs["fit"]["label"]
    assert complete.data.tags["keep_rule"] == DEFAULT_KEEP
    for key in ("lr", "lora_r", "lora_alpha", "max_epochs", "batch_size", "mix_ratio", "max_length"):
        assert key in complete.data.params
    hist = client.get_metric_history(complete.info.run_id, "val/loss")
    assert sorted(m.step for m in hist) == sorted(_trial(e2e, 0).intermediate_values)
    stream = Path(_trial(e2e, 0).user_attrs["work_dir"]) / "sweep_metrics.jsonl"
    iterations = sum('"kind": "train"' in line for line in stream.read_text().splitlines())
    for key in ("train/loss", "train/lr", "perf/tokens_per_sec", "perf/memory_mb"):
        # sent in batches, every iteration arrives (the last ones when training ends)
        assert len(client.get_metric_history(complete.info.run_id, key)) == iterations > 3, key
    arts = {a.path for a in client.list_artifacts(complete.info.run_id, "xtuner")}
    assert "xtuner/config.py" in arts
    assert client.list_artifacts(complete.info.run_id, "logs")


def test_second_run_adds_trials_to_the_same_study(e2e):
    assert e2e["trials_after_first"] == 4
    assert len(e2e["study"].trials) == 5
    assert sum(e2e["second"]["counts"].values()) == 5 and e2e["second"]["counts"]["COMPLETE"] >= 1


def test_champion_is_registered_and_answers(e2e):
    client = _client(e2e)
    reg = e2e["second"]["registered"]
    assert reg["name"] == "e2e-model"
    mv = client.get_model_version_by_alias("e2e-model", "champion")
    best = e2e["study"].best_trial
    if reg["moved"]:  # the best trial by validation passed the test gate (or was already champion)
        assert reg["alias"] == "champion" and mv.run_id == best.user_attrs["mlflow_run_id"]
    else:  # it lost on the test split: registered without the alias, the champion kept
        assert reg["alias"] is None and str(mv.version) == reg["champion_version"]
    mlflow.set_tracking_uri(e2e["opts"].tracking_uri)
    mlflow.set_registry_uri(e2e["opts"].tracking_uri)  # another study's gate may have set it
    model = mlflow.pyfunc.load_model("models:/e2e-model@champion")
    answers = model.predict(["Who are you?", "你是谁？"])
    assert isinstance(answers, list) and len(answers) == 2
    assert all(isinstance(a, str) for a in answers)


def test_report_json_shape(e2e):
    rep = e2e["second"]
    assert rep["study"] == "e2e" and rep["direction"] == "minimize"
    assert rep["best"]["number"] == e2e["study"].best_trial.number
    assert set(rep["best"]) == {"number", "value", "values", "params", "best_step", "value_se", "fit", "mlflow_run_id",
                                "adapter_path", "at_best", "group_best_steps", "feasible"}  # fmt: skip
    assert rep["best"]["value_se"] > 0 and rep["best"]["fit"]["verdict"] in ("under-fitted", "over-fitted", "converged")
    assert rep["fit"]["keep"] == DEFAULT_KEEP and rep["fit"]["suggestion"]
    assert rep["fit"]["trials"][str(rep["best"]["number"])] == rep["best"]["fit"]["label"]
    assert rep["best"]["values"] == {"val/loss": rep["best"]["value"]} and rep["best"]["feasible"]
    assert rep["best"]["at_best"]["val/loss"] == rep["best"]["value"] and "val/repetition" in rep["best"]["at_best"]


def test_trials_really_learn(e2e):
    """Guards the warm-up fix: on small data XTuner's warm-up once left the learning rate at 1e-5 of itself."""
    learned, untouched = _trial(e2e, 0), _trial(e2e, 2)  # lr 1e-2 vs lr 1e-6
    assert learned.value < untouched.value - 0.5


def test_answers_are_scored_and_probe_samples_logged(e2e):
    client = _client(e2e)
    t = _trial(e2e, 0)
    run_id = t.user_attrs["mlflow_run_id"]
    rouge = client.get_metric_history(run_id, "val/rouge_l")
    assert sorted(m.step for m in rouge) == sorted(t.intermediate_values)
    assert all(0.0 <= m.value <= 1.0 for m in rouge)
    table = json.loads(Path(client.download_artifacts(run_id, "samples.json")).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert {r["step"] for r in rows} == set(t.intermediate_values), "probes answered at every validation point"
    assert {r["question"] for r in rows} == {"Who are you?", "你是谁？"}
    assert len(rows) == 2 * len(t.intermediate_values), "each answer logged once"
    assert 0 in {r["step"] for r in rows}, "answers before training are logged too"
    assert 0 < t.user_attrs["val_share"] < 1


def test_forgetting_is_measured_on_general_rows(e2e):
    """val/general_loss: the held-out general chat rows, scored at every validation point."""
    client = _client(e2e)
    t = _trial(e2e, 0)
    general = client.get_metric_history(t.user_attrs["mlflow_run_id"], "val/general_loss")
    assert sorted(m.step for m in general) == sorted(t.intermediate_values)
    assert all(math.isfinite(m.value) and m.value > 0 for m in general)
    task = {m.step: m.value for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "val/loss")}
    assert any(abs(m.value - task[m.step]) > 1e-3 for m in general), "a different set of rows than val/loss"


def test_first_champion_passes_the_gate_with_test_metrics(e2e):
    client = _client(e2e)
    mv = client.get_model_version_by_alias("e2e-model", "champion")
    assert mv.tags["gate"] == "passed"
    assert math.isfinite(float(mv.tags["test/loss"])) and 0.0 <= float(mv.tags["test/rouge_l"]) <= 1.0
    parent = e2e["study"].user_attrs["mlflow_parent_run_id"]
    assert client.get_metric_history(parent, "test/loss"), "test metrics on the study's parent run"
    trial_run = client.get_run(mv.run_id)
    assert "test/loss" in trial_run.data.metrics


def test_report_writes_plots_and_importances_and_logs_them(e2e, tmp_path, capsys):
    from sweep import cli

    opts = e2e["opts"]
    rc = cli.main(["report", "e2e", "--storage", opts.storage, "--tracking-uri", opts.tracking_uri,
                   "--plots", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert (tmp_path / f"{name}.html").stat().st_size > 1000, name
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert "parameter importances for val/loss (fANOVA):" in out
    shares = [float(m) for m in re.findall(r"^  \S+\s+([0-9.]+)%", out, flags=re.M)]
    assert len(shares) == 3 and abs(sum(shares) - 100) < 1.0, out  # lr, lora_r, mix_ratio
    client = _client(e2e)
    parent = e2e["study"].user_attrs["mlflow_parent_run_id"]
    logged = {a.path for a in client.list_artifacts(parent, "plots")}
    assert {"plots/param_importances.png", "plots/optimization_history.html"} <= logged
    assert set(json.loads(Path(client.download_artifacts(parent, "importances.json")).read_text())) == {
        "lr",
        "lora_r",
        "mix_ratio",
    }


def test_the_demo_rows_groups_are_measured_apart(e2e):
    """The demo's task rows are `identity` or `facts`: every metric per group at every point, each trial's best step
    per group, and the group of each answer in the validation answers' table."""
    client = _client(e2e)
    t = _trial(e2e, 0)
    run_id = t.user_attrs["mlflow_run_id"]
    for metric in ("loss", "rouge_l", "repetition", "no_stop"):
        for group in ("identity", "facts"):
            history = client.get_metric_history(run_id, f"val/{metric}/{group}")
            assert sorted(m.step for m in history) == sorted(t.intermediate_values), (metric, group)
    identity = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss/identity")}
    facts = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss/facts")}
    assert all(min(identity[s], facts[s]) <= v <= max(identity[s], facts[s]) for s, v in t.intermediate_values.items())
    recorded = t.user_attrs["group_best_steps"]
    assert recorded["metric"] == "val/loss" and recorded["steps"] == {
        "identity": min(identity, key=lambda s: (identity[s], s)), "facts": min(facts, key=lambda s: (facts[s], s))
    }  # fmt: skip
    table = json.loads(Path(client.download_artifacts(run_id, "val_answers.json")).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert {r["group"] for r in rows if r["step"] == 0} == {"identity", "facts"}
    assert set(e2e["second"]["groups"]["steps"]) == {"facts", "identity"}


def test_report_table_shows_a_pruned_trial_at_its_best_point(e2e):
    """Optuna keeps a pruned trial's last point as its value; the table shows the point its adapter was kept at."""
    from sweep.report import trials_table

    pruned = _trial(e2e, 2)
    row = next(line.split() for line in trials_table(e2e["study"]).splitlines()[2:] if line.split()[0] == "2")
    assert row[1] == "PRUNED" and float(row[2]) == pytest.approx(pruned.user_attrs["best_value"], rel=1e-3)
    assert float(row[3]) == pytest.approx(pruned.user_attrs["best_value_se"], rel=1e-3)
    assert int(row[4]) == pruned.user_attrs["best_step"]
