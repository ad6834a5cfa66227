"""Optuna's storages as the sweep opens them: SQLite on one machine, any RDB URL (PostgreSQL) for many workers.

Heartbeats fail the trials of dead workers and queue them again (``callbacks.StaleTrialCallback``).
"""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sweep.callbacks import StaleTrialCallback
from sweep.registry.tracking import redact
from sweep.retry import retry_races
from sweep.search import make_pruner, make_sampler
from sweep.spec import Spec, SpecError


def make_storage(url: str, heartbeat: int | None = None, tracking_uri: str | None = None):
    """An Optuna RDB storage; with heartbeats, trials of dead workers are failed and queued again."""
    if not url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
        return url  # e.g. a journal storage URL: Optuna resolves it
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": heartbeat,
            "grace_period": 2 * heartbeat,
            "heartbeat_stale_trial_callback": StaleTrialCallback(tracking_uri),
        }
    if url.startswith("sqlite"):
        return _SQLiteStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kwargs)
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)


class _SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on SQLite, with queued trials claimed one at a time.

    Optuna claims a queued trial (WAITING -> RUNNING) with ``SELECT ... FOR UPDATE``, which SQLite
    ignores: two threads of ``--n-jobs`` (or two processes) can both claim the same enqueued trial and
    train it twice in one work dir (optuna/optuna#4002; seen on the H200 benchmark, and reproduced
    by tests/test_study_storage.py). Claims here take an exclusive file lock beside the database, so
    the second claimant reads the trial after the first committed, finds it RUNNING and takes the next.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        path = url.split(":///", 1)[1] if ":///" in url else ""
        self._claims = Path(path + ".claims") if path and path != ":memory:" else None
        self._thread_claims = threading.Lock()  # an in-memory database: one process, threads only

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_thread_claims", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._thread_claims = threading.Lock()

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        if state != TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        if self._claims is None:
            with self._thread_claims:
                return super().set_trial_state_values(trial_id, state, values)
        with self._claims.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one open file per call: threads exclude each other too
            try:
                return super().set_trial_state_values(trial_id, state, values)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def open_study(spec: Spec, storage, create: bool = True) -> optuna.Study:
    try:
        if not create:
            return optuna.load_study(study_name=spec.study, storage=storage)
        return optuna.create_study(
            study_name=spec.study,
            storage=storage,
            directions=spec.objective.directions,
            sampler=make_sampler(spec),
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
    except (KeyError, optuna.exceptions.StorageInternalError) as err:
        raise SpecError(f"storage {_url(storage)}: {err}") from None


def _url(storage: Any) -> str:
    return redact(storage if isinstance(storage, str) else getattr(storage, "url", str(storage)))


def connect_storage(url: str, heartbeat: int | None, tracking_uri: str | None):
    """Open the storage or fail with exit-code-2 clarity, before anything is created."""
    try:
        return retry_races(lambda: make_storage(url, heartbeat, tracking_uri))
    except Exception as err:  # noqa: BLE001 - any driver's error means the same to the user
        text = str(err)
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise SpecError(f"storage {redact(url)}: cannot be reached: {first}") from None


def refuse_missing_sqlite(url: str) -> None:
    """Reading a study never creates anything: SQLAlchemy would make a missing SQLite file, empty."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return  # not a URL: Optuna says what is wrong with it
    path = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if path not in (None, "", ":memory:") and not Path(path).is_file():
        raise SpecError(f"storage {redact(url)}: {path} does not exist; name the database file `sweep run` wrote")
