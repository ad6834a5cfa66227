"""WarmModelLogging: MLflow's scan of the installed packages, which its first ``log_model`` of a process makes, is done
beside the trials once the first one has ended, so that logging the champion in the sweep's tail does not scan.

A real MLflow store (SQLite) and a real pyfunc model; the scan (``importlib.metadata.packages_distributions``) is
counted where MLflow calls it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow.pyfunc
import pytest
from mlflow.utils import requirements_utils

from sweep.callbacks import WarmModelLogging
from sweep.registry.tracking import Tracker


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # noqa: ARG002 - MLflow's signature
        return model_input


def test_the_scan_runs_once_beside_the_trials_and_not_when_the_champion_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a fresh sweep process
    scans = []
    real = requirements_utils.importlib_metadata.packages_distributions
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions",
                        lambda: scans.append(1) or real())  # fmt: skip
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    warm = WarmModelLogging(tracker)
    trial = SimpleNamespace(number=0)
    warm(None, trial)
    thread = warm.thread
    assert thread is not None
    warm(None, SimpleNamespace(number=1))  # the second trial's end starts nothing
    assert warm.thread is thread
    thread.join(timeout=120)
    assert not thread.is_alive() and scans == [1]
    assert requirements_utils._MODULES_TO_PACKAGES is not None

    run = tracker.client.create_run(tracker.experiment("warm")).info.run_id
    uri = tracker.log_pyfunc(run, name="model", python_model=_Echo(), pip_requirements=["mlflow", "torch"])
    assert uri.startswith("models:/") or uri.startswith("runs:/")
    assert scans == [1], "logging the model scanned the installed packages again"
