"""Streamed replies (POST /api/chat with stream: true) and the OpenAI-compatible API
(/v1/chat/completions, /v1/models): event order and shape, what is stored, failures,
heartbeats, the cache, disconnects, and OpenAI's objects and error shape."""
from __future__ import annotations

import json
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

PROVIDERS = ["g4f", "openai"]
PATHS = [pytest.param(True, "async", id="async"), pytest.param(False, "thread", id="thread")]


# -- helpers ----------------------------------------------------------------------------

def parse_sse(text: str) -> list[tuple[str, Any]]:
    """Split an event stream into (kind, payload): ("comment", text) or (event name, data)."""
    events: list[tuple[str, Any]] = []
    assert text.endswith("\n\n") or not text, f"unterminated event stream: {text[-200:]!r}"
    for block in text.split("\n\n"):
        if not block:
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append(("comment", line[1:].strip()))
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
            else:
                raise AssertionError(f"not an SSE line: {line!r}")
        if data:
            raw = "\n".join(data)
            events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
    return events


def stream_chat(client: FlaskClient, **body: Any) -> tuple[Any, list[tuple[str, Any]]]:
    response = client.post("/api/chat", json={"stream": True, **body})
    events = parse_sse(response.get_data(as_text=True)) if response.mimetype == "text/event-stream" else []
    return response, events


