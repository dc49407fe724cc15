"""API keys, ownership by key, and the admin key (API.md, "Identity and ownership")."""
from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from conftest import new_client

REMOTE = {"REMOTE_ADDR": "203.0.113.9"}


def assert_error(response: TestResponse, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"success", "error", "request_id"}
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["request_id"] == response.headers["X-Request-ID"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed_app(make_app: Any) -> Flask:
    return make_app(api_keys="k1,k2")


# Endpoints that need a key when auth is on: (method, path, JSON body).
PROTECTED = [
    ("POST", "/api/chat", {"message": "hello"}),
    ("GET", "/api/conversations", None),
    ("POST", "/api/conversations", {"title": "t"}),
    ("GET", f"/api/conversations/{uuid.uuid4()}", None),
    ("PATCH", f"/api/conversations/{uuid.uuid4()}", {"title": "t"}),
    ("DELETE", f"/api/conversations/{uuid.uuid4()}", None),
    ("GET", "/api/metrics", None),
]


def test_auth_is_off_by_default(client: FlaskClient) -> None:
    response = client.post("/api/chat", json={"message": "anyone may ask"})
    assert response.status_code == 200, response.get_json()
    conv_id = response.get_json()["conversation_id"]
    assert client.get("/api/conversations").status_code == 200
    assert client.get(f"/api/conversations/{conv_id}").status_code == 200
    # A key sent to a server without keys is ignored, not refused.
    assert client.post("/api/chat", json={"message": "with a key"}, headers=bearer("whatever")).status_code == 200


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"X-API-Key": "wrong"}, bearer(""),
                                     {"Authorization": "Basic azE6"}, {"Authorization": "k1"},
                                     {"X-API-Key": "k1k2"}, bearer("k1,k2")],
                         ids=["no key", "wrong bearer", "wrong x-api-key", "empty bearer", "basic auth",
                              "no scheme", "joined keys", "comma list"])
def test_missing_or_wrong_key_is_401(keyed_app: Flask, headers: dict[str, str]) -> None:
    client = new_client(keyed_app)
    for method, path, body in PROTECTED:
        response = client.open(path, method=method, json=body, headers=headers)
        assert_error(response, 401, "unauthorized")


def test_nothing_is_stored_without_a_key(keyed_app: Flask, upstream: Any) -> None:
    client = new_client(keyed_app)
    # Other tests share the database and key k1: compare with what k1 held before.
    stored = client.get("/api/conversations?limit=100", headers=bearer("k1")).get_json()["conversations"]
    before = upstream.stats()["requests"]
    assert_error(client.post("/api/chat", json={"message": "sneaky"}), 401, "unauthorized")
    assert upstream.stats()["requests"] == before
    after = client.get("/api/conversations?limit=100", headers=bearer("k1")).get_json()["conversations"]
    assert after == stored
    assert "sneaky" not in [c["title"] for c in after]


@pytest.mark.parametrize("headers", [bearer("k1"), {"X-API-Key": "k2"}, {"Authorization": "bearer k1"},
                                     {"X-API-Key": " k2 "}],
                         ids=["bearer k1", "x-api-key k2", "lower-case scheme", "padded key"])
def test_valid_keys_are_accepted(keyed_app: Flask, headers: dict[str, str]) -> None:
    client = new_client(keyed_app)
    response = client.post("/api/chat", json={"message": "let me in"}, headers=headers)
    assert response.status_code == 200, response.get_json()
    conv_id = response.get_json()["conversation_id"]
    listed = client.get("/api/conversations", headers=headers)
    assert listed.status_code == 200
    assert conv_id in [c["id"] for c in listed.get_json()["conversations"]]
    assert client.post("/api/conversations", json={}, headers=headers).status_code == 201


def test_openai_api_needs_a_key_and_answers_in_its_shape(keyed_app: Flask) -> None:
    client = new_client(keyed_app)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for path, method, payload in (("/v1/chat/completions", "POST", body), ("/v1/models", "GET", None)):
        response = client.open(path, method=method, json=payload)
        assert response.status_code == 401
        error = response.get_json()["error"]
        assert error["code"] == "unauthorized"
        assert error["type"] == "authentication_error"
        assert error["message"]
    response = client.post("/v1/chat/completions", json=body, headers=bearer("k2"))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["choices"][0]["message"]["content"] == "Echo: hi"
    assert client.get("/v1/models", headers={"X-API-Key": "k1"}).status_code == 200


@pytest.mark.parametrize("path", ["/api/health", "/api/health/live", "/api/health/ready", "/"])
def test_health_and_the_page_stay_public(keyed_app: Flask, path: str) -> None:
    response = new_client(keyed_app).get(path)
    assert response.status_code == 200, response.get_data(as_text=True)[:200]


