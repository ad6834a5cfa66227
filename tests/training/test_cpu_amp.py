"""A GPU's dtypes on the CPU: a bf16 checkpoint, trained under bf16 autocast (``cpu_amp: true``), end to end.

On the CPU a sweep otherwise trains in fp32, where 16-bit frozen weights never meet fp32 activations: CI
stayed green while every LoRA trial of a bf16 model crashed on a GPU at its step-0 validation. These
trials run the GPU's path (bf16 weights, PEFT's fp32 upcast, ``speed.frozen_weights_16bit`` putting the
frozen weights back in bf16, autocast in the steps) through validation with generation and probes, the
shared baseline, a resident worker that reuses the model, the test gate and the champion's pyfunc.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from objectives.selection import DEFAULT_KEEP, Point, kept_point
from sweep import study as study_mod
from sweep.registry.tracking import Tracker
from sweep.spec import load_spec
from sweep.xtuner.config import load_config
from tests.conftest import write_spec

pytestmark = pytest.mark.e2e

VALUES = [{"lr": 1e-2, "lora_r": 16, "mix_ratio": 0.2}, {"lr": 3e-3, "lora_r": 8, "mix_ratio": 0.1}]
PROBES = 'probes: ["Who are you?", "你是谁？"]\ngeneration: {max_new_tokens: 8, max_rows: 4}'


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model stored in bf16, as real checkpoints (Qwen2, InternLM2) are."""
    out = tmp_path_factory.mktemp("bf16") / "model"
    shutil.copytree(tiny_model, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    return out


def _sweep(ws: Path, model: Path, speed: str, n_trials: int) -> dict:
    spec = load_spec(
        write_spec(
            ws, model, study="study: amp", n_trials=f"n_trials: {n_trials}\n{PROBES}\ncpu_amp: true\n{speed}",
            registry="registry: {name: amp-model}",
        )
    )  # fmt: skip
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{ws / 'sweep.db'}", tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", work_dir=ws / "runs"
    )
    st = study_mod.open_study(spec, opts.storage)
    for values in VALUES[:n_trials]:
        st.enqueue_trial(values)
    calls: list[str] = []
    original = Tracker.log_metrics

    def counted(self, run_id, rows):
        calls.append(run_id)
        return original(self, run_id, rows)

    with pytest.MonkeyPatch.context() as mp:  # a spy: MLflow still receives every metric
        mp.setattr(Tracker, "log_metrics", counted)
        report = study_mod.run(spec, opts)
    return {"report": report, "opts": opts, "study": study_mod.open_study(spec, opts.storage), "calls": calls}


def _events(trial) -> list[dict]:
    stream = Path(trial.user_attrs["work_dir"]) / "sweep_metrics.jsonl"
    return [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]


def _val_curve(trial) -> dict[int, float]:
    return {e["step"]: e["val/loss"] for e in _events(trial) if e["kind"] == "val"}


@pytest.fixture(scope="module")
def amp(tmp_path_factory, bf16_model):
    """Two trials with every speed setting on (and activation checkpointing), and trial 0 again with the
    frozen weights left in PEFT's fp32."""
    on = _sweep(tmp_path_factory.mktemp("amp-on"), bf16_model, "speed: {activation_checkpointing: 'on'}", 2)
    off = _sweep(tmp_path_factory.mktemp("amp-off"), bf16_model, "speed: {frozen_weights_16bit: false}", 1)
    return {"on": on, "off": off}


def test_every_trial_trains_in_bf16_and_completes(amp):
    trials = amp["on"]["study"].trials
    errors = [t.user_attrs.get("error") for t in trials]
    assert trials[0].state == TrialState.COMPLETE, errors
    assert trials[1].state in (TrialState.COMPLETE, TrialState.PRUNED), errors  # the median pruner had its say
    for t in trials:
        config = load_config(Path(t.user_attrs["work_dir"]) / "config.py")
        assert config.optim_wrapper.type == "sweep.training.amp.CpuAmpOptimWrapper"
        assert config.model.llm.torch_dtype == "bfloat16"
        start = next(e for e in _events(t) if e["kind"] == "start")
        assert start["frozen_weights_16bit"] > 0, "the frozen weights went back to bf16"
        # the set-up's marks, in order: the job reached the worker after its slot, then the runner, then the loop
        began = t.user_attrs["train_started_at"]
        assert began <= start["job_began"] <= start["runner_built"] <= start["time"], (began, start)
    assert trials[1].user_attrs["worker"]["model_reused"], "the second trial reused the worker's bf16 model"


