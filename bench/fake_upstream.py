"""Fake OpenAI-compatible chat server on loopback, for tests and the load benchmark.

Run: ``python -m bench.fake_upstream --host 127.0.0.1 --port 0 [--latency S]
[--fail-rate P] [--seed N] [--stream-interval S] [--pieces N]``.
The reply is ``"Echo: " + last user message``. Directives in that message steer one
request: ``#delay=S``, ``#fail=STATUS``, ``#fail=STATUS*N`` with ``#id=KEY`` (fail the
first N requests of that id), ``#hang``, ``#garbage``, ``#empty``, ``#interval=S``,
``#pieces=N``, ``#streamfail=K`` (close the connection after K streamed pieces).
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from aiohttp import web

MODELS = ("fake-model", "gpt-4o-mini", "fake-model-2")
BACKLOG = 4096
READY_PREFIX = "fake upstream listening on "
_DIRECTIVE = re.compile(r"#([A-Za-z_]+)(?:=(\S+))?")
_ERROR_KINDS = {400: ("invalid_request_error", "invalid_request"), 401: ("authentication_error", "invalid_api_key"),
                403: ("permission_error", "forbidden"), 404: ("not_found_error", "model_not_found"),
                429: ("rate_limit_error", "rate_limit_exceeded")}
_STATS = ("requests", "by_status", "in_flight", "max_in_flight", "completed", "disconnected", "streams_cancelled",
          "streams_failed", "models_requests", "last_request", "headers")
# Loopback must never go through an HTTP proxy taken from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
    """Hold the counters, the per-id failure counts and the random source."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters, keeping the in-flight gauge true."""
        self.requests = self.completed = self.disconnected = 0
        self.streams_cancelled = self.streams_failed = self.models_requests = 0
        self.max_in_flight, self.last_request = self.in_flight, None
        self.by_status: dict[str, int] = {}
        self.fail_counts: dict[str, int] = {}
        self.headers: dict[str, str] = {}

    def snapshot(self) -> dict[str, Any]:
        """Return the counters as a JSON-ready dict."""
        return {name: getattr(self, name) for name in _STATS}


STATE = web.AppKey("state", State)


def message_text(content: Any) -> str:
    """Flatten a message content (a string or a list of parts) into text."""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def parse_directives(text: str) -> dict[str, str]:
    """Collect ``#key=value`` and ``#key`` tokens; a bare key maps to ``""``."""
    return {key.lower(): value or "" for key, value in _DIRECTIVE.findall(text)}


