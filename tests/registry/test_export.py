"""Export and chat: the champion leaves the sweep as an adapter, a merged model, or answers in a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from sweep import cli

pytestmark = pytest.mark.e2e
CHAMPION = "models:/e2e-model@champion"


def _store_args(e2e) -> list[str]:
    return ["--storage", e2e["opts"].storage, "--tracking-uri", e2e["opts"].tracking_uri]


def _champion_trial(e2e):
    mv = MlflowClient(e2e["opts"].tracking_uri, e2e["opts"].tracking_uri).get_model_version_by_alias(
        "e2e-model", "champion"
    )
    return next(t for t in e2e["study"].trials if t.user_attrs.get("mlflow_run_id") == mv.run_id)


def test_export_adapter_and_merged_model(e2e, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli.main(["export", CHAMPION, "--adapter", str(adapter), "--merge", str(merged), *_store_args(e2e)]) == 0

    trained = Path(_champion_trial(e2e).user_attrs["adapter_path"])
    name = "adapter_model.safetensors"
    assert (adapter / name).read_bytes() == (trained / name).read_bytes(), "the champion's own adapter"

    model = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32)  # a plain HF model now
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(e2e["spec"].model.path, torch_dtype=torch.float32), str(trained)
    )
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=0.05, rtol=0.01), (got - want).abs().max()  # XTuner merges in fp16
    assert not torch.allclose(
        want, AutoModelForCausalLM.from_pretrained(e2e["spec"].model.path)(ids).logits, atol=0.05
    ), "the adapter changes the model, so the comparison above means something"


def test_export_refuses_a_non_empty_folder(e2e, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["export", "e2e", "--adapter", str(tmp_path), *_store_args(e2e)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_chat_answers_like_the_registered_model(e2e):
    question = "你是谁？"
    out = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "chat", CHAMPION, "--question", question, *_store_args(e2e)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    mlflow.set_tracking_uri(e2e["opts"].tracking_uri)
    mlflow.set_registry_uri(e2e["opts"].tracking_uri)  # another study's gate may have set it
    expected = mlflow.pyfunc.load_model(CHAMPION).predict([question])[0]
    assert out.stdout.strip() == expected.strip()
    # What the tiny model learns differs by CPU (its answer may even be empty), so the comparison is made
    # meaningful another way: the untrained model answered differently, so a chat that forgot the adapter fails.
    untrained = _answers_at_step_0(_champion_trial(e2e))[question]
    assert expected.strip() != untrained.strip(), "the champion answers like the untrained model"


def _answers_at_step_0(trial) -> dict[str, str]:
    """The probe answers the trial recorded before training (its metric stream's step-0 samples)."""
    stream = Path(trial.user_attrs["adapter_path"]).parent / "sweep_metrics.jsonl"
    events = (json.loads(line) for line in stream.read_text(encoding="utf-8").splitlines())
    samples = next(e for e in events if e["kind"] == "samples" and e["step"] == 0)
    return {row["question"]: row["answer"] for row in samples["rows"]}
