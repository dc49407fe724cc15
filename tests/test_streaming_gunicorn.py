"""Streaming through real gunicorn with a gevent worker: many concurrent streams arrive
piece by piece, and a client that goes away cancels the upstream call and keeps the
partial reply."""
from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
import urllib.error
import urllib.request
import uuid
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from bench.fake_upstream import FakeUpstream
from servers import wait_until

pytestmark = pytest.mark.slow

STREAMS = 200




def get_json(url: str, client_id: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"X-Client-Id": client_id})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def one_stream(session: aiohttp.ClientSession, url: str, message: str,
                     client_id: str) -> dict[str, Any]:
    """POST one streamed chat; return the events with the time each arrived."""
    sent = time.monotonic()
    events: list[tuple[float, dict[str, Any]]] = []
    async with session.post(url + "/api/chat", json={"message": message, "stream": True},
                            headers={"X-Client-Id": client_id}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append((time.monotonic() - sent, json.loads(line[6:])))
    return {"message": message, "client_id": client_id, "events": events}


async def many_streams(url: str, count: int, directives: str) -> tuple[list[dict[str, Any]], float]:
    """Run count streams at once, each with its own message (the cache serves none)."""
    tag = uuid.uuid4().hex[:8]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=90)) as session:
        started = time.monotonic()
        results = await asyncio.gather(*(
            one_stream(session, url, f"stream {tag} {i} {directives}", f"gstream-{tag}-{i}")
            for i in range(count)))
        return list(results), time.monotonic() - started


def check_stream(result: dict[str, Any], pieces: int) -> tuple[float, float]:
    """Check one stream's events; return (first piece, last piece) arrival times."""
    events = [e for _, e in result["events"]]
    assert set(events[0]) == {"conversation_id", "model", "provider"}, events[0]
    done = events[-1]
    assert done["done"] is True and done["finish_reason"] == "stop" and done["cached"] is False, done
    deltas = [(t, e["delta"]) for t, e in result["events"] if "delta" in e]
    assert len(deltas) == pieces, result
    assert len(events) == pieces + 2, events
    assert "".join(d for _, d in deltas) == "Echo: " + result["message"]
    return deltas[0][0], deltas[-1][0]


def summary(label: str, results: list[dict[str, Any]], spans: list[tuple[float, float]],
            wall: float) -> list[float]:
    firsts = [f for f, _ in spans]
    gaps = sorted(last - first for first, last in spans)
    print(f"\n{label}: {len(results)} streams in {wall:.2f} s; first piece median "
          f"{statistics.median(firsts):.3f} s (max {max(firsts):.3f}); first-to-last median "
          f"{statistics.median(gaps):.3f} s (min {gaps[0]:.3f}, 5th pct {gaps[len(gaps) // 20]:.3f})")
    return gaps


