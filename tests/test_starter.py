"""`sweep init`: a starter spec from the XTuner tutorial's config file or a zoo name, that `sweep validate` passes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from sweep import cli
from tests.conftest import ROOT

TASK = ROOT / "data/demo/task.jsonl"
GENERAL = ROOT / "data/demo/general.jsonl"
ZOO = "internlm2_chat_1_8b_qlora_alpaca_e3"


def _tutorial_config(folder: Path, model_dir: Path) -> Path:
    """What the XTuner tutorial has its readers make: `xtuner copy-cfg` of the zoo config, a few lines edited."""
    from xtuner.configs import cfgs_name_path

    path = folder / f"{ZOO}_copy.py"  # the name `xtuner copy-cfg NAME DIR` gives the copy
    shutil.copyfile(cfgs_name_path[ZOO], path)
    edits = {
        'pretrained_model_name_or_path = "internlm/internlm2-chat-1_8b"': f'pretrained_model_name_or_path = "{model_dir}"',
        'alpaca_en_path = "tatsu-lab/alpaca"': 'alpaca_en_path = "datas/assistant.json"',
        "max_length = 2048": "max_length = 1024",
        "max_epochs = 3": "max_epochs = 2",
        'evaluation_inputs = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]':
            'evaluation_inputs = ["请介绍一下你自己", "Please introduce yourself"]',
        "dataset=dict(type=load_dataset, path=alpaca_en_path)":
            'dataset=dict(type=load_dataset, path="json", data_files=dict(train=alpaca_en_path))',
        "dataset_map_fn=alpaca_map_fn": "dataset_map_fn=None",
    }  # fmt: skip
    text = path.read_text(encoding="utf-8")
    for old, new in edits.items():
        assert old in text, f"the zoo config changed: {old!r} is gone"
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


def _spec(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_init_from_the_tutorials_config_file(tmp_path, tiny_model, capsys):
    config = _tutorial_config(tmp_path, tiny_model)
    out = tmp_path / "assistant.yaml"
    assert cli.main(["init", str(config), "--data", str(TASK), "--out", str(out)]) == 0
    assert f"sweep validate {out}" in capsys.readouterr().out
    spec = _spec(out)
    assert spec["base_config"] == config.name  # beside the spec: relative to it
    assert (out.parent / spec["model"]["path"]).resolve() == tiny_model.resolve(), "the config's own model path"
    assert spec["model"]["template"] == "internlm2_chat"
    assert spec["model"]["quantize"] is True
    assert spec["probes"] == ["请介绍一下你自己", "Please introduce yourself"], "the edited evaluation_inputs"
    assert spec["fixed"] == {"accumulative_counts": 16, "lora_dropout": 0.1, "max_length": 1024}
    space = spec["search_space"]
    assert space["max_epochs"] == {"type": "int", "low": 1, "high": 4}, "around the edited max_epochs = 2"
    assert space["lr"]["low"] < 2e-4 < space["lr"]["high"] and space["lr"]["log"] is True
    assert isinstance(space["lr"]["low"], float), "written so that YAML reads a float back"
    assert 64 in space["lora_r"]["choices"] and 0.25 in space["lora_alpha_ratio"]["choices"]  # r=64, alpha=16
    assert "mix_ratio" not in space and "general" not in spec["data"], "one data file: nothing to mix in"
    assert spec["data"]["val"] == spec["data"]["test"] == 0.1
    assert spec["registry"]["name"] == "tiny-model-task"
    assert spec["objective"] == {"metric": "val/loss", "keep": "latest_within_noise"}, "the keep rule, spelled out"
    text = out.read_text(encoding="utf-8")
    assert "best, better_beyond_noise or latest_within_noise" in text, "the other rules, offered in a comment"
    assert "# system:" in text and "Below is an instruction" in text, "the config's SYSTEM, offered in a comment"
    capsys.readouterr()
    assert cli.main(["validate", str(out)]) == 0, capsys.readouterr().err
    assert "search space: lr, max_epochs, batch_size, lora_r, lora_alpha_ratio" in capsys.readouterr().out


def test_init_from_a_zoo_name_with_general_chat(tmp_path, tiny_model, capsys):
    out = tmp_path / "spec.yaml"
    argv = ["init", ZOO, "--data", str(TASK), str(GENERAL), "--model", str(tiny_model), "--out", str(out)]
    assert cli.main(argv) == 0
    spec = _spec(out)
    assert spec["base_config"] == ZOO
    assert spec["fixed"] == {"accumulative_counts": 16, "lora_dropout": 0.1, "max_length": 2048}
    assert spec["search_space"]["max_epochs"]["high"] == 6
    assert spec["search_space"]["mix_ratio"] == {"type": "float", "low": 0.0, "high": 0.3}
    assert (out.parent / spec["data"]["general"]).resolve() == GENERAL.resolve()
    assert spec["probes"] == ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
    assert spec["eval_every"] == 97 // 4, "about four validation points per epoch of the training rows"
    capsys.readouterr()
    assert cli.main(["validate", str(out)]) == 0, capsys.readouterr().err


def test_init_never_replaces_a_spec_unless_forced(tmp_path, tiny_model, capsys):
    out = tmp_path / "spec.yaml"
    out.write_text("mine\n")
    argv = ["init", ZOO, "--data", str(TASK), "--model", str(tiny_model), "--out", str(out)]
    assert cli.main(argv) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert cli.main([*argv, "--force"]) == 0
    assert _spec(out)["base_config"] == ZOO


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["internlm2_chat_1_8b_full_alpaca_e3"], "has no model.lora"),
        (["internlm2_chat_1_8b_qlora_alpaca_e4"], "did you mean"),
        ([ZOO, "--data", str(TASK), str(GENERAL), str(TASK)], "at most one general-chat file"),
    ],
)
def test_init_refuses_what_it_cannot_use_and_writes_nothing(tmp_path, tiny_model, capsys, args, message):
    out = tmp_path / "spec.yaml"
    argv = ["init", *args, "--model", str(tiny_model), "--out", str(out)]
    if "--data" not in argv:
        argv += ["--data", str(TASK)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_init_names_the_data_row_it_cannot_use(tmp_path, tiny_model, capsys):
    bad = tmp_path / "assistant.json"
    bad.write_text('[{"conversation": [{"input": "你是谁", "output": "我是小助手"}]}]', encoding="utf-8")
    out = tmp_path / "spec.yaml"
    assert cli.main(["init", ZOO, "--data", str(bad), "--model", str(tiny_model), "--out", str(out)]) == 2
    assert f"{bad}: row 0: expected an object with a 'messages' list" in capsys.readouterr().err
    assert not out.exists()


def test_init_trusts_remote_code_only_where_the_model_needs_it_and_the_config_grants_it(tmp_path, tiny_model, capsys):
    import json

    model = tmp_path / "internlm2-chat-1_8b"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    out = tmp_path / "spec.yaml"
    assert cli.main(["init", ZOO, "--data", str(TASK), "--model", str(model), "--out", str(out)]) == 0
    assert _spec(out)["model"]["trust_remote_code"] is True, "InternLM2-like: its code runs, as the config says"
    assert "runs with your rights" in out.read_text(encoding="utf-8")
    plain = tmp_path / "plain.yaml"
    assert cli.main(["init", ZOO, "--data", str(TASK), "--model", str(tiny_model), "--out", str(plain)]) == 0
    assert "trust_remote_code" not in _spec(plain)["model"], "a model without code of its own is not granted it"
