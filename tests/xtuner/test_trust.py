"""Remote code runs only where the user said so: the spec for its own model, a flag for a registered one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sweep.knobs import base_values, trial_values
from sweep.registry.export import Resolved, export, resolve
from sweep.registry.serving import log_chat_model
from sweep.registry.tracking import Tracker
from sweep.spec import SpecError, load_spec
from sweep.trial.protocol import TrialFiles
from sweep.xtuner.config import load_base_config
from sweep.xtuner.render import Device, render
from tests.conftest import ROOT

TEMPLATE = {"INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "STOP_WORDS": ["<|im_end|>"]}


def _rendered_trust(spec) -> set[bool]:
    base = load_base_config(spec.base_config)
    values = trial_values(spec, {"lr": 0.01}, base_values(base))
    files = TrialFiles(Path("/w/train.jsonl"), Path("/w/val.jsonl"), Path("/w"), 10)
    text = render(base, spec, values, files, Device(cuda=False))
    return {bool(v) for v in _values_of(text, "trust_remote_code")}


def _values_of(text: str, key: str) -> list:
    import ast

    found = []

    def walk(node) -> None:
        if isinstance(node, dict):
            found.extend(v for k, v in node.items() if k == key)
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    for stmt in ast.parse(text).body:
        walk(ast.literal_eval(stmt.value))
    return found


def test_the_base_configs_trust_is_not_the_spec_s():
    """XTuner's configs set trust_remote_code=True on the model and the tokenizer; the spec decides."""
    spec = load_spec(ROOT / "configs" / "demo.yaml")
    assert _rendered_trust(spec) == {False}
    trusting = spec.model_copy(update={"model": spec.model.model_copy(update={"trust_remote_code": True})})
    assert _rendered_trust(trusting) == {True}
    tutorial = load_spec(ROOT / "configs" / "internlm2_chat_1_8b_qlora.yaml")
    assert tutorial.model.trust_remote_code, "InternLM2 needs its own code: the tutorial's spec says so"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_model):
    """A registered chat model whose base model declares that it needs its own code."""
    ws = tmp_path_factory.mktemp("trust")
    base = ws / "base"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}  # what remote code looks like
    (base / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(ws / "adapter")
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    tracker = Tracker(uri)
    run = tracker.client.create_run(tracker.experiment("trust"))
    model_uri = log_chat_model(run.info.run_id, tracker, ws / "adapter", tiny_model, TEMPLATE, needs_remote_code=True)
    tracker.register(model_uri, "needs-code", tags={})
    tracker.client.set_registered_model_alias("needs-code", "champion", "1")
    return {"uri": uri, "ws": ws, "base": base}


def test_a_registered_model_s_code_needs_the_user_s_flag(registered, tmp_path):
    with pytest.raises(SpecError, match="--trust-remote-code"):
        resolve("models:/needs-code@champion", "sqlite:///unused.db", registered["uri"], tmp_path / "a")
    trusted = resolve("models:/needs-code@champion", "sqlite:///unused.db", registered["uri"], tmp_path / "b", True)
    assert trusted.trust_remote_code


def test_the_pyfunc_bundle_never_grants_remote_code_itself(registered):
    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    with pytest.raises(Exception, match="trust_remote_code"):
        mlflow.pyfunc.load_model("models:/needs-code@champion")
    model = mlflow.pyfunc.load_model("models:/needs-code@champion", model_config={"trust_remote_code": True})
    assert len(model.predict(["Who are you?"])) == 1


def test_merging_a_base_model_with_code_needs_the_flag(registered, tmp_path):
    resolved = Resolved("test", registered["ws"] / "adapter", registered["base"], TEMPLATE)
    with pytest.raises(SpecError, match="runs code of its own"):
        export(resolved, None, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
