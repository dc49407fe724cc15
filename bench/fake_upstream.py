"""Fake OpenAI-compatible chat server for tests and the load benchmark.

Run it with ``python -m bench.fake_upstream --host 127.0.0.1 --port 0``. The last user
message steers one request through directives such as ``#delay=2``, ``#fail=429``,
``#fail=500*2 #id=k``, ``#hang``, ``#garbage``, ``#empty``, ``#interval=0.1``,
``#pieces=3`` and ``#streamfail=2``; see ``parse_directives``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

MODELS = ("fake-model", "gpt-4o-mini", "fake-model-2")
BACKLOG = 4096
READY_PREFIX = "fake upstream listening on "
_DIRECTIVE = re.compile(r"#([A-Za-z_]+)(?:=(\S+))?")
_ERROR_KINDS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


@dataclass
class Options:
    """Server settings, the same as the command-line flags."""

    host: str = "127.0.0.1"
    port: int = 0
    latency: float = 0.0
    fail_rate: float = 0.0
    seed: int = 1
    stream_interval: float = 0.05
    pieces: int = 5


class State:
    """Hold counters, per-id failure counts and the random source."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        self.requests = self.in_flight = self.max_in_flight = self.completed = 0
        self.disconnected = self.streams_cancelled = self.streams_failed = 0
        self.models_requests = 0
        self.by_status: dict[str, int] = {}
        self.fail_counts: dict[str, int] = {}
        self.last_request: Any = None
        self.headers: dict[str, str] = {}

    def snapshot(self) -> dict[str, Any]:
        """Return the counters as a JSON-ready dict."""
        return {
            "requests": self.requests, "by_status": dict(self.by_status),
            "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
            "completed": self.completed, "disconnected": self.disconnected,
            "streams_cancelled": self.streams_cancelled,
            "streams_failed": self.streams_failed,
            "models_requests": self.models_requests,
            "last_request": self.last_request, "headers": self.headers,
        }


STATE = web.AppKey("state", State)


def message_text(content: Any) -> str:
    """Flatten a message content (string or list of parts) into text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def parse_directives(text: str) -> dict[str, str]:
    """Collect ``#key=value`` and ``#key`` tokens; a bare key maps to ``""``."""
    return {key.lower(): value or "" for key, value in _DIRECTIVE.findall(text)}


