"""The spec: every problem names the file and the key, and good specs load with absolute paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep.spec import SpecError, load_spec
from tests.conftest import ROOT, write_spec


def test_demo_spec_loads_with_paths_from_its_folder():
    spec = load_spec(ROOT / "configs" / "demo.yaml")
    assert spec.study == "demo"
    assert spec.model.path == (ROOT / ".cache" / "tiny-model").resolve()
    assert spec.data.task == ROOT / "data" / "demo" / "task.jsonl"
    assert spec.n_trials >= 6


def test_tutorial_spec_loads():
    spec = load_spec(ROOT / "configs" / "internlm2_chat_1_8b_qlora.yaml")
    assert spec.base_config == "internlm2_1_8b_qlora_alpaca_e3"
    assert spec.model.quantize is True
    assert spec.model.template == "internlm2_chat"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"registry": "registry: {name: x}\nbogus: 1"}, "bogus: unknown key"),
        ({"search_space": "search_space:\n  lr: {type: float, low: 0.1, high: 0.01}"}, "search_space.lr"),
        ({"search_space": "search_space:\n  lr: {type: float, low: 0.0, high: 0.1, log: true}"}, "log range"),
        ({"search_space": "search_space:\n  warmup: {type: float, low: 0.0, high: 0.1}"}, "unknown knob 'warmup'"),
        ({"search_space": "search_space:\n  lora_r: {type: float, low: 1.0, high: 2.0}"}, "int knob"),
        ({"search_space": "search_space:\n  lora_r: {type: categorical, choices: [8, x]}"}, "not an int"),
        ({"model": "model: {path: /m, template: qwen_chat, quantise: true}"}, "model.quantise: unknown key"),
        (
            {"fixed": "fixed: {lr: 0.1}", "search_space": "search_space:\n  lr: {type: float, low: 0.01, high: 0.1}"},
            "both searched and fixed",
        ),
        ({"n_trials": "n_trials: 0"}, "n_trials"),
        ({"n_trials": "objective: {metric: val/loss, weights: {val/loss: 1}}"}, "not metric and weights"),
        ({"n_trials": "objective: {metrics: [val/loss]}"}, "objective: metrics: a multi-objective study needs 2"),
        ({"n_trials": "objective: {metrics: [val/loss, val/rouge_l], direction: minimize}"}, "own direction"),
        ({"n_trials": "objective: {metric: val/rouge_l, direction: minimize}"}, "val/rouge_l is to maximize"),
        ({"n_trials": "objective: {weights: {val/bleu: 1.0}}"}, "objective.weights: 'val/bleu' is produced by nothing"),
        (
            {"n_trials": "n_trials: 2\nspeed: {trials_per_worker: 2, compile: true}"},
            "cannot be used with speed.compile",
        ),
        (
            {"n_trials": "objective: {metric: val/loss, keep: last}"},
            "objective.keep: expected one of best, better_beyond_noise, latest_within_noise, got 'last'",
        ),
    ],
)
def test_bad_spec_names_the_key(tmp_path: Path, override, expected):
    path = write_spec(tmp_path, Path("/m"), **override)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_not_yaml_and_not_utf8(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_bytes(b"study: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(bad)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")


def test_objective_shapes(tmp_path: Path):
    def objective(text: str):
        return load_spec(write_spec(tmp_path, Path("/m"), n_trials=f"objective: {text}")).objective

    single = objective("{metric: val/rouge_l}")
    assert (single.names, single.directions, single.multi) == (["val/rouge_l"], ["maximize"], False)
    default = load_spec(write_spec(tmp_path, Path("/m"))).objective
    assert (default.primary, default.primary_direction) == ("val/loss", "minimize")
    combo = objective("{weights: {val/loss: 1.0, val/rouge_l: -2.0}}")
    assert combo.names == ["val/weighted"] and combo.directions == ["minimize"]
    assert combo.components == ["val/loss", "val/rouge_l"]
    multi = objective("{metrics: [val/loss, val/general_loss]}")
    assert multi.multi and multi.directions == ["minimize", "minimize"] and multi.primary == "val/loss"


def test_yaml_merge_keys_still_work_and_odd_keys_fail_in_one_line(tmp_path, tiny_model):
    space = ("search_space:\n  lr: &range {type: float, low: 1.0e-4, high: 3.0e-2, log: true}\n"
             "  mix_ratio: {<<: *range, low: 0.0, high: 0.3, log: false}")  # fmt: skip
    spec = write_spec(tmp_path, tiny_model, search_space=space)
    merged = load_spec(spec).search_space["mix_ratio"]
    assert (merged.type, merged.low, merged.high, merged.log) == ("float", 0.0, 0.3, False)
    spec.write_text(spec.read_text() + "? [a, b]\n: 1\n")
    with pytest.raises(SpecError, match="line .*: a key must be a plain value, not list"):
        load_spec(spec)
