"""Frameworks Transformers would import for nothing (``sweep.lean_imports``): checked in fresh interpreters against
installed stand-ins for Flax and JAX and the real scikit-learn, as a training process and the `sweep` command import."""

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


def test_the_sweep_command_keeps_them_out_before_its_own_imports(flax_installed):
    """The sweep's checks import XTuner's model code too, on the way to the first trial."""
    code = f"""
import sys
from sweep import cli
def main(argv=None):
    {IMPORT_TRANSFORMERS}
    {REPORT}
    return 0
cli.main = main
cli.entry()
"""
    assert _run(code, flax_installed) == ["False", "False", "False"]
