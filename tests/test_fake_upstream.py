"""Tests for the fake OpenAI-compatible upstream in bench/fake_upstream.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest


from bench.fake_upstream import FakeUpstream, parse_directives, split_pieces


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """Run one fake upstream for the whole module."""
    with FakeUpstream(stream_interval=0.01, pieces=4) as up:
        yield up


@pytest.fixture
def client(upstream: FakeUpstream) -> openai.OpenAI:
    """Return an SDK client without retries, on zeroed counters."""
    upstream.reset()
    return openai.OpenAI(base_url=upstream.url, api_key="test-key", max_retries=0)


def ask(client: openai.OpenAI, text: str, **kwargs: Any) -> Any:
    """Send one user message to the fake model."""
    return client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": text}], **kwargs)


def wait_for(upstream: FakeUpstream, key: str, value: int, timeout: float = 3.0) -> dict[str, Any]:
    """Poll the stats until key reaches value, then return them."""
    deadline = time.monotonic() + timeout
    while True:
        stats = upstream.stats()
        if stats[key] >= value or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_helpers() -> None:
    assert parse_directives("hi #fail=500*2 #id=k #hang") == {"fail": "500*2", "id": "k", "hang": ""}
    assert "".join(split_pieces("Echo: hello", 4)) == "Echo: hello"
    assert len(split_pieces("Echo: hello", 4)) == 4


def test_completion_and_models(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    reply = ask(client, "hello there")
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 2 and reply.usage.total_tokens == 5
    cut = ask(client, "one two three four", max_tokens=2)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("Echo: one", "length")
    assert [m.id for m in client.models.list()] == ["fake-model", "gpt-4o-mini", "fake-model-2"]
    stats = upstream.stats()
    assert stats["requests"] == 2 and stats["by_status"] == {"200": 2}
    assert stats["last_request"]["max_tokens"] == 2
    assert stats["headers"]["authorization"] == "Bearer test-key"


def test_stream_pieces_join_into_echo(client: openai.OpenAI) -> None:
    chunks = list(ask(client, "stream this please #pieces=3", stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) == 3
    assert "".join(pieces) == "Echo: stream this please #pieces=3"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_fail_then_succeed(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    text = "retry me #fail=500*2 #id=retry-1"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as err:
            ask(client, text)
        assert err.value.body["type"] == "server_error"
    assert ask(client, text).choices[0].message.content == "Echo: " + text
    with pytest.raises(openai.RateLimitError) as err:
        ask(client, "#fail=429")
    assert err.value.response.headers["retry-after"] == "0"
    assert upstream.stats()["by_status"] == {"500": 2, "200": 1, "429": 1}


def test_sdk_retries_through_failures(upstream: FakeUpstream) -> None:
    upstream.reset()
    retrying = openai.OpenAI(base_url=upstream.url, api_key="x", max_retries=2)
    assert ask(retrying, "#fail=429*2 #id=sdk-retry").choices[0].finish_reason == "stop"
    assert upstream.stats()["requests"] == 3


def test_broken_answers(client: openai.OpenAI) -> None:
    assert ask(client, "#empty").choices == []
    with pytest.raises(ValueError):  # the SDK's json.loads on a body that is not JSON
        ask(client, "#garbage")
    with pytest.raises(openai.APIConnectionError):
        list(ask(client, "a b c d e f #streamfail=1", stream=True))


def test_hang_disconnect_is_counted(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "#hang"}])
    assert time.monotonic() - started < 2
    stats = wait_for(upstream, "disconnected", 1)
    assert stats["disconnected"] == 1 and stats["in_flight"] == 0 and stats["completed"] == 0


def test_stream_cancelled_is_counted(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    stream = ask(client, "slow stream #interval=0.5 #pieces=10", stream=True)
    next(iter(stream))
    stream.close()
    stats = wait_for(upstream, "streams_cancelled", 1)
    assert stats["streams_cancelled"] == 1 and stats["disconnected"] == 1


def test_many_slow_requests_overlap(upstream: FakeUpstream) -> None:
    upstream.reset()

    async def run(count: int) -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one(i: int) -> int:
                body = {"model": "fake-model", "messages": [{"role": "user", "content": f"n{i} #delay=1"}]}
                async with session.post(upstream.url + "/chat/completions", json=body) as resp:
                    assert (await resp.json())["choices"][0]["message"]["content"] == f"Echo: n{i} #delay=1"
                    return resp.status
            return await asyncio.gather(*(one(i) for i in range(count)))

    started = time.monotonic()
    statuses = asyncio.run(run(500))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 500
    assert elapsed < 3.0, elapsed  # measured about 1.5 s on 2 cores; serial would take 500 s
    assert upstream.stats()["max_in_flight"] >= 400


def test_g4f_custom_provider(upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # g4f picks its folders at import and logs usage there; keep them out of $HOME when we import it first.
    monkeypatch.setenv("G4F_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("G4F_CACHE_DIR", str(tmp_path / "cache"))
    from g4f.client import factory
    from g4f.client import AsyncClient

    async def run() -> tuple[str, str]:
        client = AsyncClient(provider=factory.create_custom_provider(base_url=upstream.url, api_key="x"))
        messages = [{"role": "user", "content": "hi g4f"}]
        whole = await client.chat.completions.create(model="fake-model", messages=messages)
        pieces = [c.choices[0].delta.content async for c in client.chat.completions.stream(
            model="fake-model", messages=messages) if c.choices and c.choices[0].delta.content]
        return whole.choices[0].message.content, "".join(pieces)

    assert asyncio.run(run()) == ("Echo: hi g4f", "Echo: hi g4f")
