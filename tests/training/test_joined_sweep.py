"""``speed.trials_per_worker``: trials trained at once in one worker, over one base model, their steps joined.

Real ``sweep run``s on the tiny model in bf16 under CPU autocast (the GPU's dtypes): three trials that differ in
learning rate, LoRA rank and batch size, once three at a time in one resident worker, once one after another
through the same worker path. Each trial's training loss at every step, and its validation curve, must agree
within bf16 tolerance: a trial's result does not depend on the trials it was trained beside. The learning rates
stay below 3e-3: at 1e-2 the bf16 rounding differences of the larger joined products grew step by step to 4 % by
step 9 (the first steps equal), which no tolerance can tell from an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from optuna.trial import TrialState

from sweep import study as study_mod
from sweep.spec import load_spec
from tests.conftest import write_spec
from tests.training.test_cpu_amp import bf16_model  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

VALUES = [
    {"lr": 3e-3, "lora_r": 16, "batch_size": 4},
    {"lr": 2e-3, "lora_r": 8, "batch_size": 2},
    {"lr": 5e-4, "lora_r": 8, "batch_size": 1},
]
SPACE = """search_space:
  lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
  lora_r: {type: categorical, choices: [8, 16]}
  batch_size: {type: categorical, choices: [1, 2, 4]}"""


def _sweep(ws: Path, model: Path, n_jobs: int) -> list:
    spec = load_spec(
        write_spec(
            ws, model, study="study: joined", n_trials="n_trials: 3\ncpu_amp: true\nspeed: {trials_per_worker: 3}",
            fixed="fixed: {max_length: 64, max_iters: 12, accumulative_counts: 1, lora_alpha_ratio: 2.0, lora_dropout: 0.1}",
            search_space=SPACE, eval_every="eval_every: 16",
            pruner="pruner: {type: median, n_startup_trials: 10, n_warmup_steps: 0}",
            registry="registry: {name: joined-model}",
        )
    )  # fmt: skip
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{ws / 'sweep.db'}", tracking_uri=f"sqlite:///{ws / 'mlflow.db'}",
        work_dir=ws / "runs", n_jobs=n_jobs,
    )  # fmt: skip
    st = study_mod.open_study(spec, opts.storage)
    for values in VALUES:
        st.enqueue_trial(values)
    study_mod.run(spec, opts)
    return sorted(study_mod.open_study(spec, opts.storage).trials, key=lambda t: t.number)


def _events(trial) -> list[dict]:
    stream = Path(trial.user_attrs["work_dir"]) / "sweep_metrics.jsonl"
    return [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bf16_model):  # noqa: F811 - the imported fixture
    together = _sweep(tmp_path_factory.mktemp("together"), bf16_model, n_jobs=3)
    alone = _sweep(tmp_path_factory.mktemp("alone"), bf16_model, n_jobs=1)
    return together, alone


def test_trials_trained_together_complete_in_one_worker_with_joined_steps(runs):
    together, _ = runs
    assert [t.state for t in together] == [TrialState.COMPLETE] * 3, [t.user_attrs.get("error") for t in together]
    assert len({t.user_attrs["worker"]["pid"] for t in together}) == 1, "one worker trained all three"
    starts = [next(e for e in _events(t) if e["kind"] == "start") for t in together]
    assert all(s["joined_steps"] for s in starts)
    ends = [next(e for e in _events(t) if e["kind"] == "end") for t in together]
    assert max(s["time"] for s in starts) < min(e["time"] for e in ends), "all three were training at once"
    passes = [e["joined"] for e in ends]  # where each trial's joined steps went (cotrain.PassStats)
    assert all(p["passes"] > 0 and p["rows_per_pass"] > 0 for p in passes), passes
    assert max(p["trials_per_pass"] for p in passes) > 1, f"no pass had two trials in it: {passes}"
    for t in together:  # each job's own output in its own log
        log = (Path(t.user_attrs["work_dir"]) / "train.log").read_text()
        assert str(Path(t.user_attrs["work_dir"])) in log
        others = [o for o in together if o.number != t.number]
        assert all(str(Path(o.user_attrs["work_dir"])) not in log for o in others)


def test_a_trial_trained_beside_others_gives_what_it_gives_alone(runs):
    together, alone = runs
    for mine, solo in zip(together, alone, strict=True):
        assert mine.params == solo.params
        curves = [{e["iter"]: e["train/loss"] for e in _events(t) if e["kind"] == "train"} for t in (mine, solo)]
        assert curves[0].keys() == curves[1].keys() and len(curves[0]) == 12
        for step, loss in curves[1].items():
            assert curves[0][step] == pytest.approx(loss, rel=2e-2, abs=2e-2), f"trial {mine.number} step {step}"
        vals = [{e["step"]: e["val/loss"] for e in _events(t) if e["kind"] == "val"} for t in (mine, solo)]
        assert vals[0].keys() == vals[1].keys()
        for step, loss in vals[1].items():
            assert vals[0][step] == pytest.approx(loss, rel=2e-2), f"trial {mine.number} val step {step}"
    last = [[e["train/loss"] for e in _events(t) if e["kind"] == "train"][-1] for t in together]
    assert len(set(last)) == 3, "the three trials learn differently"