def error_response(status: int, message: str) -> web.Response:
    """Build an OpenAI-shaped error answer."""
    kind, code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "api_error", "upstream_error"))
    headers = {"Retry-After": "0"} if status == 429 else None
    body = {"error": {"message": message, "type": kind, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def split_pieces(text: str, count: int) -> list[str]:
    """Cut text into at most count non-empty pieces that join back to it."""
    size = max(1, -(-len(text) // max(1, count)))
    return [text[i:i + size] for i in range(0, len(text), size)]


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
    event = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


async def models(request: web.Request) -> web.Response:
    """List the fake models."""
    request.app[STATE].models_requests += 1
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Answer a chat completion, counting clients that leave before the end."""
    state = request.app[STATE]
    state.requests += 1
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    state.headers = {k.lower(): v for k, v in request.headers.items()}
    streaming = False
    status = 0
    try:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            resp: web.StreamResponse = error_response(400, "body must be JSON with a messages list")
        else:
            state.last_request = body
            streaming = bool(body.get("stream"))
            try:
                resp = await _answer(request, state, body, streaming)
            except (ValueError, TypeError) as exc:
                resp = error_response(400, f"fake upstream: bad directive or parameter: {exc}")
        status = resp.status
        state.completed += 1
        return resp
    except (asyncio.CancelledError, ConnectionError):
        state.disconnected += 1
        state.streams_cancelled += streaming
        status = 499  # nginx's "client closed request", so by_status shows them
        raise
    finally:
        state.in_flight -= 1
        state.by_status[str(status)] = state.by_status.get(str(status), 0) + 1


async def _answer(request: web.Request, state: State, body: dict[str, Any], streaming: bool) -> web.StreamResponse:
    opts = state.options
    messages = body["messages"]
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    prompt = message_text(users[-1].get("content")) if users else ""
    directives = parse_directives(prompt)
    # Draw on every request so the failure pattern for a seed does not depend on directives.
    random_fail = state.rng.random() < opts.fail_rate

    await asyncio.sleep(float(directives.get("delay", opts.latency)))
    if "hang" in directives:
        await asyncio.Future()
    fail = directives.get("fail")
    if fail:
        code, _, times = fail.partition("*")
        key = directives.get("id", "")
        seen = state.fail_counts.get(key, 0)
        state.fail_counts[key] = seen + 1
        if not times or seen < int(times):
            return error_response(int(code), f"fake upstream: injected {code} error")
    elif random_fail:
        return error_response(500, "fake upstream: random failure")
    if "garbage" in directives:
        return web.Response(text="<html>502 not json at all", content_type="application/json")

    reply = "Echo: " + prompt
    finish = "stop"
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    words = reply.split()
    if isinstance(limit, int) and len(words) > limit:
        reply, finish = " ".join(words[:limit]), "length"
    model = str(body.get("model") or MODELS[0])
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
    prompt_tokens = sum(len(message_text(m.get("content")).split()) for m in messages if isinstance(m, dict))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply.split()),
             "total_tokens": prompt_tokens + len(reply.split())}
    empty = "empty" in directives
    if not streaming:
        message = {"role": "assistant", "content": reply}
        choices = [] if empty else [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]
        return web.json_response({**base, "object": "chat.completion", "choices": choices, "usage": usage})

    base["object"] = "chat.completion.chunk"
    interval = float(directives.get("interval", opts.stream_interval))
    pieces = [] if empty else split_pieces(reply, int(directives.get("pieces", opts.pieces)))
    break_after = int(directives["streamfail"]) if "streamfail" in directives else None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(_chunk(base, {"role": "assistant", "content": ""}, None))
    for sent, piece in enumerate(pieces):
        if sent == break_after:
            break
        await asyncio.sleep(interval)
        await resp.write(_chunk(base, {"content": piece}, None))
    if break_after is not None and break_after <= len(pieces):
        state.streams_failed += 1
        # Closing mid-body leaves the chunked response unterminated: clients see a broken stream.
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write(_chunk(base, {}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        tail = {**base, "choices": [], "usage": usage}
        await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def stats(request: web.Request) -> web.Response:
    """Report the counters."""
    return web.json_response(request.app[STATE].snapshot())


async def reset(request: web.Request) -> web.Response:
    """Zero the counters."""
    request.app[STATE].reset()
    return web.json_response({"ok": True})


async def build_app(options: Any) -> web.Application:
    """Build the aiohttp application for the given options."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = State(options)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset)
    return app


def _raise_fd_limit() -> None:
    # 1000+ held connections need more descriptors than the usual soft limit of 1024.
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ImportError, ValueError, OSError):
        pass


async def serve(options: Options) -> None:
    """Listen until SIGTERM or SIGINT, printing the ready line once listening."""
    # handler_cancellation delivers CancelledError to handlers whose client went away.
    runner = web.AppRunner(await build_app(options), access_log=None,
                           handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    sock.listen(BACKLOG)
    await web.SockSite(runner, sock, backlog=BACKLOG).start()
    host = f"[{options.host}]" if ":" in options.host else options.host
    print(f"{READY_PREFIX}http://{host}:{sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def parse_args(argv: list[str] | None = None) -> Options:
    """Read the command-line flags into Options."""
    p = argparse.ArgumentParser(prog="python -m bench.fake_upstream", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction answered 500")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stream-interval", type=float, default=0.05)
    p.add_argument("--pieces", type=int, default=5)
    return Options(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    """Run the server from the command line."""
    options = parse_args(argv)
    _raise_fd_limit()
    try:
        asyncio.run(serve(options))
    except KeyboardInterrupt:
        pass


def _pump(stream: Any, lines: queue.Queue[str]) -> None:
    """Forward lines from a pipe to a queue, then an empty string at end of file."""
    for line in stream:
        lines.put(line)
    lines.put("")


class FakeUpstream:
    """Run the fake upstream in a subprocess for the length of a with-block."""

    def __init__(self, *, latency: float = 0.0, fail_rate: float = 0.0, seed: int = 1,
                 stream_interval: float = 0.05, pieces: int = 5, host: str = "127.0.0.1",
                 port: int = 0, startup_timeout: float = 15.0) -> None:
        self.args = ["--host", host, "--port", str(port), "--latency", str(latency),
                     "--fail-rate", str(fail_rate), "--seed", str(seed),
                     "--stream-interval", str(stream_interval), "--pieces", str(pieces)]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.root = ""

    @property
    def url(self) -> str:
        """Return the OpenAI base URL, ending in /v1."""
        return self.root + "/v1"

    def start(self) -> FakeUpstream:
        """Start the subprocess and wait for its ready line."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fake_upstream", *self.args],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        # A thread rather than select(): pipes cannot be polled on Windows, and it keeps draining stdout.
        threading.Thread(target=_pump, args=(self.proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.root:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if not line:
                self.stop()
                raise RuntimeError(f"fake upstream did not start (exit code {self.proc.poll()})")
            if line.startswith(READY_PREFIX):
                self.root = line[len(READY_PREFIX):].strip()
        return self

    def stop(self) -> None:
        """Terminate the subprocess, killing it after 3 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stats(self) -> dict[str, Any]:
        """Fetch the server's counters."""
        with urllib.request.urlopen(self.root + "/_stats", timeout=5) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        """Zero the server's counters."""
        urllib.request.urlopen(urllib.request.Request(self.root + "/_reset", data=b"", method="POST"), timeout=5).close()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
