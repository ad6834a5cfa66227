"""What Transformers and bitsandbytes would import for nothing (``sweep.lean_imports``): checked in fresh interpreters
against installed stand-ins for Flax and JAX, the real scikit-learn and the real bitsandbytes, as a training process
and the `sweep` command import them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_TRANSFORMERS = "import transformers.image_transforms, transformers.generation.candidate_generator"
REPORT = ("from transformers.utils import is_sklearn_available; "
          "print('jax' in sys.modules, 'sklearn' in sys.modules, is_sklearn_available())")  # fmt: skip


@pytest.fixture(scope="module")
def flax_installed(tmp_path_factory) -> Path:
    """A site folder where Flax and JAX look installed to Transformers (a package and its distribution metadata)."""
    site = tmp_path_factory.mktemp("site")
    for name in ("flax", "jax"):
        (site / name).mkdir()
        (site / name / "__init__.py").write_text("")
        (site / f"{name}-0.4.30.dist-info").mkdir()
        (site / f"{name}-0.4.30.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.4.30\n"
        )
    (site / "jax" / "numpy.py").write_text("")
    return site


def _run(code: str, site: Path, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("USE_TF", "USE_FLAX")} | env
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site)])
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


@pytest.mark.parametrize(("first", "env", "expected"), [
    ("", {}, ["True", "True", "True"]),  # the stand-ins are seen: without the step both frameworks are imported
    ("import sweep.training; ", {}, ["False", "False", "False"]),  # what every training process imports first
    ("import sweep.training; ", {"USE_FLAX": "1"}, ["True", "False", "False"]),  # a value the user set wins
])  # fmt: skip
def test_a_training_process_imports_neither_jax_nor_sklearn_through_transformers(flax_installed, first, env, expected):
    assert _run(f"import sys; {first}{IMPORT_TRANSFORMERS}; {REPORT}", flax_installed, **env) == expected


@pytest.mark.parametrize("before", ["", "import transformers.utils.import_utils; "])
def test_bitsandbytes_leaves_torchinductors_compiler_unimported(flax_installed, before):
    """Also where Transformers is imported first: its `import_utils` looks bitsandbytes up (`find_spec`) without
    importing it, as the sweep's checks do before XTuner imports bitsandbytes."""
    code = "import sys; {}" + before + "import bitsandbytes; print('torch._inductor.compile_fx' in sys.modules)"
    assert _run(code.format(""), flax_installed) == ["True"]  # what the step saves
    assert _run(code.format("import sweep.training; "), flax_installed) == ["False"]


def test_the_flag_is_cleared_where_transformers_was_imported_before_the_step(flax_installed):
    code = ("import sys, transformers.utils.import_utils as iu; before = iu.is_sklearn_available(); "
            "import sweep.training; print(before, iu.is_sklearn_available())")  # fmt: skip
    assert _run(code, flax_installed) == ["True", "False"]


def test_a_module_only_a_later_finder_knows_is_wrapped_once_and_the_finder_after_it_is_never_skipped(monkeypatch):
    """It asks the finders after it (an editable install's finder comes after the file system's) for the modules it
    wraps, wraps only their execution (a lookup alone uses nothing up), and leaves sys.meta_path at that execution,
    not inside a finder loop, where the finder after it would be skipped for the module being looked for."""
    import contextlib
    import importlib.abc
    import importlib.util

    from sweep.lean_imports import _AroundImport

    class Elsewhere(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            known = name in ("editable_pkg", "next_pkg")
            return importlib.util.spec_from_loader(name, self) if known else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            module.ran_inside = list(ran)

    ran: list[str] = []

    @contextlib.contextmanager
    def wrap(module):
        ran.append("wrapped")
        yield

    around = _AroundImport({"editable_pkg": wrap})
    monkeypatch.setattr(sys, "meta_path", [around, Elsewhere(), *sys.meta_path])
    for name in ("editable_pkg", "next_pkg"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert importlib.util.find_spec("editable_pkg") is not None and ran == [], "a lookup alone wraps nothing"
    import editable_pkg  # noqa: F401 - the import under test
    import next_pkg  # noqa: F401

    assert editable_pkg.ran_inside == ["wrapped"], "executed inside its wrap, found by the later finder"
    assert around not in sys.meta_path, "no module left to wrap: it stepped out"
    assert next_pkg.ran_inside == ["wrapped"], "found on the first try"


def test_a_function_compiled_during_the_import_is_compiled_once_at_its_first_call(monkeypatch):
    import torch

    from sweep import lean_imports

    compiled: list[tuple] = []

    def recording_compile(fn, **kwargs):
        compiled.append((fn.__name__, kwargs))
        return lambda *a: ("compiled", fn(*a))

    monkeypatch.setattr(torch, "compile", recording_compile)
    with lean_imports._compile_on_first_call(None):

        @torch.compile(dynamic=False)  # bitsandbytes' two forms
        def double(x):
            return 2 * x

        plain = torch.compile(lambda x: x + 1)
        assert compiled == [], "nothing is compiled while the module is imported"
    assert torch.compile is recording_compile, "the real torch.compile is back after the import"
    assert double.__name__ == "double"
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8) and plain(1) == ("compiled", 2)
    assert compiled == [("double", {"dynamic": False}), ("<lambda>", {})], "each compiled once, with its arguments"


def test_a_function_whose_compile_fails_runs_plain_from_then_on(monkeypatch):
    import torch

    from sweep import lean_imports

    calls: list[str] = []

    def failing_compile(fn, **kwargs):
        calls.append(fn.__name__)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", failing_compile)
    with lean_imports._compile_on_first_call(None):

        @torch.compile
        def triple(x):
            return 3 * x

    with pytest.raises(RuntimeError, match="no compiler"):  # bitsandbytes' wrapper catches it and calls triple
        triple(1)
    assert triple(2) == 6 and calls == ["triple"], "tried once, then the plain function"


def test_the_sweep_command_keeps_them_out_before_its_own_imports(flax_installed):
    """The sweep's checks import XTuner's model code too, on the way to the first trial: Transformers, then
    bitsandbytes (through mmengine's optimizers)."""
    code = f"""
import sys
from sweep import cli
def main(argv=None):
    {IMPORT_TRANSFORMERS}
    import bitsandbytes
    {REPORT}
    print('torch._inductor.compile_fx' in sys.modules)
    return 0
cli.main = main
cli.entry()
"""
    assert _run(code, flax_installed) == ["False", "False", "False", "False"]
