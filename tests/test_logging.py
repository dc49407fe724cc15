"""Logs: one JSON object a line with the request id; no message text unless LOG_BODIES; no keys ever."""
from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from flask import Flask

API_KEY = "sk-test-apikey-" + uuid.uuid4().hex
UPSTREAM_KEY = "sk-upstream-" + uuid.uuid4().hex
ADMIN_KEY = "admin-" + uuid.uuid4().hex
ACCESS_FIELDS = ("time", "level", "request_id", "method", "path", "status", "duration_ms", "client")


class Captured:
    """The JSON log lines the app's own handler wrote."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def raw(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.raw().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)  # every line is one JSON object
            assert isinstance(record, dict), line
            out.append(record)
        return out

    def access(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.lines() if r.get("logger") == "chat.access" and r.get("path") == path]


@pytest.fixture
def logged(make_app: Callable[..., Flask]) -> Iterator[Callable[..., tuple[Flask, Captured]]]:
    """Build an app with INFO logs and capture what its JSON handler writes."""
    handlers: list[tuple[logging.Handler, Any]] = []

    def factory(**overrides: Any) -> tuple[Flask, Captured]:
        app = make_app(log_level="INFO", api_keys=API_KEY, admin_key=ADMIN_KEY,
                       llm_api_key=UPSTREAM_KEY, **overrides)
        handler = next(h for h in logging.getLogger().handlers if getattr(h, "_chat_handler", False))
        assert isinstance(handler, logging.StreamHandler)
        stream = io.StringIO()
        handlers.append((handler, handler.setStream(stream)))
        return app, Captured(stream)

    yield factory
    for handler, old in reversed(handlers):
        handler.setStream(old)
    logging.getLogger().setLevel(logging.WARNING)


def auth(**more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", **more}


def test_access_lines_are_json_with_request_fields_and_no_bodies(
        logged: Callable[..., tuple[Flask, Captured]]) -> None:
    app, logs = logged()
    client = app.test_client()
    secret_text = f"my private question {uuid.uuid4().hex}"

    answered = client.post("/api/chat", json={"message": secret_text, "use_async": False},
                           headers=auth(**{"X-Request-ID": "log-test-1"}))
    assert answered.status_code == 200
    keyed = client.post("/api/chat", json={"message": secret_text}, headers={"X-API-Key": API_KEY})
    assert keyed.get_json()["processing_method"] == "cache"
    assert client.get("/api/conversations", headers=auth()).status_code == 200
    wrong = client.get("/api/conversations", headers={"Authorization": "Bearer wrong-key-0123456789"})
    assert wrong.status_code == 401
    failed = client.post("/api/chat", json={"message": f"{secret_text} #fail=401"}, headers=auth())
    assert failed.status_code == 502
    assert client.post("/api/clear-cache", headers={"X-Admin-Key": ADMIN_KEY}).status_code == 200

    chats = logs.access("/api/chat")
    assert len(chats) == 3
    first = next(r for r in chats if r["request_id"] == "log-test-1")
    for field in ACCESS_FIELDS:
        assert field in first, field
    assert first["method"] == "POST" and first["status"] == 200
    assert first["processing_method"] == "thread"
    assert isinstance(first["duration_ms"], (int, float)) and first["duration_ms"] >= 0
    assert first["client"] == "127.0.0.1"
    assert first["level"] == "INFO"
    datetime.strptime(first["time"], "%Y-%m-%dT%H:%M:%S%z")
    assert {r["status"] for r in chats} == {200, 502}
    assert sorted(r.get("processing_method") for r in chats if r["status"] == 200) == ["cache", "thread"]
    unauthorized = logs.access("/api/conversations")
    assert sorted(r["status"] for r in unauthorized) == [200, 401]
    assert all(len(r["request_id"]) >= 8 for r in logs.access("/api/conversations"))

    raw = logs.raw()
    assert secret_text not in raw, "message text must not be logged unless LOG_BODIES is on"
    assert "chat_message" not in raw
    for secret in (API_KEY, UPSTREAM_KEY, ADMIN_KEY, "wrong-key-0123456789", "Bearer"):
        assert secret not in raw, secret


def test_log_bodies_adds_the_message_cut_to_500_chars(
        logged: Callable[..., tuple[Flask, Captured]]) -> None:
    app, logs = logged(log_bodies=True)
    client = app.test_client()
    tag = uuid.uuid4().hex
    long_text = f"long {tag} " + "x" * 1200

    assert client.post("/api/chat", json={"message": long_text}, headers=auth()).status_code == 200
    transcript = {"messages": [{"role": "user", "content": f"first {tag}"},
                               {"role": "assistant", "content": "ok"},
                               {"role": "user", "content": f"second {tag}"}]}
    assert client.post("/api/chat", json=transcript, headers=auth()).status_code == 200
    completion = client.post("/v1/chat/completions", headers=auth(), json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": f"parts {tag}"}]}]})
    assert completion.status_code == 200
    with client.post("/api/chat", json={"message": f"streamed {tag}", "stream": True},
                     headers=auth()) as streamed:
        assert streamed.status_code == 200
        assert b'"done":true' in streamed.get_data()
    # A body with the key in it still logs no key.
    leaky = client.post("/api/chat", json={"message": f"my key is {API_KEY}"}, headers=auth())
    assert leaky.status_code == 200

    chats = logs.access("/api/chat")
    bodies = [r.get("chat_message") for r in chats]
    assert long_text[:500] in bodies and all(b is None or len(b) <= 500 for b in bodies)
    assert f"second {tag}" in bodies
    assert "my key is [redacted]" in bodies
    stream_line = next(r for r in chats if r.get("chat_message") == f"streamed {tag}")
    assert stream_line["streamed"] is True and stream_line["status"] == 200
    assert stream_line["processing_method"] in ("async", "thread")
    (openai_line,) = logs.access("/v1/chat/completions")
    assert openai_line["chat_message"] == f"parts {tag}"
    assert openai_line["processing_method"] in ("async", "thread")
    assert all(r.get("processing_method") for r in chats)
    assert API_KEY not in logs.raw() and UPSTREAM_KEY not in logs.raw()
    # Other endpoints never log bodies.
    client.post("/api/conversations", json={"title": f"title {tag}"}, headers=auth())
    assert f"title {tag}" not in logs.raw()


def test_error_lines_carry_the_request_id(logged: Callable[..., tuple[Flask, Captured]]) -> None:
    app, logs = logged()
    client = app.test_client()
    response = client.post("/api/chat", json={"message": f"boom {uuid.uuid4()} #fail=500"},
                           headers=auth(**{"X-Request-ID": "err-req-42"}))
    assert response.status_code == 502
    lines = [r for r in logs.lines() if r.get("request_id") == "err-req-42"]
    assert any(r["level"] == "WARNING" and r["logger"] == "chat.handlers" for r in lines), lines
    assert any(r.get("logger") == "chat.access" and r["status"] == 502 for r in lines)
    assert UPSTREAM_KEY not in logs.raw()
