"""A base config's ``type=`` imports kept as import paths (``sweep.xtuner.config._built``): the sweep's checks leave
XTuner's model code, PEFT and bitsandbytes to the trial's process, and a name that cannot be seen is still imported
(and a wrong one refused) at the check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.utils import get_object_from_string

from sweep.spec import SpecError
from sweep.xtuner.config import _names_in_source, _source_file, load_base_config
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


def test_each_path_imports_back_to_the_object_the_config_named():
    base = load_base_config("internlm2_1_8b_qlora_alpaca_e3")
    paths = []

    def walk(value):
        if isinstance(value, dict):
            paths.extend(v for k, v in value.items() if k == "type" and isinstance(v, str) and "." in v)
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(base)
    assert "xtuner.model.SupervisedFinetune" in paths and "torch.optim.AdamW" in paths
    for path in paths:
        assert get_object_from_string(path) is not None, path


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """pkgshown binds Thing where it can be read (inside a try); pkghidden only through `import *`."""
    for name, init in [("pkgshown", "try:\n    from .impl import Thing\nexcept ImportError:\n    raise\n"),
                       ("pkghidden", "from .impl import *\n")]:  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(init)
        (tmp_path / name / "impl.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("pkgshown", "pkghidden"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.delitem(sys.modules, f"{name}.impl", raising=False)
    _names_in_source.cache_clear()
    yield tmp_path
    _names_in_source.cache_clear()


def test_a_name_the_source_shows_stays_a_path_and_one_behind_import_star_is_imported(packages):
    config = packages / "mine.py"
    config.write_text("from pkgshown import Thing\nfrom pkghidden import Thing as Hidden\n"
                      "model = dict(type=Thing, inner=dict(type=Hidden))\nplain = dict(kind=Hidden)\n")  # fmt: skip
    base = load_base_config(str(config))
    assert base["model"]["type"] == "pkgshown.Thing" and "pkgshown" not in sys.modules, "not imported by the check"
    assert isinstance(base["model"]["inner"]["type"], type), "`import *` hides the name: imported, as before"
    assert isinstance(base["plain"]["kind"], type), "only `type` keys, which mmengine always builds, become paths"
    assert _source_file("pkgshown.impl") == str(packages / "pkgshown" / "impl.py")
    assert _source_file("pkghidden") == str(packages / "pkghidden" / "__init__.py")
    assert _source_file("pkgshown.missing") is None and _source_file("no_such_package_here.x") is None


def test_a_name_its_module_does_not_have_is_refused_at_the_check_naming_the_file(packages):
    config = packages / "typo.py"
    config.write_text("from pkgshown import Thingg\nmodel = dict(type=Thingg)\n")
    with pytest.raises(SpecError, match=r"typo\.py.*Thingg"):
        load_base_config(str(config))


def test_the_zoo_config_of_the_tutorial_renders_the_same_paths_mmengine_resolves(tmp_path: Path):
    """The rendered trial config loads back in mmengine with every `type` resolvable (what a worker does)."""
    from sweep.xtuner.config import load_config

    base = load_base_config("internlm2_1_8b_qlora_alpaca_e3")
    assert base["model"]["llm"]["type"] is not None
    text = tmp_path / "cfg.py"
    text.write_text(f"model = {base['model']['type']!r}\nloop = {base['train_cfg']['type']!r}\n")
    loaded = load_config(text)
    assert get_object_from_string(loaded.model).__name__ == "SupervisedFinetune"
    assert get_object_from_string(loaded.loop).__name__ == "TrainLoop"
