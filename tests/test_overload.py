"""Load shedding past MAX_INFLIGHT and the one request deadline: a caller gets a fast,
honest answer (503 with Retry-After, or 504 at the deadline) instead of waiting without end."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench.fake_upstream import FakeUpstream
from conftest import new_client
from servers import wait_until

PATHS = [pytest.param(True, id="async"), pytest.param(False, id="thread")]


def load_shed(client: FlaskClient) -> int:
    return int(client.get("/api/metrics").get_json()["load_shed"])


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == "application/json"
    assert "Traceback" not in text and "<html" not in text.lower()
    body = response.get_json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body




@pytest.mark.parametrize("use_async", PATHS)
def test_past_max_inflight_a_chat_is_shed_at_once(make_app: Callable[..., Flask],
                                                  upstream: FakeUpstream, use_async: bool) -> None:
    app = make_app(max_inflight=2)
    dispatcher = app.extensions["chat"].dispatcher
    observer = new_client(app)
    shed_before = load_shed(observer)
    slow: list[Any] = []

    def hold(i: int) -> None:
        slow.append(new_client(app).post("/api/chat", json={
            "message": f"holding {i} {uuid.uuid4()} #delay=1.5", "use_async": use_async}))

    holders = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
    for t in holders:
        t.start()
    assert wait_until(lambda: dispatcher.inflight == 2), "timed out waiting"

    caller = new_client(app)
    started = time.monotonic()
    response = caller.post("/api/chat", json={"message": f"one more {uuid.uuid4()}",
                                              "use_async": use_async})
    took = time.monotonic() - started
    assert_error(response, 503, "overloaded")
    assert took < 0.5, took
    # A short, honest hint: the shed is momentary. (The per-client rate-limit window, a
    # minute long, has nothing to do with it and must not stretch it.)
    assert 1 <= int(response.headers["Retry-After"]) <= 5, response.headers["Retry-After"]

    # Streaming callers are shed the same way, as a plain JSON error before any event.
    streamed = caller.post("/api/chat", json={"message": f"stream one more {uuid.uuid4()}",
                                              "stream": True, "use_async": use_async})
    assert_error(streamed, 503, "overloaded")
    assert 1 <= int(streamed.headers["Retry-After"]) <= 5

    # OpenAI clients get OpenAI's error shape with the same status.
    openai_style = caller.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"v1 {uuid.uuid4()}"}]})
    assert openai_style.status_code == 503
    assert openai_style.get_json()["error"]["message"]
    assert 1 <= int(openai_style.headers["Retry-After"]) <= 5

    assert dispatcher.inflight == 2, "the held chats ended before the shedding was checked"
    assert load_shed(observer) - shed_before == 3
    # Nothing is stored for a shed chat.
    assert caller.get("/api/conversations").get_json()["conversations"] == []

    for t in holders:
        t.join(10)
    assert [r.status_code for r in slow] == [200, 200], [r.get_json() for r in slow]
    assert dispatcher.inflight == 0

    after = caller.post("/api/chat", json={"message": f"after the rush {uuid.uuid4()}",
                                           "use_async": use_async})
    assert after.status_code == 200, after.get_json()
    assert after.get_json()["processing_method"] == ("async" if use_async else "thread")
    assert len(caller.get("/api/conversations").get_json()["conversations"]) == 1


def test_cache_hits_are_served_while_overloaded(make_app: Callable[..., Flask],
                                                upstream: FakeUpstream) -> None:
    """Shedding protects the upstream; an answer already in the cache costs it nothing."""
    app = make_app(max_inflight=1)
    client = new_client(app)
    text = f"cached before the rush {uuid.uuid4()}"
    assert client.post("/api/chat", json={"message": text}).status_code == 200
    holder = threading.Thread(target=lambda: new_client(app).post(
        "/api/chat", json={"message": f"hold {uuid.uuid4()} #delay=1"}))
    holder.start()
    dispatcher = app.extensions["chat"].dispatcher
    assert wait_until(lambda: dispatcher.inflight == 1), "timed out waiting"
    hit = client.post("/api/chat", json={"message": text})
    assert hit.status_code == 200, hit.get_json()
    assert hit.get_json()["processing_method"] == "cache"
    holder.join(10)


@pytest.mark.parametrize("provider", ["g4f", "openai"])
@pytest.mark.parametrize("use_async", PATHS)
def test_slow_upstream_answers_504_at_the_deadline(make_app: Callable[..., Flask],
                                                   upstream: FakeUpstream, provider: str,
                                                   use_async: bool) -> None:
    app = make_app(request_timeout=1.0)
    client = new_client(app)
    started = time.monotonic()
    response = client.post("/api/chat", json={"message": f"too slow {uuid.uuid4()} #delay=3",
                                              "provider": provider, "use_async": use_async})
    took = time.monotonic() - started
    assert_error(response, 504, "upstream_timeout")
    assert took < 2.0, took
    assert took >= 0.9, took
    assert client.get("/api/conversations").get_json()["conversations"] == []
    # The slot is given back: the deadline does not leak in-flight capacity.
    assert app.extensions["chat"].dispatcher.inflight == 0
