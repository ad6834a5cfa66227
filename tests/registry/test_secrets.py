"""Passwords in storage and tracking URLs never land in a log, file, tag, param or error message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep.cli import main
from sweep.registry.tracking import redact
from tests.conftest import ROOT, pg_database, write_spec

SECRET = "Xy#9?z/Qs3"  # `#`, `?` and `/`: urlsplit stopped at the first of them and showed the URL whole

SHAPES = [
    f"postgresql://postgres:{SECRET}@127.0.0.1:5432/optuna",
    f"postgresql+psycopg://postgres:{SECRET}@db.example/optuna?sslmode=require",
    f"postgresql://postgres@127.0.0.1/optuna?password={SECRET}",
    f"postgresql://postgres@127.0.0.1/optuna?sslmode=disable&PASSWORD={SECRET}",
    f"mysql+pymysql://root:{SECRET}@127.0.0.1:3306/optuna",
    f"http://admin:{SECRET}@mlflow.example:5000",
    f"https://mlflow.example/?token={SECRET}",
    f"not a url://user:{SECRET}@host",
    f"postgresql://postgres:{SECRET}@x@127.0.0.1/optuna",  # an @ the user forgot to escape
    f"postgresql://postgres@127.0.0.1/optuna?sslpassword={SECRET}&sslmode=require",
]


@pytest.mark.parametrize("url", SHAPES)
def test_redact_hides_the_password_of_every_shape(url: str):
    shown = redact(url)
    assert SECRET not in shown and "Xy" not in shown
    assert "***" in shown


def test_redact_leaves_urls_without_secrets_alone():
    for url in ("sqlite:///sweep.db", "postgresql://postgres@127.0.0.1/optuna?sslmode=disable", "databricks"):
        assert redact(url) == url


def test_the_mlproject_takes_no_storage_parameter():
    """MLflow logs every `-P` value as a parameter of its run: a storage URL must come from the environment."""
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    for name, point in project["entry_points"].items():
        assert "storage" not in point.get("parameters", {}), name
        assert "{storage}" not in point["command"], name


def _database_text(db: str) -> str:
    """Every text column of every table of the Optuna database: attributes, system attributes, names."""
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={db}") as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(str(row) for t in tables for row in conn.execute(f'SELECT * FROM "{t}"'))


@pytest.mark.e2e
def test_no_trace_of_the_password_after_a_sweep(tmp_path: Path, tiny_model: Path, capfd, monkeypatch):
    """A real one-trial sweep on PostgreSQL (trust auth accepts any password), then every byte it left is read.
    (The other URL shapes go through the same ``redact``: the unit tests above.)"""
    db = pg_database()
    storage = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/{db}"
    fixed = "fixed: {max_length: 64, max_epochs: 1, batch_size: 4, accumulative_counts: 1, lora_r: 8, mix_ratio: 0.1}"
    spec = write_spec(tmp_path, tiny_model, n_trials="n_trials: 1", fixed=fixed, pruner="pruner: {type: none}",
                      search_space="search_space:\n  lr: {type: float, low: 1.0e-3, high: 2.0e-2, log: true}")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEP_STORAGE", storage)  # as the README says: not in argv
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(spec), "--tracking-uri", tracking, "--work-dir", str(tmp_path / "runs")]) == 0
    assert main(["report", "e2e", "--tracking-uri", tracking, "--no-plots"]) == 0
    assert main(["report", "no-such-study", "--tracking-uri", tracking]) == 2  # an error message that names the storage
    # what the sweep made is its user's alone (issue 16, item 8)
    assert (tmp_path / "runs").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "mlflow.db").stat().st_mode & 0o777 == 0o600
    made = [p for p in (tmp_path / "runs").rglob("*") if not p.is_symlink()]
    assert made and not [str(p) for p in made if p.stat().st_mode & 0o077], "readable by others"
    out, err = capfd.readouterr()
    assert "***" in err, "the storage URL was shown, redacted"
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == [], f"the password is in {leaks}"
    assert SECRET not in out and SECRET not in err
    assert SECRET not in _database_text(db)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        shown = f"{run.data.params} {run.data.tags}"
        assert SECRET not in shown and "Xy#9" not in shown
