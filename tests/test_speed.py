"""The ``auto`` speed settings: decided once on the sweep side, the same choice in the plan, config and hook."""

from __future__ import annotations

import json
import shutil

import pytest

from sweep import speed
from sweep.preflight import check
from sweep.spec import SpecError, load_spec
from sweep.xtuner.render import Device
from tests.conftest import write_spec


def _spec(tmp_path, model, text: str = ""):
    return load_spec(write_spec(tmp_path, model, **({"speed": f"speed: {{{text}}}"} if text else {})))


def test_auto_is_off_on_the_cpu_and_a_gpu_kernel_where_one_is_installed(tmp_path, tiny_model, monkeypatch):
    spec = _spec(tmp_path, tiny_model, "fused_optimizer: auto")
    assert (spec.speed.fused_loss, spec.speed.fused_optimizer) == ("auto", "auto")
    assert _spec(tmp_path, tiny_model).speed.fused_optimizer == "off", "no gain measured: off by default"
    assert speed.fused_loss(spec, Device(cuda=False)) == "off"
    assert speed.fused_optimizer(spec, Device(cuda=False)) is False
    assert speed.fused_optimizer(spec, Device(cuda=True)) is True
    # which kernels a GPU machine has installed: cut-cross-entropy first, Liger next, else no fused loss
    for have, expected in [({"cut_cross_entropy", "liger_kernel"}, "cce"), ({"liger_kernel"}, "liger"), (set(), "off")]:
        monkeypatch.setattr(speed, "installed", lambda module, have=have: module in have)
        assert speed.fused_loss(spec, Device(cuda=True)) == expected, have


def test_auto_leaves_a_model_that_scales_its_logits_alone(tmp_path, tiny_model, monkeypatch):
    model = tmp_path / "scaled"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "logits_scaling": 8.0}))
    monkeypatch.setattr(speed, "installed", lambda module: True)
    assert speed.scales_logits(model) == "logits_scaling"
    assert speed.scales_logits(tiny_model) is None
    assert speed.fused_loss(_spec(tmp_path, model), Device(cuda=True)) == "off"
    with pytest.raises(SpecError, match=r"speed.fused_loss: chunked cannot be used with .*sets logits_scaling"):
        check(_spec(tmp_path, model, "fused_loss: chunked"), Device(cuda=False))


def test_the_rendered_config_names_the_choice(tmp_path, tiny_model, monkeypatch):
    """What the hook installs and what the optimizer runs is what ``auto`` chose for the device."""
    monkeypatch.setattr(speed, "installed", lambda module: module == "cut_cross_entropy")
    spec = _spec(tmp_path, tiny_model, "fused_optimizer: auto")
    cpu, gpu = check(spec, Device(cuda=False)).config_text, check(spec, Device(cuda=True)).config_text
    assert "'fused_loss': 'off'" in cpu and "'fused': True" not in cpu
    assert "'fused_loss': 'cce'" in gpu and "'fused': True" in gpu
    assert (
        "'fused': True" not in check(_spec(tmp_path, tiny_model, "fused_optimizer: off"), Device(cuda=True)).config_text
    )


def test_data_workers_are_off_unless_the_spec_asks(tmp_path, tiny_model):
    """No gain measured on an H200 (docs/benchmarks.md): the training process collates, as `xtuner train` does."""
    spec = _spec(tmp_path, tiny_model)
    assert spec.speed.data_workers == 0
    assert "'persistent_workers'" not in check(spec, Device(cuda=True)).config_text
    text = check(_spec(tmp_path, tiny_model, "data_workers: 2"), Device(cuda=True)).config_text
    assert "'num_workers': 2" in text and "'persistent_workers': True" in text
    with pytest.raises(SpecError, match="data_workers"):
        _spec(tmp_path, tiny_model, "data_workers: -1")


def test_compiled_layers_keep_eager_roundings_and_draw_masks_in_the_kernel_by_default(tmp_path, tiny_model):
    """The defaults a GPU run chose (docs/benchmarks.md): they reach the hook through the rendered config."""
    spec = _spec(tmp_path, tiny_model, "compile: true")
    assert (spec.speed.compile_dropout, spec.speed.compile_exact_casts) == ("fused", True)
    text = check(spec, Device(cuda=False)).config_text
    assert "'compile': True" in text and "'compile_dropout': 'fused'" in text and "'compile_exact_casts': True" in text
    with pytest.raises(SpecError, match="compile_dropout"):
        _spec(tmp_path, tiny_model, "compile_dropout: random")
