"""SQLite storages: a queued trial is claimed by exactly one of several threads."""

from __future__ import annotations

import collections
import pickle
import threading
import time

import optuna
from optuna.trial import TrialState

from sweep.storage import make_storage


def test_enqueued_trials_run_once_each_under_n_jobs(tmp_path):
    """SQLite ignores SELECT ... FOR UPDATE: without the claim lock, 6 threads ran some of 12 queued
    trials twice (2-5 duplicates per study on this machine, and "Cannot tell a COMPLETE trial")."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for rep in range(3):
        storage = make_storage(f"sqlite:///{tmp_path / f'race{rep}.db'}")
        study = optuna.create_study(study_name="race", storage=storage)
        for i in range(12):
            study.enqueue_trial({"x": i})
        runs: collections.Counter[int] = collections.Counter()
        lock = threading.Lock()

        def objective(trial: optuna.Trial, runs=runs, lock=lock) -> float:
            x = trial.suggest_int("x", 0, 100)
            with lock:
                runs[x] += 1
            time.sleep(0.05)
            return float(x)

        study.optimize(objective, n_trials=12, n_jobs=6)
        assert runs == collections.Counter(range(12)), f"study {rep}: {dict(runs)}"
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 12
    assert (tmp_path / "race0.db.claims").exists(), "claims went through the lock file"


def test_the_storage_still_pickles(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}")
    again = pickle.loads(pickle.dumps(storage))
    assert again.get_all_studies() == []
