"""The test gate with real registry calls: a worse model never takes the alias, a better one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep import cli
from sweep.registry.gate import CHAMPION, gate_trial
from sweep.registry.tracking import Tracker

pytestmark = pytest.mark.e2e
NAME = "e2e-model"


def _trial(e2e, number):
    return next(t for t in e2e["study"].trials if t.number == number)


def _data_dir(e2e) -> Path:
    return Path(e2e["study"].user_attrs["work_dir"]) / "data"


def test_gate_keeps_the_champion_against_a_worse_model(e2e):
    opts = e2e["opts"]
    client = MlflowClient(opts.tracking_uri, opts.tracking_uri)
    before = client.get_model_version_by_alias(NAME, CHAMPION)
    barely_trained = _trial(e2e, 2)  # lr 1e-6: its adapter is close to the untrained model
    parent = e2e["study"].user_attrs["mlflow_parent_run_id"]
    result = gate_trial(barely_trained, e2e["spec"], Tracker(opts.tracking_uri), _data_dir(e2e), parent)

    assert result is not None and not result.moved
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == before.version, "alias untouched"
    assert result.champion_version == str(before.version)
    assert result.candidate["test/loss"] > result.champion["test/loss"]
    mv = client.get_model_version(NAME, result.version)
    assert mv.run_id == barely_trained.user_attrs["mlflow_run_id"], "registered all the same, for the record"
    assert mv.tags["gate"] == "kept previous champion"
    assert "does not beat" in mv.tags["gate_reason"] and f"version {before.version}" in mv.tags["gate_reason"]
    assert float(mv.tags["test/loss"]) == pytest.approx(result.candidate["test/loss"], rel=1e-5)


def test_sweep_promote_moves_the_alias_to_a_better_model(e2e, capsys):
    opts = e2e["opts"]
    client = MlflowClient(opts.tracking_uri, opts.tracking_uri)
    worse = Tracker(opts.tracking_uri).version_of_run(NAME, _trial(e2e, 2).user_attrs["mlflow_run_id"])
    if worse is None:  # this test run alone: register the worse model first, through the gate
        gate_trial(_trial(e2e, 2), e2e["spec"], Tracker(opts.tracking_uri), _data_dir(e2e), None)
        worse = Tracker(opts.tracking_uri).version_of_run(NAME, _trial(e2e, 2).user_attrs["mlflow_run_id"])
    client.set_registered_model_alias(NAME, CHAMPION, worse.version)  # as if the weak model were champion

    rc = cli.main(["promote", "e2e", "--storage", opts.storage, "--tracking-uri", opts.tracking_uri, "--json"])
    out = json.loads(capsys.readouterr().out)

    assert rc == 0 and out["moved"] and out["champion_version"] == str(worse.version)
    now = client.get_model_version_by_alias(NAME, CHAMPION)
    assert str(now.version) == out["version"] != str(worse.version)
    assert now.run_id == e2e["study"].best_trial.user_attrs["mlflow_run_id"]
    assert out["test"]["test/loss"] < out["champion_test"]["test/loss"]
    assert client.get_model_version(NAME, now.version).tags["gate"] == "passed"