def test_cors_preflight_needs_no_key(keyed_app: Flask) -> None:
    response = new_client(keyed_app).options("/api/chat", headers={
        "Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 200
    assert response.headers.get("Access-Control-Allow-Origin")


def test_conversations_are_owned_by_the_key(keyed_app: Flask) -> None:
    # Client ids do not matter when auth is on: the key is the owner.
    alice, alice_elsewhere, bob = new_client(keyed_app), new_client(keyed_app), new_client(keyed_app)
    mine = alice.post("/api/chat", json={"message": "k1 secret"}, headers=bearer("k1")).get_json()
    theirs = bob.post("/api/chat", json={"message": "k2 secret"}, headers=bearer("k2")).get_json()
    mine_id, theirs_id = mine["conversation_id"], theirs["conversation_id"]

    same_key = alice_elsewhere.get(f"/api/conversations/{mine_id}", headers={"X-API-Key": "k1"})
    assert same_key.status_code == 200
    assert same_key.get_json()["title"] == "k1 secret"

    listed = alice.get("/api/conversations?limit=100", headers=bearer("k1")).get_json()["conversations"]
    assert mine_id in [c["id"] for c in listed]
    assert theirs_id not in [c["id"] for c in listed]

    for method, path, body in (("GET", f"/api/conversations/{theirs_id}", None),
                               ("PATCH", f"/api/conversations/{theirs_id}", {"title": "mine now"}),
                               ("DELETE", f"/api/conversations/{theirs_id}", None),
                               ("POST", "/api/chat", {"message": "and more", "conversation_id": theirs_id})):
        assert_error(alice.open(path, method=method, json=body, headers=bearer("k1")), 404,
                     "conversation_not_found")
    conv = bob.get(f"/api/conversations/{theirs_id}", headers=bearer("k2")).get_json()
    assert conv["title"] == "k2 secret"
    assert conv["message_count"] == 2


# -- admin ---------------------------------------------------------------------

def clear(client: FlaskClient, headers: dict[str, str] | None = None,
          environ: dict[str, str] | None = None) -> TestResponse:
    return client.post("/api/clear-cache", headers=headers or {}, environ_base=environ or {})


@pytest.mark.parametrize("headers", [{"X-Admin-Key": "adm"}, bearer("adm")], ids=["x-admin-key", "bearer"])
@pytest.mark.parametrize("environ", [{}, REMOTE], ids=["loopback", "remote"])
def test_admin_key_opens_clear_cache(make_app: Any, headers: dict[str, str], environ: dict[str, str]) -> None:
    client = new_client(make_app(admin_key="adm"))
    client.post("/api/chat", json={"message": "cache this"})
    response = clear(client, headers, environ)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"success": True, "cleared": 1}


@pytest.mark.parametrize("headers", [{}, {"X-Admin-Key": "wrong"}, bearer("wrong"), {"X-Admin-Key": "ADM"},
                                     {"X-Admin-Key": "adm2"}],
                         ids=["none", "wrong x-admin-key", "wrong bearer", "wrong case", "longer key"])
@pytest.mark.parametrize("environ", [{}, REMOTE], ids=["loopback", "remote"])
def test_clear_cache_without_the_admin_key_is_403(make_app: Any, headers: dict[str, str],
                                                  environ: dict[str, str]) -> None:
    client = new_client(make_app(admin_key="adm"))
    client.post("/api/chat", json={"message": "keep me cached"})
    assert_error(clear(client, headers, environ), 403, "forbidden")
    again = client.post("/api/chat", json={"message": "keep me cached"}).get_json()
    assert again["cached"] is True  # nothing was cleared


def test_without_admin_key_only_loopback_may_clear(client: FlaskClient) -> None:
    assert_error(clear(client, environ=REMOTE), 403, "forbidden")
    assert_error(clear(client, headers=bearer("anything"), environ=REMOTE), 403, "forbidden")
    assert_error(clear(client, environ={"REMOTE_ADDR": "10.0.0.5"}), 403, "forbidden")
    assert clear(client).status_code == 200
    assert clear(client, environ={"REMOTE_ADDR": "::1"}).status_code == 200


def test_forwarded_for_does_not_make_a_remote_caller_loopback(client: FlaskClient) -> None:
    response = clear(client, headers={"X-Forwarded-For": "127.0.0.1"}, environ=REMOTE)
    assert_error(response, 403, "forbidden")


def test_admin_key_with_api_keys_on(make_app: Any) -> None:
    client = new_client(make_app(api_keys="k1", admin_key="adm"))
    assert clear(client, headers={"X-Admin-Key": "adm"}, environ=REMOTE).status_code == 200
    assert clear(client, headers=bearer("adm")).status_code == 200
    assert_error(clear(client, headers=bearer("k1")), 403, "forbidden")  # an API key is not the admin key
    assert_error(clear(client), 403, "forbidden")


def test_api_key_alone_does_not_open_admin_to_remote_callers(make_app: Any) -> None:
    client = new_client(make_app(api_keys="k1"))
    assert_error(clear(client, headers=bearer("k1"), environ=REMOTE), 403, "forbidden")
    assert_error(clear(client, environ=REMOTE), 401, "unauthorized")
    assert clear(client, headers=bearer("k1")).status_code == 200
