"""Retries are MLflow's own, configured per Registry; a store that stays unreachable gives one
clear RegistryUnavailable in bounded time. Real sockets on loopback, no mocks."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.registry import Registry, RegistryUnavailable
from tests.flows.procs import free_port


class _Unavailable(BaseHTTPRequestHandler):
    """An MLflow server that answers every request with 503 (overloaded), counting them."""

    def _answer(self) -> None:
        self.server.hits += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def overloaded_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    server.hits = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_retries_are_mlflows_and_follow_the_registry_settings(overloaded_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # the operator's own setting, kept outside calls
    url = f"http://127.0.0.1:{overloaded_server.server_address[1]}"
    for retries in (1, 3):
        overloaded_server.hits = 0
        with pytest.raises(RegistryUnavailable) as err:
            Registry(url, retries=retries, backoff_s=0).status("m")
        assert overloaded_server.hits == retries  # urllib3's Retry inside MLflow, nothing on top of it
        message = str(err.value)
        assert message.startswith(f"MLflow at {url} is unreachable: get_registered_model failed {retries} time(s)")
        assert "\n" not in message
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"


def test_a_dead_server_fails_fast_with_a_clear_message():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=rf"^MLflow at {url} is unreachable: .*failed 2 time\(s\) "
                                                  r"\(.*Connection refused.*\)$"):
        Registry(url, retries=2, backoff_s=0.5).info("m", "champion")
    assert time.monotonic() - started < 30


def test_settings_are_checked():
    with pytest.raises(ValueError, match="retries"):
        Registry("http://127.0.0.1:1", retries=0)


def test_different_settings_never_overlap_and_are_put_back(monkeypatch):
    """MLflow reads MLFLOW_HTTP_REQUEST_* from os.environ per request: a client with other settings
    waits until the first one's calls are done, and the operator's values come back afterwards."""
    from tasks.registry.mlflow_env import mlflow_http_settings

    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    monkeypatch.setenv(key, "7")
    inside, release, seen = threading.Event(), threading.Event(), []

    def first():
        with mlflow_http_settings({key: "1"}):
            inside.set()
            release.wait(10)
            seen.append(("first", os.environ[key]))

    def second():
        with mlflow_http_settings({key: "4"}):
            seen.append(("second", os.environ[key]))

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    time.sleep(0.2)
    assert seen == []  # the second waits
    release.set()
    a.join(10)
    b.join(10)
    assert seen == [("first", "1"), ("second", "4")] and os.environ[key] == "7"
