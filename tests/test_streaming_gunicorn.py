"""Streaming through real gunicorn with a gevent worker: many concurrent streams arrive
piece by piece, and a client that goes away cancels the upstream call and keeps the
partial reply."""
from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from bench.fake_upstream import FakeUpstream

pytestmark = pytest.mark.slow

STREAMS = 200
PIECES = 5
INTERVAL = 0.05


def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.02) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            return value
        time.sleep(step)


def get_json(url: str, client_id: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"X-Client-Id": client_id})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def one_stream(session: aiohttp.ClientSession, url: str, message: str) -> dict[str, Any]:
    """POST one streamed chat; return the events with the time each arrived."""
    sent = time.monotonic()
    events: list[tuple[float, dict[str, Any]]] = []
    async with session.post(url + "/api/chat", json={"message": message, "stream": True},
                            headers={"X-Client-Id": f"gstream-{uuid.uuid4().hex}"}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append((time.monotonic() - sent, json.loads(line[6:])))
    return {"message": message, "events": events, "total": time.monotonic() - sent}


async def many_streams(url: str, count: int) -> tuple[list[dict[str, Any]], float]:
    tag = uuid.uuid4().hex[:8]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        results = await asyncio.gather(*(
            one_stream(session, url, f"stream {tag} {i} #interval={INTERVAL} #pieces={PIECES}")
            for i in range(count)))
        return list(results), time.monotonic() - started


def test_200_concurrent_streams_arrive_piece_by_piece(live_server: Any) -> None:
    results, wall = asyncio.run(many_streams(live_server.url, STREAMS))
    assert len(results) == STREAMS
    gaps, firsts = [], []
    for result in results:
        events = [e for _, e in result["events"]]
        assert "conversation_id" in events[0] and "delta" not in events[0]
        assert events[-1]["done"] is True and events[-1]["finish_reason"] == "stop"
        assert events[-1]["cached"] is False
        deltas = [(t, e["delta"]) for t, e in result["events"] if "delta" in e]
        assert len(deltas) == PIECES, result
        assert "".join(d for _, d in deltas) == "Echo: " + result["message"]
        first, last = deltas[0][0], deltas[-1][0]
        gaps.append(last - first)
        firsts.append(first)
    # The upstream spaces its pieces 4 x 50 ms apart: relayed at once, each stream's first
    # piece lands well before its last, rather than all of them together at the end.
    print(f"\n{STREAMS} streams: wall {wall:.2f} s; first piece median {statistics.median(firsts):.3f} s, "
          f"max {max(firsts):.3f} s; first-to-last gap median {statistics.median(gaps):.3f} s, "
          f"min {min(gaps):.3f} s")
    assert statistics.median(gaps) >= 0.12
    assert sum(g >= 0.05 for g in gaps) >= 0.95 * STREAMS
    assert wall < 30


def read_until_first_delta(sock: socket.socket, timeout: float = 10) -> tuple[str, str]:
    """Read the SSE answer until the first delta; return (conversation id, delta)."""
    sock.settimeout(timeout)
    buffer = b""
    conversation_id = ""
    while True:
        chunk = sock.recv(65536)
        assert chunk, f"stream closed early: {buffer!r}"
        buffer += chunk
        for line in buffer.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "conversation_id" in event and not conversation_id:
                conversation_id = event["conversation_id"]
            if "delta" in event:
                return conversation_id, event["delta"]


@pytest.mark.parametrize("use_async", [True, False], ids=["async", "thread"])
def test_disconnect_cancels_the_upstream_and_stores_the_partial_reply(
        live_server: Any, upstream: FakeUpstream, use_async: bool) -> None:
    client_id = f"gcancel-{uuid.uuid4().hex}"
    message = f"cancel me {uuid.uuid4().hex} #interval=0.2 #pieces=20"
    body = json.dumps({"message": message, "stream": True, "use_async": use_async}).encode()
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
    print(f"\n[{'async' if use_async else 'thread'}] upstream saw the cancel {latency:.3f} s "
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