def split_pieces(text: str, count: int) -> list[str]:
    """Cut text into at most count non-empty pieces that join back into it."""
    size = max(1, -(-len(text) // max(1, count)))
    return [text[i:i + size] for i in range(0, len(text), size)]


def error_response(status: int, message: str) -> web.Response:
    """Build an OpenAI-shaped error answer."""
    kind, code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "api_error", "upstream_error"))
    headers = {"Retry-After": "0"} if status == 429 else None
    body = {"error": {"message": message, "type": kind, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _event(base: dict[str, Any], delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
    """Encode one server-sent event; delta None gives an empty choices list."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + json.dumps({**base, "choices": choices, **extra}, separators=(",", ":")).encode() + b"\n\n"


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
    streaming, status = False, 0
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
        status = 499  # nginx's "client closed request"
        raise
    finally:
        state.in_flight -= 1
        state.by_status[str(status)] = state.by_status.get(str(status), 0) + 1


async def _answer(request: web.Request, state: State, body: dict[str, Any], streaming: bool) -> web.StreamResponse:
    """Answer a well-formed request as its directives and the options say."""
    opts, messages = state.options, body["messages"]
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    prompt = message_text(users[-1].get("content")) if users else ""
    directives = parse_directives(prompt)
    # Draw on every request so that a seed gives the same failures whatever the directives.
    random_fail = state.rng.random() < opts.fail_rate
    delay = float(directives.get("delay", opts.latency))
    if delay > 0:
        await asyncio.sleep(delay)
    if "hang" in directives:
        await asyncio.get_running_loop().create_future()
    if fail := directives.get("fail"):
        code, _, times = fail.partition("*")
        key = directives.get("id", "")
        seen = state.fail_counts[key] = state.fail_counts.get(key, 0) + 1
        if not times or seen <= int(times):
            return error_response(int(code), f"fake upstream: injected {code} error")
    elif random_fail:
        return error_response(500, "fake upstream: random failure")
    if "garbage" in directives:
        return web.Response(text="<html>502 Bad Gateway, not JSON", content_type="application/json")

    reply, finish = "Echo: " + prompt, "stop"
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(limit, int) and len(words := reply.split()) > limit:
        reply, finish = " ".join(words[:limit]), "length"
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": str(body.get("model") or MODELS[0])}
    prompt_tokens = sum(len(message_text(m.get("content")).split()) for m in messages if isinstance(m, dict))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply.split())}
    usage["total_tokens"] = prompt_tokens + usage["completion_tokens"]
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
    await resp.write(_event(base, {"role": "assistant", "content": ""}, None))
    for sent, piece in enumerate(pieces):
        if sent == break_after:
            break
        await asyncio.sleep(interval)
        await resp.write(_event(base, {"content": piece}, None))
    if break_after is not None and break_after <= len(pieces):
        state.streams_failed += 1
        # Closing mid-body leaves the chunked answer unterminated, as a crashed upstream would.
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write(_event(base, {}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(_event(base, None, usage=usage))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def stats(request: web.Request) -> web.Response:
    """Report the counters on GET, zero them on POST."""
    if request.method == "POST":
        request.app[STATE].reset()
    return web.json_response(request.app[STATE].snapshot())


async def build_app(options: Any) -> web.Application:
    """Build the application; options needs the fields of Options except host and port."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = State(options)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", stats)
    return app


def _raise_fd_limit() -> None:
    """Lift the soft open-files limit towards the hard one."""
    # 1000+ held connections need more descriptors than the usual soft limit of 1024.
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536) if hard > 0 else 65536), hard))
    except (ImportError, ValueError, OSError):
        pass


async def serve(options: Options) -> None:
    """Listen until SIGTERM or SIGINT, printing the ready line once listening."""
    # handler_cancellation raises CancelledError in handlers whose client went away.
    runner = web.AppRunner(await build_app(options), access_log=None,
                           handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    sock.listen(BACKLOG)
    await web.SockSite(runner, sock, backlog=BACKLOG).start()
    print(f"{READY_PREFIX}http://{options.host}:{sock.getsockname()[1]}", flush=True)
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
    """Read the command-line flags (one per Options field) into Options."""
    p = argparse.ArgumentParser(prog="python -m bench.fake_upstream", description=__doc__.splitlines()[0])
    for f in fields(Options):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
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
    """Copy lines from a pipe into a queue."""
    for line in stream:
        lines.put(line)
    lines.put("")  # end of file: the server died


class FakeUpstream:
    """Run the fake upstream in a subprocess for the length of a with-block."""

    def __init__(self, startup_timeout: float = 15.0, **options: Any) -> None:
        """Take Options fields as keywords: latency, fail_rate, seed, stream_interval, pieces, port."""
        flags = asdict(Options(**options))
        self.args = [a for k, v in flags.items() for a in ("--" + k.replace("_", "-"), str(v))]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.root = ""

    @property
    def url(self) -> str:
        """Return the OpenAI base URL, ending in /v1."""
        return self.root + "/v1"

    def start(self) -> FakeUpstream:
        """Start the subprocess and wait for its ready line."""
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.fake_upstream", *self.args],
                                     cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        # A thread, not select(): pipes cannot be polled on Windows, and it keeps stdout drained.
        threading.Thread(target=_pump, args=(self.proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.root:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
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
        with _OPENER.open(self.root + "/_stats", timeout=5) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        """Zero the server's counters."""
        _OPENER.open(urllib.request.Request(self.root + "/_reset", data=b"", method="POST"), timeout=5).close()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
