"""Per-client rate limits on the chat endpoints (API.md: 429 rate_limited, X-RateLimit-*)."""
from __future__ import annotations

import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from conftest import new_client

LIMIT = "3 per minute"
OTHER = {"REMOTE_ADDR": "203.0.113.9"}


def chat(client: FlaskClient, text: str = "hi", headers: dict[str, str] | None = None,
         environ: dict[str, str] | None = None) -> TestResponse:
    return client.post("/api/chat", json={"message": text}, headers=headers or {},
                       environ_base=environ or {})


def completion(client: FlaskClient, text: str = "hi", headers: dict[str, str] | None = None) -> TestResponse:
    return client.post("/v1/chat/completions", headers=headers or {},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})


def assert_limited(response: TestResponse, openai: bool = False) -> None:
    assert response.status_code == 429, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert response.headers["X-RateLimit-Limit"] == "3"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    body = response.get_json()
    if openai:
        assert set(body) == {"error"}
        error = body["error"]
        assert {"message", "type", "code"} <= set(error)
        assert error["code"] == "rate_limited"
        assert error["type"] == "rate_limit_error"
        assert error["message"]
    else:
        assert set(body) == {"success", "error", "request_id"}
        assert body["success"] is False
        assert body["error"]["code"] == "rate_limited"
        assert body["error"]["message"]
        assert body["request_id"] == response.headers["X-Request-ID"]


def use_up(client: FlaskClient, **kwargs: Any) -> None:
    for i in range(3):
        response = chat(client, f"use up {i}", **kwargs)
        assert response.status_code == 200, response.get_json()


@pytest.fixture
def limited(make_app: Any) -> Flask:
    return make_app(rate_limit_chat=LIMIT)


def test_three_chats_pass_and_the_fourth_is_429(limited: Flask, upstream: Any) -> None:
    client = new_client(limited)
    for i in range(3):
        response = chat(client, f"turn {i}")
        assert response.status_code == 200, response.get_json()
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == str(2 - i)
        reset = float(response.headers["X-RateLimit-Reset"])
        assert time.time() - 5 <= reset <= time.time() + 65  # epoch seconds when the window frees a slot
    before_upstream = upstream.stats()["requests"]
    before = len(client.get("/api/conversations?limit=100").get_json()["conversations"])
    response = chat(client, "one too many")
    assert_limited(response)
    assert upstream.stats()["requests"] == before_upstream
    assert len(client.get("/api/conversations?limit=100").get_json()["conversations"]) == before
    assert_limited(chat(client, "still too many"))


def test_streamed_chat_is_limited_too(limited: Flask) -> None:
    client = new_client(limited)
    use_up(client)
    response = client.post("/api/chat", json={"message": "stream please", "stream": True})
    assert_limited(response)


def test_health_and_conversations_are_not_limited(limited: Flask) -> None:
    client = new_client(limited)
    use_up(client)
    assert_limited(chat(client))
    for path in ["/api/health", "/api/health/live", "/api/health/ready", "/api/conversations"] * 3:
        response = client.get(path)
        assert response.status_code == 200, path
        assert "X-RateLimit-Limit" not in response.headers
    assert client.post("/api/conversations", json={}).status_code == 201


def test_the_limit_is_per_client_address(limited: Flask) -> None:
    client = new_client(limited)
    use_up(client)
    assert_limited(chat(client))
    other = chat(client, "from elsewhere", environ=OTHER)
    assert other.status_code == 200
    assert other.headers["X-RateLimit-Remaining"] == "2"


def test_the_client_id_does_not_reset_the_limit(limited: Flask) -> None:
    use_up(new_client(limited))
    assert_limited(chat(new_client(limited), "new client id, same address"))


def test_forged_forwarded_for_is_ignored_by_default(limited: Flask) -> None:
    client = new_client(limited)
    for i in range(3):
        assert chat(client, f"forged {i}", headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code == 200
    assert_limited(chat(client, "forged again", headers={"X-Forwarded-For": "198.51.100.99"}))
    assert_limited(chat(client, "no header"))


def test_forwarded_for_is_believed_behind_a_trusted_proxy(make_app: Any) -> None:
    client = new_client(make_app(rate_limit_chat=LIMIT, trusted_proxy_hops=1))
    alice = {"X-Forwarded-For": "198.51.100.1"}
    for i in range(3):
        assert chat(client, f"alice {i}", headers=alice).status_code == 200
    assert_limited(chat(client, "alice again", headers=alice))
    bob = chat(client, "bob", headers={"X-Forwarded-For": "198.51.100.2"})
    assert bob.status_code == 200
    # With one trusted hop only the address the proxy appended counts, not what the client prepended.
    assert_limited(chat(client, "alice forging", headers={"X-Forwarded-For": "10.9.9.9, 198.51.100.1"}))


def test_the_limit_is_per_key_when_auth_is_on(make_app: Any) -> None:
    client = new_client(make_app(rate_limit_chat=LIMIT, api_keys="k1,k2"))
    k1, k2 = {"Authorization": "Bearer k1"}, {"X-API-Key": "k2"}
    use_up(client, headers=k1)
    assert_limited(chat(client, headers=k1))
    assert_limited(chat(client, headers={"X-API-Key": "k1"}, environ=OTHER))  # same key, other address
    response = chat(client, "k2 has its own budget", headers=k2)
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Remaining"] == "2"


def test_openai_endpoint_shares_the_chat_limit(limited: Flask) -> None:
    client = new_client(limited)
    assert chat(client, "one").status_code == 200
    assert chat(client, "two").status_code == 200
    response = completion(client, "three")
    assert response.status_code == 200, response.get_json()
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert_limited(completion(client, "four"), openai=True)
    assert_limited(chat(client, "five"))


def test_openai_endpoint_alone_is_limited(limited: Flask) -> None:
    client = new_client(limited)
    for i in range(3):
        assert completion(client, f"openai {i}").status_code == 200
    assert_limited(completion(client, "openai 3"), openai=True)
    assert new_client(limited).get("/v1/models").status_code == 200


def test_limits_can_be_switched_off(make_app: Any) -> None:
    client = new_client(make_app(rate_limit_chat="1 per minute", rate_limit_enabled=False))
    for i in range(3):
        assert chat(client, f"unlimited {i}").status_code == 200
