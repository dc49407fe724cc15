"""Health for people and orchestrators: /api/health, /api/health/live, /api/health/ready."""
from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify

from .. import __version__
from ..errors import ChatError
from .common import services

bp = Blueprint("health", __name__, url_prefix="/api/health")


def _database() -> dict[str, Any]:
    try:
        return {"status": "up", **services().store.ping()}
    except ChatError as exc:
        return {"status": "down", "error": exc.message}


def _shared_state_note() -> dict[str, Any]:
    settings = services().settings
    workers = settings.web_concurrency
    if settings.redis_url:
        return {"storage": "redis", "shared": True}
    shared = workers <= 1
    note = {"storage": "memory", "shared": shared, "workers": workers}
    if not shared:
        note["warning"] = (f"limits are per worker ({workers} workers, no REDIS_URL): "
                           f"a client may get up to {workers} times the limit")
    return note


@bp.get("")
def health() -> tuple[Response, int]:
    """Report every component; 503 when the database is down."""
    svc = services()
    state = svc.dispatcher.status()
    database = _database()
    loop = {**state["async_loop"], "status": "up" if state["async_loop"]["alive"] else "down"}
    components = {
        "async_loop": loop,
        "thread_pool": {**state["thread_pool"], "status": "up"},
        "database": database,
        "cache": svc.cache.status(),
        "rate_limit": {"limit": svc.settings.rate_limit_chat, **_shared_state_note()},
        "provider": {"default": svc.settings.llm_provider, **svc.providers.status()},
        "inflight": {"current": state["inflight"], "max": state["max_inflight"]},
    }
    if database["status"] != "up":
        status, code = "unhealthy", 503
    elif not loop["alive"]:
        status, code = "degraded", 200
    else:
        status, code = "healthy", 200
    return jsonify({"status": status, "version": __version__,
                    "uptime_seconds": round(time.time() - svc.started_at, 3),
                    "components": components}), code


@bp.get("/live")
def live() -> Response:
    """Say the process is up."""
    return jsonify({"status": "alive"})


@bp.get("/ready")
def ready() -> tuple[Response, int]:
    """Say whether this worker can serve chats: database reachable, loop or pool serving."""
    database = _database()
    state = services().dispatcher.status()
    serving = state["async_loop"]["alive"] or state["thread_pool"]["size"] > 0
    ok = database["status"] == "up" and serving and not state["closed"]
    return jsonify({"status": "ready" if ok else "not_ready", "database": database["status"]}), \
        (200 if ok else 503)
