"""`sweep run` exits non-zero when it trained nothing: every trial failed, or no trial has completed."""

from __future__ import annotations

import logging

import pytest

from sweep.cli import EXIT_ALL_FAILED, EXIT_GATE_FAILED, EXIT_NONE_COMPLETE, main, run_exit_code
from tests.conftest import inject_into_training, write_spec

EVERY_TRIAL_FAILS = """\
print("injected: this trial fails", flush=True)
raise SystemExit(1)
"""


def _report(complete: int = 0, pruned: int = 0, failed: int = 0, before: int = 0) -> dict:
    this_run = {"COMPLETE": complete, "PRUNED": pruned, "FAIL": failed}
    return {"study": "s", "counts": {**this_run, "COMPLETE": complete + before}, "this_run": this_run}


def test_exit_codes_of_a_report(caplog):
    caplog.set_level(logging.WARNING, logger="sweep")
    assert run_exit_code(_report(complete=3)) == 0
    assert run_exit_code(_report(failed=2)) == EXIT_ALL_FAILED
    assert run_exit_code(_report(failed=2, before=1)) == EXIT_ALL_FAILED, "earlier runs' trials do not hide it"
    assert run_exit_code(_report(pruned=2)) == EXIT_NONE_COMPLETE
    assert run_exit_code(_report(pruned=1, failed=1)) == EXIT_NONE_COMPLETE
    caplog.clear()
    assert run_exit_code(_report(complete=2, failed=1)) == 0
    assert "1 of 3 trial(s) of this run failed" in caplog.text
    assert run_exit_code({**_report(complete=1), "registered": {"error": "RegistryError: ..."}}) == EXIT_GATE_FAILED


@pytest.mark.e2e
def test_a_sweep_whose_trials_all_fail_exits_3(tmp_path, tiny_model, monkeypatch, capsys):
    inject = inject_into_training(tmp_path / "inject", EVERY_TRIAL_FAILS)
    monkeypatch.setenv("PYTHONPATH", str(inject))
    spec = write_spec(tmp_path, tiny_model, n_trials="n_trials: 2", study="study: all-fail")
    rc = main(["run", str(spec), "--storage", f"sqlite:///{tmp_path / 'sweep.db'}",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--work-dir", str(tmp_path / "runs"), "--json"])  # fmt: skip
    assert rc == EXIT_ALL_FAILED
    assert '"FAIL": 2' in capsys.readouterr().out


def test_reading_a_missing_sqlite_storage_creates_nothing(tmp_path, monkeypatch, capsys):
    from sweep.cli import main

    monkeypatch.chdir(tmp_path)
    for command in (["report", "demo"], ["promote", "demo"], ["export", "demo", "--adapter", "out"]):
        assert main([*command, "--storage", "sqlite:///missing.db"]) == 2
        assert "missing.db does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no database file made by reading one"


def test_the_sweep_command_exits_with_mains_code_and_leaves_its_objects_to_the_process_end(monkeypatch):
    """`entry` (the `sweep` console script and `python -m sweep.cli`) freezes the collector before it exits: the last
    collection of everything a sweep made took seconds after its report was printed (docs/benchmarks.md)."""
    import gc

    from sweep import cli

    monkeypatch.setattr(cli, "main", lambda: EXIT_NONE_COMPLETE)
    before = gc.get_freeze_count()
    try:
        with pytest.raises(SystemExit) as exited:
            cli.entry()
        assert exited.value.code == EXIT_NONE_COMPLETE
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()  # this test process goes on collecting


def test_the_console_script_is_the_entry():
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sweep"] == "sweep.cli:entry"
