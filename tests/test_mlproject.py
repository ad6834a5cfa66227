"""The MLproject entry points run through `mlflow run` (local environment, as the README says)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT


def test_entry_points_exist_with_their_parameters():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    points = project["entry_points"]
    assert set(points["sweep"]["parameters"]) >= {"spec", "n_trials"}
    assert "study" in points["report"]["parameters"]


def test_mlflow_run_validate_entry_point(tiny_model, tmp_path: Path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "validate", "-P", "spec=configs/demo.yaml",
         "--env-manager", "local"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "configs/demo.yaml: OK" in out.stdout and "objective minimize val/weighted" in out.stdout