def data_events(events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [data for kind, data in events if kind == "message"]


def deltas(events: list[tuple[str, Any]]) -> list[str]:
    return [e["delta"] for e in data_events(events) if "delta" in e]


def conversation(client: FlaskClient, conversation_id: str) -> dict[str, Any]:
    response = client.get(f"/api/conversations/{conversation_id}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def conversations(client: FlaskClient) -> list[dict[str, Any]]:
    return client.get("/api/conversations?limit=100").get_json()["conversations"]


def unique(text: str) -> str:
    """Make a message the cache has not seen."""
    return f"{text} {uuid.uuid4().hex[:10]}"




def assert_stream_headers(response: Any) -> None:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers


# -- /api/chat streaming ---------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async,method", PATHS)
def test_stream_events_in_order_through_each_provider_and_path(
        client: FlaskClient, upstream: FakeUpstream, provider: str, use_async: bool, method: str) -> None:
    text = unique(f"stream via {provider} {method}")
    response, events = stream_chat(client, message=text, provider=provider, use_async=use_async)
    assert_stream_headers(response)
    assert all(kind == "message" for kind, _ in events), events  # no error, no heartbeat
    data = data_events(events)
    start, pieces, done = data[0], data[1:-1], data[-1]
    assert start == {"conversation_id": start["conversation_id"], "model": "gpt-4o-mini",
                     "provider": provider}
    uuid.UUID(start["conversation_id"])
    assert len(pieces) >= 2 and all(list(p) == ["delta"] and p["delta"] for p in pieces), pieces
    reply = "".join(p["delta"] for p in pieces)
    assert reply == f"Echo: {text}"
    assert done["done"] is True
    assert done["finish_reason"] == "stop"
    assert done["cached"] is False
    assert done["processing_method"] == method
    assert done["processing_time"] > 0
    uuid.UUID(done["message_id"])
    # What was stored is exactly what was streamed.
    conv = conversation(client, start["conversation_id"])
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    user, assistant = conv["messages"]
    assert user["content"] == text
    assert assistant["content"] == reply
    assert assistant["id"] == done["message_id"]
    assert assistant["finish_reason"] == "stop"
    assert assistant["cached"] is False
    assert conv["title"] == text


def test_pieces_are_relayed_as_they_arrive(client: FlaskClient) -> None:
    text = unique("slow pieces #interval=0.3 #pieces=4")
    started = time.monotonic()
    response = client.post("/api/chat", json={"message": text, "stream": True}, buffered=False)
    arrivals: list[float] = []
    body = ""
    for chunk in response.response:
        chunk = chunk.decode() if isinstance(chunk, bytes) else chunk
        body += chunk
        if '"delta"' in chunk:
            arrivals.append(time.monotonic() - started)
    response.close()
    assert "".join(deltas(parse_sse(body))) == f"Echo: {text}"
    assert len(arrivals) == 4
    # The upstream sends a piece every 0.3 s: the first is relayed long before the last.
    assert arrivals[-1] - arrivals[0] > 0.5, arrivals
    assert arrivals[0] < 1.0, arrivals


def test_finish_reason_length_is_streamed_and_stored(client: FlaskClient, upstream: FakeUpstream) -> None:
    response, events = stream_chat(client, message="alpha beta gamma delta epsilon", max_tokens=2,
                                   provider="openai", cache=False)
    assert_stream_headers(response)
    assert upstream.stats()["last_request"]["max_tokens"] == 2
    done = data_events(events)[-1]
    assert done["finish_reason"] == "length"
    assert "".join(deltas(events)) == "Echo: alpha"
    stored = conversation(client, data_events(events)[0]["conversation_id"])["messages"][1]
    assert stored["content"] == "Echo: alpha"
    assert stored["finish_reason"] == "length"


def test_a_cached_reply_streams_too(client: FlaskClient, upstream: FakeUpstream) -> None:
    text = unique("stream me from the cache")
    first_response, first = stream_chat(client, message=text)
    assert data_events(first)[-1]["cached"] is False
    requests = upstream.stats()["requests"]
    response, events = stream_chat(client, message=text)
    assert_stream_headers(response)
    assert upstream.stats()["requests"] == requests  # no upstream call
    data = data_events(events)
    assert set(data[0]) == {"conversation_id", "model", "provider"}
    assert data[0]["conversation_id"] != data_events(first)[0]["conversation_id"]
    done = data[-1]
    assert done["done"] is True and done["cached"] is True
    assert done["processing_method"] == "cache"
    assert done["finish_reason"] == "stop"
    assert "".join(deltas(events)) == f"Echo: {text}"
    stored = conversation(client, data[0]["conversation_id"])["messages"]
    assert stored[1]["content"] == f"Echo: {text}"
    assert stored[1]["cached"] is True
    assert stored[1]["id"] == done["message_id"]


def test_a_non_streamed_answer_is_served_to_a_stream_from_the_cache(client: FlaskClient,
                                                                    upstream: FakeUpstream) -> None:
    text = unique("asked plainly first")
    assert client.post("/api/chat", json={"message": text}).get_json()["cached"] is False
    requests = upstream.stats()["requests"]
    _, events = stream_chat(client, message=text)
    assert upstream.stats()["requests"] == requests
    assert data_events(events)[-1]["processing_method"] == "cache"
    # And a streamed answer is cached for plain requests.
    text = unique("streamed first")
    stream_chat(client, message=text)
    body = client.post("/api/chat", json={"message": text}).get_json()
    assert body["cached"] is True and body["message"] == f"Echo: {text}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_failure_before_any_piece_is_a_plain_json_error(client: FlaskClient, provider: str) -> None:
    response, _ = stream_chat(client, message=unique("#fail=400"), provider=provider)
    assert response.status_code == 502, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["success"] is False
    assert body["error"]["code"] == "upstream_error"
    assert body["error"]["message"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert conversations(client) == []  # the user turn is not stored without its reply


def test_deadline_before_any_piece_is_a_504(make_app: Callable[..., Flask]) -> None:
    client = new_client(make_app(request_timeout=1))
    started = time.monotonic()
    response, _ = stream_chat(client, message=unique("#hang"))
    assert response.status_code == 504, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 5
    assert conversations(client) == []


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async,method", PATHS)
def test_failure_mid_stream_sends_an_error_event_and_stores_the_partial_reply(
        client: FlaskClient, provider: str, use_async: bool, method: str) -> None:
    text = unique("break after two #streamfail=2")
    response, events = stream_chat(client, message=text, provider=provider, use_async=use_async)
    assert_stream_headers(response)
    kinds = [kind for kind, _ in events]
    assert kinds == ["message", "message", "message", "error"], events
    start = events[0][1]
    pieces = deltas(events)
    assert len(pieces) == 2
    error = events[-1][1]
    assert error["code"] == "upstream_error"
    assert isinstance(error["message"], str) and error["message"]
    assert not any(e.get("done") for e in data_events(events))
    conv = conversation(client, start["conversation_id"])
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][1]["content"] == "".join(pieces)
    assert f"Echo: {text}".startswith(conv["messages"][1]["content"])
    assert conv["messages"][1]["finish_reason"] == "error"
    # A broken reply is not cached.
    _, again = stream_chat(client, message=text, provider=provider, use_async=use_async)
    assert not any(e.get("cached") for e in data_events(again))


@pytest.mark.parametrize("use_async,method", PATHS)
def test_heartbeat_comments_while_the_upstream_is_silent(make_app: Callable[..., Flask],
                                                         use_async: bool, method: str) -> None:
    client = new_client(make_app(stream_heartbeat=0.2))
    text = unique("slow to start #delay=0.7")
    response, events = stream_chat(client, message=text, use_async=use_async)
    assert_stream_headers(response)
    kinds = [kind for kind, _ in events]
    first_delta = next(i for i, (kind, data) in enumerate(events)
                       if kind == "message" and "delta" in data)
    assert kinds[0] == "message"  # the start event comes first
    beats = [i for i, kind in enumerate(kinds) if kind == "comment"]
    assert len(beats) >= 2, events
    assert all(0 < i < first_delta for i in beats), events
    assert "".join(deltas(events)) == f"Echo: {text}"
    assert data_events(events)[-1]["done"] is True
    assert data_events(events)[-1]["processing_method"] == method


def test_continuing_a_conversation_by_stream(client: FlaskClient, upstream: FakeUpstream) -> None:
    first_text, second_text = unique("my name is Ada"), unique("what is my name?")
    _, first = stream_chat(client, message=first_text, system_prompt="Be brief.")
    conversation_id = data_events(first)[0]["conversation_id"]
    response, second = stream_chat(client, message=second_text, conversation_id=conversation_id)
    assert_stream_headers(response)
    assert data_events(second)[0]["conversation_id"] == conversation_id
    assert data_events(second)[-1]["conversation_id"] == conversation_id
    assert upstream.stats()["last_request"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": first_text},
        {"role": "assistant", "content": f"Echo: {first_text}"},
        {"role": "user", "content": second_text},
    ]
    conv = conversation(client, conversation_id)
    assert conv["message_count"] == 4
    assert [m["content"] for m in conv["messages"]] == [
        first_text, f"Echo: {first_text}", second_text, "".join(deltas(second))]


def test_streaming_an_unknown_conversation_is_a_404(client: FlaskClient) -> None:
    response, _ = stream_chat(client, message="hello", conversation_id=str(uuid.uuid4()))
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "conversation_not_found"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("use_async,method", PATHS)
def test_client_going_away_cancels_the_upstream_and_stores_the_partial_reply(
        client: FlaskClient, upstream: FakeUpstream, provider: str, use_async: bool, method: str) -> None:
    text = unique("long reply #interval=0.2 #pieces=20")
    before = upstream.stats()["streams_cancelled"]
    response = client.post("/api/chat", json={"message": text, "stream": True, "provider": provider,
                                              "use_async": use_async}, buffered=False)
    assert_stream_headers(response)
    received = ""
    for chunk in response.response:
        received += chunk.decode() if isinstance(chunk, bytes) else chunk
        if '"delta"' in received:
            break
    response.close()  # what the server does when the client's socket goes away
    closed = time.monotonic()
    assert wait_until(lambda: upstream.stats()["streams_cancelled"] > before, timeout=3)
    assert time.monotonic() - closed < 1.5
    events = parse_sse(received)
    conv = conversation(client, data_events(events)[0]["conversation_id"])
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    reply = conv["messages"][1]
    assert reply["finish_reason"] == "cancelled"
    assert reply["content"] == "".join(deltas(events))
    assert f"Echo: {text}".startswith(reply["content"])


# -- /v1 --------------------------------------------------------------------------------

def completion(client: FlaskClient, messages: list[dict[str, Any]] | str, *,
               headers: dict[str, str] | None = None, **body: Any) -> Any:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return client.post("/v1/chat/completions", json={"messages": messages, **body}, headers=headers)


def assert_openai_error(response: Any, status: int, kind: str, code: str) -> dict[str, Any]:
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == "application/json"
    assert "Traceback" not in text and "<html" not in text.lower()
    error = response.get_json()["error"]
    assert error["type"] == kind
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "success" not in response.get_json()
    return error


def test_v1_completion_object(client: FlaskClient, upstream: FakeUpstream) -> None:
    text = unique("hello openai")
    before = int(time.time())
    response = completion(client, [{"role": "system", "content": "Be kind."},
                                   {"role": "user", "content": text}], model="gpt-4o-mini",
                          temperature=0.5, max_tokens=50)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert before - 1 <= body["created"] <= int(time.time()) + 1
    assert body["model"] == "gpt-4o-mini"
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": f"Echo: {text}"}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert all(isinstance(usage[k], int) and usage[k] > 0
               for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    sent = upstream.stats()["last_request"]
    assert sent["messages"] == [{"role": "system", "content": "Be kind."},
                                {"role": "user", "content": text}]
    assert sent["temperature"] == 0.5 and sent["max_tokens"] == 50
    assert response.headers["X-Cache"] == "MISS"
    assert "X-Conversation-Id" not in response.headers
    assert conversations(client) == []  # stateless


def test_v1_content_parts_and_developer_role(client: FlaskClient, upstream: FakeUpstream) -> None:
    text = unique("parts")
    response = completion(client, [{"role": "developer", "content": "Rules."},
                                   {"role": "user", "content": [{"type": "text", "text": text}]}])
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["choices"][0]["message"]["content"] == f"Echo: {text}"
    assert upstream.stats()["last_request"]["messages"][0] == {"role": "system", "content": "Rules."}


def test_v1_streamed_chunks_end_with_done(client: FlaskClient) -> None:
    text = unique("stream openai")
    response = completion(client, text, stream=True)
    assert_stream_headers(response)
    events = parse_sse(response.get_data(as_text=True))
    assert all(kind == "message" for kind, _ in events), events
    assert events[-1] == ("message", "[DONE]")
    chunks = [data for _, data in events[:-1]]
    assert len(chunks) >= 4
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert isinstance(chunk["created"], int)
        assert chunk["model"] == "gpt-4o-mini"
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == f"Echo: {text}"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert conversations(client) == []  # stateless


def test_v1_stream_failing_mid_way_sends_an_openai_error_without_done(client: FlaskClient) -> None:
    response = completion(client, unique("#streamfail=2"), stream=True)
    assert_stream_headers(response)
    events = parse_sse(response.get_data(as_text=True))
    assert ("message", "[DONE]") not in events
    last = events[-1][1]
    assert last["error"]["code"] == "upstream_error" and last["error"]["message"]
    assert sum(bool(e.get("choices", [{}])[0].get("delta", {}).get("content"))
               for _, e in events[:-1]) == 2
    assert conversations(client) == []


def test_v1_stream_failing_before_any_piece_is_a_502(client: FlaskClient) -> None:
    response = completion(client, unique("#fail=400"), stream=True)
    assert_openai_error(response, 502, "api_error", "upstream_error")


def test_v1_stores_nothing_unless_a_conversation_id_is_sent(client: FlaskClient,
                                                           upstream: FakeUpstream) -> None:
    first_text = unique("remember me")
    conversation_id = str(uuid.uuid4())
    first = completion(client, first_text, headers={"X-Conversation-Id": conversation_id})
    assert first.status_code == 200, first.get_json()
    assert first.headers["X-Conversation-Id"] == conversation_id
    conv = conversation(client, conversation_id)
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("user", first_text), ("assistant", f"Echo: {first_text}")]
    # A second call (streamed this time) continues the stored conversation.
    second_text = unique("and again")
    transcript = [{"role": "user", "content": first_text},
                  {"role": "assistant", "content": f"Echo: {first_text}"},
                  {"role": "user", "content": second_text}]
    second = completion(client, transcript, stream=True, headers={"X-Conversation-Id": conversation_id})
    assert_stream_headers(second)
    chunks = [d for _, d in parse_sse(second.get_data(as_text=True)) if d != "[DONE]"]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == f"Echo: {second_text}"
    assert upstream.stats()["last_request"]["messages"] == transcript
    conv = conversation(client, conversation_id)
    assert conv["message_count"] == 4
    assert [m["content"] for m in conv["messages"]] == [
        first_text, f"Echo: {first_text}", second_text, streamed]
    assert [c["id"] for c in conversations(client)] == [conversation_id]


def test_v1_conversation_of_another_client_is_not_continued(app: Flask) -> None:
    owner, other = new_client(app), new_client(app)
    conversation_id = str(uuid.uuid4())
    mine = completion(owner, unique("mine"), headers={"X-Conversation-Id": conversation_id})
    assert mine.status_code == 200
    response = completion(other, unique("not yours"), headers={"X-Conversation-Id": conversation_id})
    assert_openai_error(response, 404, "not_found_error", "conversation_not_found")
    assert other.get(f"/api/conversations/{conversation_id}").status_code == 404
    assert conversation(owner, conversation_id)["message_count"] == 2


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "gpt-4o-mini"}, "messages"),
], ids=["last-assistant", "temperature", "empty", "role", "model", "max-tokens", "missing"])
def test_v1_invalid_requests_are_400_in_openai_shape(client: FlaskClient, body: dict[str, Any],
                                                     field: str) -> None:
    response = client.post("/v1/chat/completions", json=body)
    error = assert_openai_error(response, 400, "invalid_request_error", "validation_error")
    assert field in json.dumps(error)
    assert conversations(client) == []


