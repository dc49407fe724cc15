"""What a caller gets when the model provider fails: retries on transient errors only,
502/504 in API.md's error shape, never a traceback or HTML, and nothing half-stored."""
from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench.fake_upstream import FakeUpstream
from conftest import new_client

PROVIDERS = ["g4f", "openai"]
PATHS = [pytest.param(True, id="async"), pytest.param(False, id="thread")]


def chat(client: FlaskClient, **body: Any) -> Any:
    return client.post("/api/chat", json=body)


def key() -> str:
    """Return a fresh #id for per-key failure counting in the fake upstream."""
    return uuid.uuid4().hex[:12]


def upstream_requests(upstream: FakeUpstream) -> int:
    return int(upstream.stats()["requests"])


def retries(client: FlaskClient) -> int:
    return int(client.get("/api/metrics").get_json()["upstream"]["retries"])


def assert_api_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """Check API.md's error shape; never HTML, never a traceback."""
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == "application/json"
    assert "Traceback" not in text
    assert "<html" not in text.lower()
    assert 'File "' not in text
    body = response.get_json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


def assert_nothing_stored(client: FlaskClient) -> None:
    listing = client.get("/api/conversations")
    assert listing.status_code == 200
    assert listing.get_json()["conversations"] == []


# -- retried: 5xx and 429 ---------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async", PATHS)
def test_500_twice_then_success_is_retried(client: FlaskClient, upstream: FakeUpstream,
                                           provider: str, use_async: bool) -> None:
    before_requests, before_retries = upstream_requests(upstream), retries(client)
    text = f"flaky #fail=500*2 #id={key()}"
    response = chat(client, message=text, provider=provider, use_async=use_async)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["message"] == f"Echo: {text}"
    assert body["processing_method"] == ("async" if use_async else "thread")
    assert upstream_requests(upstream) - before_requests == 3
    assert retries(client) - before_retries == 2
    # The exchange is stored once, with the successful reply.
    conv = client.get(f"/api/conversations/{body['conversation_id']}").get_json()
    assert [m["content"] for m in conv["messages"]] == [text, f"Echo: {text}"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async", PATHS)
def test_429_then_success_is_retried(client: FlaskClient, upstream: FakeUpstream,
                                     provider: str, use_async: bool) -> None:
    before_requests, before_retries = upstream_requests(upstream), retries(client)
    text = f"busy #fail=429*1 #id={key()}"
    response = chat(client, message=text, provider=provider, use_async=use_async)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["message"] == f"Echo: {text}"
    assert upstream_requests(upstream) - before_requests == 2
    assert retries(client) - before_retries == 1


# -- not retried: 4xx ---------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async", PATHS)
@pytest.mark.parametrize("status", [400, 401])
def test_client_errors_from_upstream_are_not_retried(client: FlaskClient, upstream: FakeUpstream,
                                                     provider: str, use_async: bool,
                                                     status: int) -> None:
    before_requests, before_retries = upstream_requests(upstream), retries(client)
    response = chat(client, message=f"refused #fail={status} #id={key()}", provider=provider,
                    use_async=use_async)
    body = assert_api_error(response, 502, "upstream_error")
    message = body["error"]["message"]
    assert provider in message
    assert str(status) in message
    assert upstream_requests(upstream) - before_requests == 1
    assert retries(client) - before_retries == 0
    assert_nothing_stored(client)


# -- retries run out ----------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async", PATHS)
def test_500_on_every_attempt_answers_502_after_three_tries(client: FlaskClient,
                                                            upstream: FakeUpstream,
                                                            provider: str, use_async: bool) -> None:
    before_requests, before_retries = upstream_requests(upstream), retries(client)
    response = chat(client, message=f"down for good #fail=500 #id={key()}", provider=provider,
                    use_async=use_async)
    body = assert_api_error(response, 502, "upstream_error")
    assert provider in body["error"]["message"]
    assert "500" in body["error"]["message"]
    assert upstream_requests(upstream) - before_requests == 3  # RETRY_ATTEMPTS default
    assert retries(client) - before_retries == 2
    assert_nothing_stored(client)


def test_retry_attempts_setting_bounds_the_tries(make_app: Callable[..., Flask],
                                                 upstream: FakeUpstream) -> None:
    client = new_client(make_app(retry_attempts=5))
    before = upstream_requests(upstream)
    response = chat(client, message=f"five tries #fail=503 #id={key()}", provider="openai")
    assert_api_error(response, 502, "upstream_error")
    assert upstream_requests(upstream) - before == 5


# -- the deadline -------------------------------------------------------------------------

def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async", PATHS)
def test_hanging_upstream_answers_504_at_the_deadline(make_app: Callable[..., Flask],
                                                      upstream: FakeUpstream,
                                                      provider: str, use_async: bool) -> None:
    app = make_app(request_timeout=1)
    client = new_client(app)
    before = upstream.stats()["disconnected"]
    started = time.monotonic()
    response = chat(client, message=f"hang {key()} #hang", provider=provider, use_async=use_async)
    elapsed = time.monotonic() - started
    body = assert_api_error(response, 504, "upstream_timeout")
    assert body["error"]["message"]
    assert 1.0 <= elapsed < 2.0, elapsed
    assert_nothing_stored(client)
    # The upstream call is abandoned, not left running: the upstream sees the client leave.
    assert wait_for(lambda: upstream.stats()["disconnected"] > before), \
        f"upstream still holds the {provider} {'async' if use_async else 'thread'} request"
    # ... and nothing of it keeps running here: no loop task, no busy pool thread.
    dispatcher = app.extensions["chat"].dispatcher

    def idle() -> bool:
        state = dispatcher.status()
        return state["async_loop"]["pending_tasks"] == 0 and state["thread_pool"]["busy"] == 0

    assert wait_for(idle, timeout=2.0), dispatcher.status()
    assert dispatcher.inflight == 0


# -- unreadable answers -------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async", PATHS)
@pytest.mark.parametrize("directive", ["#garbage", "#empty"])
def test_unreadable_answer_is_502(client: FlaskClient, upstream: FakeUpstream, provider: str,
                                  use_async: bool, directive: str) -> None:
    response = chat(client, message=f"odd {key()} {directive}", provider=provider,
                    use_async=use_async)
    body = assert_api_error(response, 502, "upstream_error")
    assert provider in body["error"]["message"]
    assert "502 Bad Gateway" not in body["error"]["message"]  # the upstream's HTML is not echoed
    assert_nothing_stored(client)


# -- upstream down --------------------------------------------------------------------------

def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async", PATHS)
def test_unreachable_upstream_answers_502_quickly(make_app: Callable[..., Flask], provider: str,
                                                  use_async: bool) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    client = new_client(make_app(g4f_base_url=dead, llm_base_url=dead))
    started = time.monotonic()
    response = chat(client, message=f"anyone there {key()}", provider=provider, use_async=use_async)
    elapsed = time.monotonic() - started
    body = assert_api_error(response, 502, "upstream_error")
    assert provider in body["error"]["message"]
    assert elapsed < 2.0, elapsed
    assert_nothing_stored(client)


# -- a failed turn leaves an existing conversation as it was --------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async", PATHS)
def test_failed_turn_leaves_the_conversation_unchanged(client: FlaskClient, upstream: FakeUpstream,
                                                       provider: str, use_async: bool) -> None:
    first = chat(client, message=f"remember this {key()}", provider=provider, use_async=use_async)
    assert first.status_code == 200, first.get_json()
    conv_id = first.get_json()["conversation_id"]
    before = client.get(f"/api/conversations/{conv_id}").get_json()
    assert before["message_count"] == 2

    for directive in ("#fail=500", "#fail=400", "#garbage"):
        failed = chat(client, message=f"then this {key()} {directive}", conversation_id=conv_id,
                      provider=provider, use_async=use_async)
        assert_api_error(failed, 502, "upstream_error")

    after = client.get(f"/api/conversations/{conv_id}").get_json()
    assert after["message_count"] == 2
    assert after["messages"] == before["messages"]
    assert after["updated_at"] == before["updated_at"]
    listing = client.get("/api/conversations").get_json()["conversations"]
    assert [c["id"] for c in listing] == [conv_id]


def test_failures_are_not_cached(client: FlaskClient, upstream: FakeUpstream) -> None:
    """A failed answer must not be replayed: the same question asks the upstream again."""
    text = f"fails once #fail=500*3 #id={key()}"
    assert_api_error(chat(client, message=text), 502, "upstream_error")
    before = upstream_requests(upstream)
    again = chat(client, message=text)
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["cached"] is False
    assert upstream_requests(upstream) - before == 1