def test_validation_generation_and_probes_run_at_every_point(amp):
    for t in amp["on"]["study"].trials:
        events = _events(t)
        vals = [e for e in events if e["kind"] == "val"]
        assert vals[0]["step"] == 0 and len(vals) >= 2
        assert all(math.isfinite(e["val/loss"]) and math.isfinite(e["val/general_loss"]) for e in vals)
        assert all(0.0 <= e["val/rouge_l"] <= 1.0 for e in vals)
        samples = [e for e in events if e["kind"] == "samples"]
        assert {e["step"] for e in samples} == {e["step"] for e in vals}
        assert all(len(e["rows"]) == 2 for e in samples)
    second = _events(amp["on"]["study"].trials[1])
    assert next(e for e in second if e["kind"] == "val")["baseline"] == "cached", "step 0 shared, as on a GPU"


def test_every_point_carries_its_noise_and_the_kept_adapter_follows_the_keep_rule(amp):
    """Under bf16 autocast the hook logs each point's standard errors and keeps the adapter of the point that
    ``objective.keep``'s rule keeps; the trial's value is that point's, as the sweep side reads it too."""
    for t in amp["on"]["study"].trials:
        if t.state != TrialState.COMPLETE:
            continue
        events = _events(t)
        vals = [e for e in events if e["kind"] == "val"]
        for key in ("val/loss_se", "val/general_loss_se", "val/rouge_l_se"):
            assert all(math.isfinite(e[key]) and e[key] >= 0 for e in vals), key
        assert all(e["val/loss_se"] > 0 for e in vals)
        rule = t.user_attrs["keep_rule"]
        kept = kept_point([Point(e["step"], e["val/loss"], e["val/loss_se"]) for e in vals], "minimize", rule)
        end = next(e for e in events if e["kind"] == "end")
        assert end["best_step"] == kept.step == t.user_attrs["best_step"] == vals[-1]["best_step"]
        assert t.value == pytest.approx(kept.value) and t.user_attrs["best_value_se"] == pytest.approx(kept.se)
        assert rule == DEFAULT_KEEP  # the spec names no rule


def test_frozen_weights_in_16bit_do_not_change_the_math(amp):
    """The same trial with the frozen weights in bf16 and in PEFT's fp32: under autocast both multiply
    the same bf16 values, so every validation point agrees within bf16 tolerance."""
    with_16bit = _val_curve(amp["on"]["study"].trials[0])
    with_fp32 = _val_curve(amp["off"]["study"].trials[0])
    assert with_16bit.keys() == with_fp32.keys()
    for step, loss in with_fp32.items():
        assert with_16bit[step] == pytest.approx(loss, rel=1e-2), f"val/loss at step {step}"
    start = next(e for e in _events(amp["off"]["study"].trials[0]) if e["kind"] == "start")
    assert start["frozen_weights_16bit"] == 0


def test_gate_scores_in_bf16_and_the_champion_answers_in_bf16(amp):
    report = amp["on"]["report"]
    assert report["registered"]["alias"] == "champion"
    client = mlflow.MlflowClient(amp["on"]["opts"].tracking_uri, registry_uri=amp["on"]["opts"].tracking_uri)
    version = client.get_model_version_by_alias("amp-model", "champion")
    assert math.isfinite(float(version.tags["test/loss"])) and "test/rouge_l" in version.tags
    mlflow.set_tracking_uri(amp["on"]["opts"].tracking_uri)
    mlflow.set_registry_uri(amp["on"]["opts"].tracking_uri)  # another study's gate may have set it
    champion = mlflow.pyfunc.load_model("models:/amp-model@champion")
    answers = champion.predict(["Who are you?", "你是谁？"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    inner = champion.unwrap_python_model().model
    assert next(inner.get_base_model().model.layers[0].mlp.parameters()).dtype == torch.bfloat16


def test_training_metrics_reach_mlflow_in_batches(amp):
    """Not one MLflow call per 0.2 s poll: at most one per validation point, one per METRIC_INTERVAL_S of
    training, and a last one, per trial (plus the trial's `best/` metric)."""
    from sweep.trial.run import METRIC_INTERVAL_S

    all_calls = all_iterations = 0
    for t in amp["on"]["study"].trials:
        run_id = t.user_attrs["mlflow_run_id"]
        events = _events(t)
        points = sum(e["kind"] == "val" for e in events)
        iterations = sum(e["kind"] == "train" for e in events)
        seconds = next(e["time"] for e in events if e["kind"] == "end") - events[0]["time"]
        calls = amp["on"]["calls"].count(run_id)
        assert calls <= points + seconds / METRIC_INTERVAL_S + 3, (calls, points, iterations, seconds)
        all_calls, all_iterations = all_calls + calls, all_iterations + iterations
    # on a loaded machine a trial's bound can pass its iteration count; over the study, batching must show
    assert all_calls < all_iterations, (all_calls, all_iterations)