def test_v1_unparseable_body_is_400(client: FlaskClient) -> None:
    response = client.post("/v1/chat/completions", data="{not json", content_type="application/json")
    assert_openai_error(response, 400, "invalid_request_error", "invalid_json")


def test_v1_upstream_failure_is_502(client: FlaskClient) -> None:
    assert_openai_error(completion(client, unique("#fail=400")), 502, "api_error", "upstream_error")


def test_v1_deadline_is_504(make_app: Callable[..., Flask]) -> None:
    client = new_client(make_app(request_timeout=1))
    assert_openai_error(completion(client, unique("#hang")), 504, "timeout_error", "upstream_timeout")


def test_v1_rate_limit_is_429_in_openai_shape(make_app: Callable[..., Flask]) -> None:
    client = new_client(make_app(rate_limit_chat="2 per minute"))
    assert completion(client, unique("one")).status_code == 200
    assert completion(client, unique("two"), stream=True).status_code == 200
    response = completion(client, unique("three"))
    assert_openai_error(response, 429, "rate_limit_error", "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    # /api/chat shares the limit.
    assert client.post("/api/chat", json={"message": "four"}).status_code == 429


def test_v1_models(client: FlaskClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == "gpt-4o-mini" and len(ids) == len(set(ids))
    for model in body["data"]:
        assert model["object"] == "model"
        assert model["owned_by"] in (*PROVIDERS, "local")
        assert isinstance(model["created"], int)
    # A listed model can be asked for.
    last = [m["id"] for m in body["data"] if m["owned_by"] in PROVIDERS][-1]
    response = completion(client, unique("listed"), model=last)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["model"] == last
