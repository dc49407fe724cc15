"""Every bad input of API.md answers the right status and error shape, and stores nothing."""
from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from conftest import new_client


def assert_error(response: TestResponse, status: int, code: str,
                 fields: set[str] | None = None) -> dict[str, Any]:
    """Check API.md's error shape; return the error object."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"success", "error", "request_id"}
    assert body["success"] is False
    assert body["request_id"] and body["request_id"] == response.headers["X-Request-ID"]
    error = body["error"]
    assert set(error) <= {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    if fields is not None:
        details = error["details"]
        assert isinstance(details, list) and details
        for item in details:
            assert isinstance(item["field"], str) and item["field"]
            assert isinstance(item["message"], str) and item["message"]
        assert fields <= {item["field"] for item in details}, details
    return error


def conversation_count(client: FlaskClient) -> int:
    response = client.get("/api/conversations?limit=100")
    assert response.status_code == 200
    return len(response.get_json()["conversations"])


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


# id, settings overrides, body, expected fields named in details
INVALID_CHATS: list[tuple[str, dict[str, Any], Any, set[str]]] = [
    ("empty message", {}, {"message": ""}, {"message"}),
    ("whitespace message", {}, {"message": "  \n\t  "}, {"message"}),
    ("message not a string", {}, {"message": 123}, {"message"}),
    ("message over the limit", {"max_message_chars": 50}, {"message": "x" * 51}, {"message"}),
    ("transcript turn over the limit", {"max_message_chars": 50},
     {"messages": [user("y" * 51)]}, {"messages.0.content"}),
    ("both message and messages", {}, {"message": "hi", "messages": [user("hi")]}, set()),
    ("neither message nor messages", {}, {"model": "gpt-4o-mini"}, set()),
    ("empty messages", {}, {"messages": []}, {"messages"}),
    ("too many messages", {"max_messages": 3},
     {"messages": [user("a"), {"role": "assistant", "content": "b"}, user("c"),
                   {"role": "assistant", "content": "d"}, user("e")]}, {"messages"}),
    ("last message not from user", {},
     {"messages": [user("a"), {"role": "assistant", "content": "b"}]}, {"messages"}),
    ("bad role", {}, {"messages": [{"role": "robot", "content": "beep"}, user("hi")]},
     {"messages.0.role"}),
    ("message turn without content", {}, {"messages": [{"role": "user"}]}, {"messages.0.content"}),
    ("temperature above 2", {}, {"message": "hi", "temperature": 2.5}, {"temperature"}),
    ("temperature below 0", {}, {"message": "hi", "temperature": -0.1}, {"temperature"}),
    ("temperature not a number", {}, {"message": "hi", "temperature": "warm"}, {"temperature"}),
    ("max_tokens 0", {}, {"message": "hi", "max_tokens": 0}, {"max_tokens"}),
    ("max_tokens over 32768", {}, {"message": "hi", "max_tokens": 32769}, {"max_tokens"}),
    ("unknown model", {}, {"message": "hi", "model": "no-such-model"}, {"model"}),
    ("unknown provider", {}, {"message": "hi", "provider": "no-such-provider"}, {"provider"}),
    ("unknown provider with a model", {},
     {"message": "hi", "provider": "no-such-provider", "model": "gpt-4o-mini"}, {"provider"}),
    ("unknown provider with messages", {},
     {"messages": [user("hi")], "provider": "no-such-provider"}, {"provider"}),
    ("conversation_id not a uuid", {}, {"message": "hi", "conversation_id": "not-a-uuid"},
     {"conversation_id"}),
    ("conversation_id with messages", {},
     {"messages": [user("hi")], "conversation_id": str(uuid.uuid4())}, set()),
    ("stream not a bool", {}, {"message": "hi", "stream": "sometimes"}, {"stream"}),
    ("body is a list", {}, [{"message": "hi"}], {"body"}),
    ("body is a string", {}, "hi", {"body"}),
]


@pytest.mark.parametrize("overrides,body,fields", [case[1:] for case in INVALID_CHATS],
                         ids=[case[0] for case in INVALID_CHATS])
def test_invalid_chat_is_422_and_stores_nothing(make_app: Any, overrides: dict[str, Any], body: Any,
                                                fields: set[str]) -> None:
    client = new_client(make_app(**overrides))
    before = conversation_count(client)
    response = client.post("/api/chat", json=body)
    error = assert_error(response, 422, "validation_error", fields)
    assert error["details"]  # every validation error says which field and why
    assert conversation_count(client) == before


def test_every_bad_field_is_listed_at_once(client: FlaskClient) -> None:
    response = client.post("/api/chat", json={
        "message": "hi", "temperature": 9, "max_tokens": 0, "conversation_id": "nope",
        "stream": "maybe", "cache": "perhaps"})
    error = assert_error(response, 422, "validation_error",
                         {"temperature", "max_tokens", "conversation_id", "stream", "cache"})
    for field in ("temperature", "max_tokens", "conversation_id", "stream", "cache"):
        assert field in error["message"]


@pytest.mark.parametrize("limit,fields", [("max_messages", "messages"), ("max_message_chars", "message")])
def test_limits_at_the_bound_pass(make_app: Any, limit: str, fields: str) -> None:
    client = new_client(make_app(**{limit: 3}))
    if fields == "messages":
        body: dict[str, Any] = {"messages": [user("a"), {"role": "assistant", "content": "b"}, user("c")]}
    else:
        body = {"message": "  abc  "}  # three characters after trimming
    response = client.post("/api/chat", json=body)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("raw", ["{bad json", "", "{\"message\": \"hi\"", "[1,", "\"unterminated",
                                 "{'message': 'single quotes'}"],
                         ids=["garbage", "empty", "unclosed object", "unclosed array", "unclosed string",
                              "single quotes"])
def test_malformed_json_is_400(client: FlaskClient, raw: str) -> None:
    before = conversation_count(client)
    response = client.post("/api/chat", data=raw, content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert conversation_count(client) == before


def test_body_that_is_not_utf8_is_400(client: FlaskClient) -> None:
    response = client.post("/api/chat", data=b"\xff\xfe\x00{", content_type="application/json")
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("path", ["/api/chat", "/api/conversations"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_body_that_is_not_json_is_415(client: FlaskClient, path: str, content_type: str | None) -> None:
    before = conversation_count(client)
    kwargs: dict[str, Any] = {"data": json.dumps({"message": "hi", "title": "t"})}
    if content_type:
        kwargs["content_type"] = content_type
    response = client.post(path, **kwargs)
    assert_error(response, 415, "unsupported_media_type")
    assert conversation_count(client) == before


def test_json_with_charset_is_accepted(client: FlaskClient) -> None:
    response = client.post("/api/chat", data=json.dumps({"message": "charset"}),
                           content_type="application/json; charset=utf-8")
    assert response.status_code == 200, response.get_json()


def test_conversation_that_is_not_yours_is_404_and_nothing_is_stored(app: Flask) -> None:
    owner, intruder = new_client(app), new_client(app)
    theirs = owner.post("/api/chat", json={"message": "private thoughts"}).get_json()["conversation_id"]
    before = conversation_count(intruder)

    response = intruder.post("/api/chat", json={"message": "let me in", "conversation_id": theirs})
    error = assert_error(response, 404, "conversation_not_found")
    assert "details" not in error or not error["details"]
    missing = intruder.post("/api/chat", json={"message": "let me in",
                                               "conversation_id": str(uuid.uuid4())})
    assert_error(missing, 404, "conversation_not_found")

    assert conversation_count(intruder) == before
    conv = owner.get(f"/api/conversations/{theirs}").get_json()
    assert conv["message_count"] == 2
    assert [m["content"] for m in conv["messages"]] == ["private thoughts", "Echo: private thoughts"]


def test_streamed_chat_validates_before_streaming(client: FlaskClient) -> None:
    response = client.post("/api/chat", json={"message": "hi", "stream": True, "model": "nope"})
    assert_error(response, 422, "validation_error", {"model"})
    response = client.post("/api/chat", json={"message": "hi", "stream": True,
                                              "conversation_id": str(uuid.uuid4())})
    assert_error(response, 404, "conversation_not_found")


def test_body_over_max_body_bytes_is_413(make_app: Any) -> None:
    client = new_client(make_app(max_body_bytes=2048))
    before = conversation_count(client)
    response = client.post("/api/chat", json={"message": "z" * 3000})
    assert_error(response, 413, "payload_too_large")
    response = client.post("/api/conversations", json={"title": "t", "system_prompt": "z" * 3000})
    assert_error(response, 413, "payload_too_large")
    assert conversation_count(client) == before
    assert client.post("/api/chat", json={"message": "small enough"}).status_code == 200


@pytest.mark.parametrize("method,path", [("GET", "/api/nope"), ("POST", "/api/nope"),
                                         ("GET", "/api/chat/extra"), ("GET", "/nope"),
                                         ("DELETE", "/api/conversations/a/b")])
def test_unknown_route_is_404_json(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)
    error = assert_error(response, 404, "not_found")
    assert "<html" not in response.get_data(as_text=True).lower()
    assert path in error["message"]


@pytest.mark.parametrize("method,path", [("GET", "/api/chat"), ("PUT", "/api/chat"),
                                         ("DELETE", "/api/chat"), ("PUT", "/api/conversations"),
                                         ("DELETE", "/api/conversations"),
                                         ("POST", f"/api/conversations/{uuid.uuid4()}"),
                                         ("GET", "/api/clear-cache"), ("POST", "/api/health")])
def test_wrong_method_is_405_json(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method, json={"message": "hi"})
    assert_error(response, 405, "method_not_allowed")
    assert "<html" not in response.get_data(as_text=True).lower()
    assert method not in response.headers.get("Allow", "")
    assert response.headers.get("Allow")  # RFC 9110: a 405 names the methods that are allowed


def test_unknown_extra_fields_are_ignored(client: FlaskClient) -> None:
    before = conversation_count(client)
    response = client.post("/api/chat", json={"message": "old client", "mode": "roast",
                                              "roastLevel": 11, "nested": {"a": [1, 2]}})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["message"] == "Echo: old client"
    assert conversation_count(client) == before + 1
    response = client.post("/api/chat", json={
        "messages": [{"role": "user", "content": "old transcript", "name": "ada", "ts": 1}],
        "roastLevel": "max"})
    assert response.status_code == 200, response.get_json()
    response = client.post("/api/conversations", json={"title": "extra", "mode": "roast"})
    assert response.status_code == 201


def test_invalid_conversation_bodies(client: FlaskClient) -> None:
    before = conversation_count(client)
    assert_error(client.post("/api/conversations", json={"title": 5}), 422, "validation_error", {"title"})
    assert_error(client.post("/api/conversations", json={"model": "no-such-model"}), 422,
                 "validation_error", {"model"})
    assert_error(client.post("/api/conversations", json=["title"]), 422, "validation_error", {"body"})
    assert_error(client.post("/api/conversations", data="{", content_type="application/json"), 400,
                 "invalid_json")
    assert conversation_count(client) == before
