"""The knob table: read from a base config, derived, and written back where XTuner keeps each value."""

import copy

import pytest

from sweep import knobs


def _base():
    return {
        "max_length": 512,
        "batch_size": 1,
        "lr": 2e-4,
        "max_epochs": 3,
        "train_cfg": {"type": "xtuner.engine.runner.TrainLoop", "max_epochs": 3},
        "train_dataloader": {"batch_size": 1, "dataset": {"max_length": 512}},
        "optim_wrapper": {"optimizer": {"lr": 2e-4}},
        "model": {"lora": {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1}},
    }


def test_base_values_come_from_the_fields_xtuner_configs_use():
    values = knobs.base_values(_base())
    assert values == {
        "max_epochs": 3, "max_iters": None, "batch_size": 1, "accumulative_counts": 1, "lr": 2e-4,
        "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "mix_ratio": 0.0, "max_length": 512,
    }  # fmt: skip
    no_dataset_length = _base()
    del no_dataset_length["train_dataloader"]["dataset"]["max_length"]
    assert knobs.base_values(no_dataset_length)["max_length"] == 512, "the top-level max_length"


def test_write_puts_each_value_where_the_table_says_and_keeps_unset_ones():
    cfg = _base()
    values = {**knobs.base_values(cfg), "lora_r": 8, "lora_alpha": None, "batch_size": 4, "lr": 1e-3,
              "accumulative_counts": None}  # fmt: skip
    before = copy.deepcopy(cfg)
    knobs.write(cfg, values)
    assert cfg["model"]["lora"] == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}, "alpha unset: the base's"
    assert cfg["train_dataloader"]["batch_size"] == 4 and cfg["batch_size"] == 4
    assert cfg["optim_wrapper"] == {"optimizer": {"lr": 1e-3}, "accumulative_counts": 1}
    assert cfg["lr"] == 1e-3 and cfg["train_cfg"] == before["train_cfg"], "epochs are the renderer's"
    assert "mix_ratio" not in cfg, "a knob without a config field writes nothing"


def test_every_knob_has_a_type_and_a_range():
    assert set(knobs.KNOBS) == set(knobs.KNOB_RANGES) == {k.name for k in knobs.TABLE}
    knobs.check_knob("lr", 1.0)
    with pytest.raises(ValueError, match=r"lr: 0.0 is outside \(0.0, 1.0\]"):
        knobs.check_knob("lr", 0.0)
    with pytest.raises(ValueError, match="mix_ratio"):
        knobs.check_knob("mix_ratio", 1.0)
