"""Tracker.champion: only "not found" means "no champion"; any other registry error is raised, named.

Were a passing registry hiccup read as "no champion", the gate would crown its candidate without
comparing it with anything. Real MLflow stores: a SQLite file, and a tracking server that is up
but whose registry answers 503.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from sweep.registry.gate import CHAMPION
from sweep.registry.tracking import RegistryError, Tracker

NAME = "race-model"


def _version(tracker: Tracker) -> str:
    if not tracker.client.search_registered_models(f"name = '{NAME}'"):
        tracker.client.create_registered_model(NAME)
    return str(tracker.client.create_model_version(NAME, f"/nonexistent/{uuid.uuid4().hex}").version)


def test_champion_is_none_only_when_not_found(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    assert tracker.champion(NAME) is None, "no such model"
    version = _version(tracker)
    assert tracker.champion(NAME) is None, "no such alias"
    tracker.client.set_registered_model_alias(NAME, CHAMPION, version)
    assert str(tracker.champion(NAME).version) == version


def test_champion_raises_when_the_registry_database_fails(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    tracker = Tracker(f"sqlite:///{db}")
    tracker.client.set_registered_model_alias(NAME, CHAMPION, _version(tracker))
    with sqlite3.connect(db) as conn:  # a broken registry table: the store answers with an error, not "not found"
        conn.execute("ALTER TABLE registered_model_aliases RENAME TO gone")
    with pytest.raises(RegistryError, match=r"registry sqlite:///.*m\.db: cannot read alias 'champion' of model"):
        tracker.champion(NAME)


class _Registry(BaseHTTPRequestHandler):
    """An MLflow tracking server whose registry answers every model request with ``answer`` (status, error code)."""

    answer: tuple[int, str] = (503, "TEMPORARILY_UNAVAILABLE")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if "/registered-models/" in self.path and "/search" not in self.path:
            status, code = self.answer
            body: dict[str, str] = {"error_code": code, "message": f"{code} from the test server"}
        else:
            status, body = 200, {}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def _server_answering(status: int, code: str) -> HTTPServer:
    handler = type("Handler", (_Registry,), {"answer": (status, code)})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_champion_raises_when_the_tracking_server_hiccups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = _server_answering(503, "TEMPORARILY_UNAVAILABLE")
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(RegistryError, match=rf"registry {uri}: cannot read alias 'champion' of model 'race-model'"):
            Tracker(uri).champion(NAME)
    finally:
        server.shutdown()


def test_a_tracking_server_that_says_not_found_means_no_champion() -> None:
    server = _server_answering(404, "RESOURCE_DOES_NOT_EXIST")
    try:
        assert Tracker(f"http://127.0.0.1:{server.server_port}").champion(NAME) is None
    finally:
        server.shutdown()