def test_200_concurrent_streams_all_complete_and_are_stored(live_server: Any) -> None:
    """200 streams at once, 5 pieces 50 ms apart each: every piece of every stream, in order."""
    results, wall = asyncio.run(many_streams(live_server.url, STREAMS, "#interval=0.05 #pieces=5"))
    assert len(results) == STREAMS
    spans = [check_stream(result, 5) for result in results]
    summary("50 ms pieces", results, spans, wall)
    assert wall < 60
    # What was stored is what was streamed (a sample; each is its own conversation).
    for result in results[:: STREAMS // 20]:
        conversation_id = result["events"][0][1]["conversation_id"]
        status, conv = get_json(f"{live_server.url}/api/conversations/{conversation_id}",
                                result["client_id"])
        assert status == 200, conv
        reply = conv["messages"][1]
        assert reply["content"] == "".join(e["delta"] for _, e in result["events"] if "delta" in e)
        assert reply["finish_reason"] == "stop"


def test_200_concurrent_streams_arrive_piece_by_piece(live_server: Any) -> None:
    """200 streams at once, 5 pieces 0.5 s apart: each stream's first piece reaches the
    client long before its last, i.e. nothing waits for the whole reply.

    The pieces are 0.5 s apart rather than 50 ms: one gevent worker spends ~8 ms of CPU
    per streamed chat, so 200 arriving at once keep it busy for 1.6 s or more (several
    seconds on a loaded 2-core machine), and 50 ms pieces of a stream whose greenlet
    waits behind that work leave the server together however promptly they are relayed.
    """
    results, wall = asyncio.run(many_streams(live_server.url, STREAMS, "#interval=0.5 #pieces=5"))
    spans = [check_stream(result, 5) for result in results]
    gaps = summary("0.5 s pieces", results, spans, wall)
    # The upstream sends each stream's pieces over 2 s; buffered, they would arrive together.
    assert statistics.median(gaps) > 1.0, gaps
    assert sum(gap > 0.5 for gap in gaps) >= 0.95 * STREAMS, gaps
    assert wall < 60


def test_a_single_stream_is_relayed_as_the_upstream_sends_it(live_server: Any) -> None:
    """Pieces reach the client as the upstream sends them (0.5 s, then every 0.4 s)."""
    message = f"timed {uuid.uuid4().hex} #delay=0.5 #interval=0.4 #pieces=4"
    result = asyncio.run(_one(live_server.url, message))
    arrivals = [t for t, e in result["events"] if "delta" in e]
    expected = [0.5 + 0.4 * (i + 1) for i in range(4)]
    lags = [a - e for a, e in zip(arrivals, expected)]
    print(f"\nsingle stream: pieces at {', '.join(f'{a:.3f}' for a in arrivals)} s, "
          f"{max(lags) * 1000:.0f} ms at most after the upstream sent them")
    assert len(arrivals) == 4
    assert all(-0.05 < lag < 0.5 for lag in lags), lags


async def _one(url: str, message: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        return await one_stream(session, url, message, f"gsingle-{uuid.uuid4().hex}")


def read_until_first_delta(sock: socket.socket, timeout: float = 10) -> tuple[str, str]:
    """Read the SSE answer until the first delta; return (conversation id, delta)."""
    sock.settimeout(timeout)
    buffer = b""
    conversation_id = ""
    while True:
        chunk = sock.recv(65536)
        assert chunk, f"stream closed early: {buffer!r}"
        buffer += chunk
        for line in buffer.split(b"\n")[:-1]:  # complete lines only
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "conversation_id" in event and not conversation_id:
                conversation_id = event["conversation_id"]
            if "delta" in event:
                return conversation_id, event["delta"]


@pytest.mark.parametrize("provider", ["g4f", "openai"])
@pytest.mark.parametrize("use_async", [True, False], ids=["async", "thread"])
def test_disconnect_cancels_the_upstream_and_stores_the_partial_reply(
        live_server: Any, upstream: FakeUpstream, use_async: bool, provider: str) -> None:
    client_id = f"gcancel-{uuid.uuid4().hex}"
    message = f"cancel me {uuid.uuid4().hex} #interval=0.2 #pieces=20"
    body = json.dumps({"message": message, "stream": True, "use_async": use_async,
                       "provider": provider}).encode()
    parts = urlsplit(live_server.url)
    before = upstream.stats()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    try:
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"X-Client-Id: %s\r\nContent-Length: %d\r\n\r\n%s"
                     % (parts.netloc.encode(), client_id.encode(), len(body), body))
        conversation_id, first = read_until_first_delta(sock)
    finally:
        sock.close()
    closed_at = time.monotonic()
    assert conversation_id and first

    def cancelled() -> bool:
        now = upstream.stats()
        return (now["streams_cancelled"] > before["streams_cancelled"]
                or now["disconnected"] > before["disconnected"])

    assert wait_until(cancelled, timeout=5), upstream.stats()
    latency = time.monotonic() - closed_at
    print(f"\n[{provider}/{'async' if use_async else 'thread'}] upstream saw the cancel {latency:.3f} s "
          f"after the client closed")
    assert latency < 2.5  # the upstream would stream for ~4 s more otherwise

    def stored() -> Any:
        status, conv = get_json(f"{live_server.url}/api/conversations/{conversation_id}", client_id)
        return conv if status == 200 and len(conv["messages"]) == 2 else None

    conv = wait_until(stored, timeout=5)
    assert conv, get_json(f"{live_server.url}/api/conversations/{conversation_id}", client_id)
    user, reply = conv["messages"]
    assert user["role"] == "user" and user["content"] == message
    assert reply["role"] == "assistant"
    assert reply["finish_reason"] == "cancelled"
    full = "Echo: " + message
    assert reply["content"].startswith(first)
    assert full.startswith(reply["content"]) and len(reply["content"]) < len(full)
