"""Locks that every worker of a study shares: the champion's compare-and-move step, adapters in use.

MLflow has no compare-and-set on aliases: two gates that read the champion, score for minutes and
then set the alias let the last writer win even when it lost. The gate therefore re-reads the
champion and moves the alias inside ``champion_lock``, a lock kept where every worker's registry
lives: a PostgreSQL advisory lock in the tracking database, a file lock beside a SQLite store.
An adapter a gate registers or scores is held with ``adapter_in_use`` (a shared ``flock``), and
``keep_adapters`` removes only adapters it can lock exclusively (``adapter_removal``), so it never
deletes one that a gate is reading. ``flock`` locks vanish with their process: a crashed gate
leaves no stale marker that would protect an adapter for ever.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sweep.registry.tracking import redact

log = logging.getLogger("sweep")
LOCK_TIMEOUT_S = 600.0  # the step under the lock takes seconds; a longer wait means a stuck worker
_POLL_S = 0.1
_memory_locks: dict[str, threading.Lock] = {}
_memory_guard = threading.Lock()


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock``: the same model name in every worker."""
    digest = hashlib.sha256(f"xtuner-sweep:champion:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URI; None for an in-memory database."""
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    path = path.split("?", 1)[0]
    return path if path and path != ":memory:" else None


@contextmanager
def champion_lock(tracking_uri: str, name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[str]:
    """Hold the lock that serialises "read the champion, compare, move the alias" for model ``name``.

    Yields what kind of lock it is, for the log. With a tracking server (``http(s)://``,
    ``databricks``) there is no database this process can lock: it yields ``"none"`` and the gate
    only re-reads the champion right before moving the alias, which narrows the race to the
    milliseconds between that read and the move but does not close it. MySQL and MSSQL stores
    get the same (their named locks are not implemented here yet).
    """
    if tracking_uri.startswith("postgresql"):
        with _pg_advisory_lock(tracking_uri, name, timeout):
            yield "postgresql advisory lock"
    elif tracking_uri.startswith("sqlite"):
        path = sqlite_path(tracking_uri)
        if path is None:
            with _memory_lock(f"{tracking_uri}|{name}", timeout):
                yield "in-process lock (in-memory store)"
        else:
            with _file_lock(Path(path + ".champion.lock"), timeout, what=f"the {name!r} champion lock"):
                yield "file lock"
    else:
        yield "none"


@contextmanager
def _pg_advisory_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    """A session advisory lock on its own connection: released on exit, or by PostgreSQL if we die."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    key = lock_key(name)
    engine = create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            deadline = time.monotonic() + timeout
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"champion lock of model {name!r} (pg_advisory_lock({key}) on {redact(uri)}): "
                        f"still held by another worker after {timeout:.0f} s"
                    )
                time.sleep(_POLL_S)
            try:
                yield
            finally:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                except SQLAlchemyError as err:  # the connection is gone: so is the session's lock
                    log.warning("champion lock of model %r on %s: unlock failed (%s)", name, redact(uri), err)
    finally:
        engine.dispose()


@contextmanager
def _file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """An exclusive ``flock``; one open file per call, so threads of one process exclude each other too."""
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} ({path}): still held by another worker after {timeout:.0f} s") from None
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _memory_lock(key: str, timeout: float) -> Iterator[None]:
    with _memory_guard:
        lock = _memory_locks.setdefault(key, threading.Lock())
    if not lock.acquire(timeout=timeout):
        raise TimeoutError(f"champion lock {key}: still held by another thread after {timeout:.0f} s")
    try:
        yield
    finally:
        lock.release()


def adapter_lock_file(adapter: Path) -> Path:
    """Beside the adapter folder, not inside it: the folder is logged to MLflow as it is."""
    return adapter.with_name(adapter.name + ".lock")


@contextmanager
def adapter_in_use(adapter: Path) -> Iterator[None]:
    """A shared lock on a trial's adapter while a gate registers or scores it.

    Several gates may hold it at once; ``adapter_removal`` cannot take it meanwhile. It waits
    while a removal holds the lock (a removal takes only as long as one ``rmtree``), so callers
    check that the folder still exists once they hold it.
    """
    with adapter_lock_file(adapter).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def adapter_removal(adapter: Path) -> Iterator[bool]:
    """Yields True while this process alone may remove ``adapter``; False (remove nothing) when a gate uses it."""
    try:
        handle = adapter_lock_file(adapter).open("a")
    except OSError:  # the trial folder itself is gone: nothing to remove, nobody to protect
        handle = None
    if handle is None:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mine = True
        except BlockingIOError:  # a gate holds it shared
            mine = False
        try:
            yield mine
        finally:
            if mine:
                fcntl.flock(handle, fcntl.LOCK_UN)
