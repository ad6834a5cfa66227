"""A base config's ``type=`` imports kept as import paths (``sweep.xtuner.config._built``): the sweep's checks leave
XTuner's model code, PEFT and bitsandbytes to the trial's process, and a name that cannot be seen is still imported
(and a wrong one refused) at the check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mmengine.utils import get_object_from_string

from sweep.spec import SpecError
from sweep.xtuner import source_names
from sweep.xtuner.config import load_base_config
from sweep.xtuner.source_names import source_file
from tests.conftest import ROOT


def test_the_checks_read_a_base_config_without_importing_xtuners_models_peft_or_bitsandbytes():
    code = ("import sys; from sweep.xtuner.config import load_base_config; "
            "cfg = load_base_config(sys.argv[1]); "
            "print(cfg['model']['type'], cfg['model']['lora']['type'], cfg['train_cfg']['type'], "
            "*[m in sys.modules for m in ('xtuner.model', 'xtuner.engine', 'peft', 'bitsandbytes')])")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks" / "bench_base.py")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    model, lora, loop, *imported = out.stdout.split()
    assert (model, lora, loop) == (
        "xtuner.model.SupervisedFinetune",
        "peft.LoraConfig",
        "xtuner.engine.runner.TrainLoop",
    )
    assert imported == ["False"] * 4, "left to the trial's process"


def _types(built, raw, where=""):
    """(where, rendered value, the config's lazy import) of every ``type`` in the two trees, side by side; a built
    value whose raw side is a lazy import (a prompt template) is the built object's, not the config's, and skipped."""
    if isinstance(built, dict) and isinstance(raw, dict):
        for k, v in built.items():
            if k == "type":
                yield where, v, dict.__getitem__(raw, k)
            yield from _types(v, dict.__getitem__(raw, k), f"{where}.{k}")
    elif isinstance(built, (list, tuple)) and isinstance(raw, (list, tuple)):
        for i, (b, r) in enumerate(zip(built, raw, strict=True)):
            yield from _types(b, r, f"{where}[{i}]")


@pytest.mark.parametrize("name", ["internlm2_1_8b_qlora_alpaca_e3",
                                  "llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune"])  # fmt: skip
def test_each_path_leads_mmengine_to_the_very_object_the_config_imported(name):
    from sweep.xtuner.config import load_config, resolve_base_config

    base = load_base_config(name)
    raw = load_config(resolve_base_config(name))._cfg_dict
    paths = 0
    for where, value, lazy in _types({k: base[k] for k in base}, {k: dict.__getitem__(raw, k) for k in base}):
        if isinstance(value, str) and type(lazy).__name__ == "LazyObject":
            paths += 1
            assert get_object_from_string(value) is lazy.build(), (where, value)
    assert paths >= 10, "most types stay paths"


def test_a_name_a_package_reexports_under_its_submodules_name_is_imported_not_a_broken_path(tmp_path):
    """`xtuner.dataset.collate_fns.default_collate_fn.default_collate_fn` does not resolve: mmengine's walk stops at
    the function the package binds under the submodule's name."""
    import xtuner.dataset.collate_fns as collate_fns

    config = tmp_path / "mine.py"
    config.write_text("from xtuner.dataset.collate_fns.default_collate_fn import default_collate_fn\n"
                      "loader = dict(collate_fn=dict(type=default_collate_fn))\n")  # fmt: skip
    assert get_object_from_string("xtuner.dataset.collate_fns.default_collate_fn.default_collate_fn") is None
    assert load_base_config(str(config))["loader"]["collate_fn"]["type"] is collate_fns.default_collate_fn


def _clear_caches() -> None:
    source_names.names_in_source.cache_clear()
    source_names._parsed_source.cache_clear()


PACKAGES = {
    "pkgshown": "try:\n    from .impl import Thing\nexcept ImportError:\n    raise\n",  # bound where it can be read
    "pkghidden": "from .impl import *\n",  # bound where it cannot
    "pkgtyping": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .impl import Thing\n",  # never bound
    "pkgdeleted": "from .impl import Thing\ndel Thing\n",  # bound, then gone
}


@pytest.fixture
def packages(tmp_path, monkeypatch):
    for name, init in PACKAGES.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(init)
        (tmp_path / name / "impl.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _clear_caches()
    yield tmp_path
    _clear_caches()
    for module in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
        del sys.modules[module]


def test_a_name_the_source_shows_stays_a_path_and_one_behind_import_star_is_imported(packages):
    config = packages / "mine.py"
    config.write_text("from pkgshown import Thing\nfrom pkghidden import Thing as Hidden\n"
                      "model = dict(type=Thing, inner=dict(type=Hidden))\nplain = dict(kind=Hidden)\n")  # fmt: skip
    base = load_base_config(str(config))
    assert base["model"]["type"] == "pkgshown.Thing" and "pkgshown" not in sys.modules, "not imported by the check"
    assert isinstance(base["model"]["inner"]["type"], type), "`import *` hides the name: imported, as before"
    assert isinstance(base["plain"]["kind"], type), "only `type` keys, which mmengine always builds, become paths"
    assert source_file("pkgshown.impl") == str(packages / "pkgshown" / "impl.py")
    assert source_file("pkghidden") == str(packages / "pkghidden" / "__init__.py")
    assert source_file("pkgshown.missing") is None and source_file("no_such_package_here.x") is None


@pytest.mark.parametrize(("package", "name"), [("pkgshown", "Thingg"), ("pkgtyping", "Thing"), ("pkgdeleted", "Thing")])
def test_a_name_its_module_does_not_bind_at_run_time_is_refused_at_the_check_naming_the_file(packages, package, name):
    """A misspelt name, one bound only for type checkers, one deleted after its import: imported here, and refused."""
    config = packages / "typo.py"
    config.write_text(f"from {package} import {name}\nmodel = dict(type={name})\n")
    with pytest.raises(SpecError, match=rf"typo\.py.*{name}"):
        load_base_config(str(config))
