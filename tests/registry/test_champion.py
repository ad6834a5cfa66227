"""The champion alias under concurrency: real MLflow registries on PostgreSQL and SQLite, no mocks of MLflow.

Two gates race the way two workers (or studies) finishing together do: both read the same old
champion, the loser finishes scoring first but is slow to score the champion, the winner moves
the alias in between. The alias must end on the winner. Adapters are not needed: the scores
are what the compare-and-move step compares, and the registry is real.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sweep.registry.gate import CHAMPION, GateResult, challenge, save_scores
from sweep.registry.locks import champion_lock
from sweep.registry.tracking import Tracker
from tests.conftest import pg_database

NAME = "race-model"
KEY = "same-test-split"
WAIT_S = 60.0


@pytest.fixture(params=["postgresql", "sqlite"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh MLflow tracking/registry store: a new PostgreSQL database, or a SQLite file."""
    if request.param == "postgresql":
        yield f"postgresql://postgres@127.0.0.1:5432/{pg_database()}"
    else:
        yield f"sqlite:///{tmp_path / 'mlflow.db'}"


def _version(tracker: Tracker) -> str:
    """A registered version with no files behind it: the step under test compares scores, not adapters."""
    if not tracker.client.search_registered_models(f"name = '{NAME}'"):
        tracker.client.create_registered_model(NAME)
    return str(tracker.client.create_model_version(NAME, f"/nonexistent/{uuid.uuid4().hex}").version)


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(WAIT_S):
        raise AssertionError(f"timed out waiting for {what}")


def _gate_in_thread(fn: Callable[[], GateResult], results: dict[str, object], label: str) -> threading.Thread:
    def body() -> None:
        try:
            results[label] = fn()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            results[label] = err

    thread = threading.Thread(target=body, name=label)
    thread.start()
    return thread


def test_a_loser_that_moves_last_does_not_take_the_alias(registry: str) -> None:
    setup = Tracker(registry)  # creates the store's tables once, before the racing gates connect
    old = _version(setup)  # e.g. crowned by an older release: no scores tagged, it must be scored
    winner, loser = _version(setup), _version(setup)
    setup.client.set_registered_model_alias(NAME, CHAMPION, old)

    loser_scored, winner_done = threading.Event(), threading.Event()
    champion_scored_by: list[str] = []

    def loser_candidate() -> dict[str, float]:
        loser_scored.set()  # the loser finishes scoring its adapter first...
        return {"test/loss": 2.0}

    def loser_champion(mv) -> dict[str, float]:
        _wait(winner_done, "the winner's gate")  # ...but scoring the champion takes it longer
        champion_scored_by.append(f"loser:{mv.version}")
        return {"test/loss": 3.0}

    def winner_candidate() -> dict[str, float]:
        _wait(loser_scored, "the loser's scores")
        return {"test/loss": 1.0}

    def winner_champion(mv) -> dict[str, float]:
        champion_scored_by.append(f"winner:{mv.version}")
        return {"test/loss": 3.0}

    def gate(version: str, candidate, champion) -> Callable[[], GateResult]:
        return lambda: challenge(Tracker(registry), NAME, version, KEY, "test/loss", "minimize", candidate, champion)

    results: dict[str, object] = {}
    lose = _gate_in_thread(gate(loser, loser_candidate, loser_champion), results, "loser")
    win = _gate_in_thread(gate(winner, winner_candidate, winner_champion), results, "winner")
    win.join(WAIT_S)
    winner_done.set()
    lose.join(WAIT_S)
    assert not win.is_alive() and not lose.is_alive(), "a gate hung"
    for label, result in results.items():
        assert isinstance(result, GateResult), f"{label} gate failed: {result!r}"

    won, lost = results["winner"], results["loser"]
    assert won.moved and won.champion_version == old
    assert not lost.moved, f"the loser took the alias: {lost.reason}"
    assert lost.champion_version == winner, "the loser was compared with the champion current at its move"
    assert lost.champion == {"test/loss": 1.0}, "the winner's scores came from its tags"
    assert "does not beat" in lost.reason and f"version {winner}'s 1.0000" in lost.reason
    assert champion_scored_by == [f"winner:{old}", f"loser:{old}"], "the new champion was not scored again"
    assert str(Tracker(registry).champion(NAME).version) == winner
    tags = setup.client.get_model_version(NAME, loser).tags
    assert float(tags["test/loss"]) == 2.0 and tags["gate_test_key"] == KEY


def test_a_changed_champion_without_scores_is_scored_before_the_move(registry: str) -> None:
    """The champion moved to a version never scored on this test split: it is scored (outside the lock) first."""
    tracker = Tracker(registry)
    first, second, mine = _version(tracker), _version(tracker), _version(tracker)
    save_scores(tracker, NAME, second, {"test/loss": 0.1}, "another-test-split")  # not comparable: ignored
    tracker.client.set_registered_model_alias(NAME, CHAMPION, first)
    scored: list[str] = []

    def champion_scores(mv) -> dict[str, float]:
        scored.append(str(mv.version))
        if str(mv.version) == first:  # while this gate scores the old champion, someone crowns another
            tracker.client.set_registered_model_alias(NAME, CHAMPION, second)
            return {"test/loss": 9.0}
        return {"test/loss": 0.5}

    result = challenge(tracker, NAME, mine, KEY, "test/loss", "minimize", lambda: {"test/loss": 1.0}, champion_scores)
    assert scored == [first, second]
    assert not result.moved and result.champion_version == second and result.champion == {"test/loss": 0.5}
    assert str(tracker.champion(NAME).version) == second


def test_the_champion_lock_excludes_other_workers(registry: str) -> None:
    """Two holders on separate connections (as two processes would be) never overlap."""
    Tracker(registry)
    events: list[str] = []
    held = threading.Event()

    def first() -> None:
        with champion_lock(registry, NAME) as kind:
            events.append(f"first in ({kind})")
            held.set()
            time.sleep(0.5)
            events.append("first out")

    def second() -> None:
        _wait(held, "the first holder")
        with champion_lock(registry, NAME):
            events.append("second in")
        with champion_lock(registry, "another-model"):  # other models are not held up
            pass

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    kind = "postgresql advisory lock" if registry.startswith("postgresql") else "file lock"
    assert events == [f"first in ({kind})", "first out", "second in"]


def test_champion_lock_times_out_with_a_message(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    held, waits = champion_lock(uri, NAME), champion_lock(uri, NAME, timeout=0.3)
    with held, pytest.raises(TimeoutError, match=r"'race-model' champion lock .*m\.db\.champion\.lock"), waits:
        pass


def test_a_tracking_server_has_no_shared_lock() -> None:
    with champion_lock("http://127.0.0.1:5000", NAME) as kind:
        assert kind == "none"
