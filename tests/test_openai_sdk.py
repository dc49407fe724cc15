"""The official openai Python SDK, pointed at the real server's /v1 (gunicorn, gevent worker):
completions, streamed completions, the model list, and the SDK's error classes for
API.md's statuses (429, 400, 502, 504)."""
from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from bench.fake_upstream import FakeUpstream
from servers import Gunicorn

pytestmark = pytest.mark.slow


def sdk(url: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30, **kwargs)


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:10]}"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def client(live_server: Any) -> Iterator[openai.OpenAI]:
    with sdk(live_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def strict_server(database_url: str, upstream: FakeUpstream) -> Iterator[Gunicorn]:
    """A server with a tight chat limit and a 1 s deadline; the limit is per address, and
    X-Forwarded-For is trusted so that each test speaks from its own address."""
    with Gunicorn(database_url=database_url, upstream_url=upstream.url,
                  rate_limit_chat="2 per minute", request_timeout=1, trusted_proxy_hops=1) as server:
        yield server


def from_own_address(server: Gunicorn) -> openai.OpenAI:
    address = f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"
    return sdk(server.url, default_headers={"X-Forwarded-For": address})


# -- success ------------------------------------------------------------------------------

def test_completion(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    text = unique("hello from the sdk")
    completion = client.chat.completions.create(
        model="gpt-4o-mini", temperature=0.2, max_tokens=64,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}])
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert abs(completion.created - time.time()) < 120
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == f"Echo: {text}"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    sent = upstream.stats()["last_request"]
    assert sent["messages"][-1] == {"role": "user", "content": text}
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 64


def test_streamed_completion_arrives_piece_by_piece(client: openai.OpenAI) -> None:
    text = unique("stream to the sdk #interval=0.2 #pieces=4")
    started = time.monotonic()
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=ask(text), stream=True)
    pieces: list[tuple[float, str]] = []
    finish = []
    ids = set()
    with stream:
        for chunk in stream:
            assert isinstance(chunk, openai.types.chat.ChatCompletionChunk)
            assert chunk.object == "chat.completion.chunk"
            ids.add(chunk.id)
            choice = chunk.choices[0]
            if choice.delta.content:
                pieces.append((time.monotonic() - started, choice.delta.content))
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert len(ids) == 1
    assert "".join(p for _, p in pieces) == f"Echo: {text}"
    assert len(pieces) == 4
    assert finish == ["stop"]
    arrivals = [t for t, _ in pieces]
    print(f"\nsdk stream: pieces at {', '.join(f'{t:.3f}' for t in arrivals)} s")
    # The upstream sends a piece every 0.2 s; relayed as they come, the first arrives
    # about 0.6 s before the last (all together would mean the reply was buffered).
    assert arrivals[-1] - arrivals[0] > 0.35, arrivals
    assert arrivals == sorted(arrivals)


def test_models_list(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    ids = [m.id for m in models]
    assert "gpt-4o-mini" in ids
    assert all(m.object == "model" and m.owned_by for m in models)
    assert client.models.list().data[0].id == ids[0]


def test_stateless_unless_a_conversation_id_is_sent(live_server: Any) -> None:
    client_id = f"sdk-{uuid.uuid4().hex}"
    conversation_id = str(uuid.uuid4())
    with sdk(live_server.url, default_headers={"X-Client-Id": client_id}) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=ask(unique("not kept")))
        text = unique("kept")
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=ask(text), extra_headers={"X-Conversation-Id": conversation_id})
        assert raw.headers["X-Conversation-Id"] == conversation_id
        assert raw.parse().choices[0].message.content == f"Echo: {text}"
    request = urllib.request.Request(live_server.url + "/api/conversations",
                                     headers={"X-Client-Id": client_id})
    with urllib.request.urlopen(request, timeout=10) as response:
        listing = json.loads(response.read())
    assert [c["id"] for c in listing["conversations"]] == [conversation_id]


# -- errors -------------------------------------------------------------------------------

def test_rate_limit_raises_rate_limit_error(strict_server: Gunicorn) -> None:
    with from_own_address(strict_server) as client:
        for i in range(2):
            client.chat.completions.create(model="gpt-4o-mini", messages=ask(unique(f"within {i}")))
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=ask(unique("one too many")))
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=ask(unique("streamed")),
                                           stream=True)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limited"
    assert error.type == "rate_limit_error"
    assert int(error.response.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("kwargs", [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 5},
    {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"},
    {"messages": []},
], ids=["last-is-assistant", "temperature", "unknown-model", "no-messages"])
def test_invalid_request_raises_bad_request_error(client: openai.OpenAI, kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("model", "gpt-4o-mini")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**kwargs)
    assert caught.value.status_code == 400
    assert caught.value.code == "validation_error"
    assert caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kwargs, stream=True)


def test_upstream_failure_raises_api_status_error_502(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=ask(unique("#fail=400")),
                                           stream=stream)
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_error"


def test_upstream_failure_mid_stream_raises_api_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=ask(unique("#streamfail=2")))
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received)  # the pieces before the failure came through
    assert "upstream" in str(caught.value.message) or caught.value.code == "upstream_error"


def test_deadline_raises_api_status_error_504_not_a_client_timeout(strict_server: Gunicorn) -> None:
    with from_own_address(strict_server) as client:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=ask(unique("#hang")))
        assert not isinstance(caught.value, openai.APITimeoutError)
        assert caught.value.status_code == 504
        assert caught.value.code == "upstream_timeout"
        assert time.monotonic() - started < 10
