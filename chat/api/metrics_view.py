"""Figures: /api/metrics (JSON for people) and /metrics (Prometheus)."""
from __future__ import annotations

import logging
import os
import time

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from .. import figures, metrics
from .common import services

bp = Blueprint("metrics", __name__)
logger = logging.getLogger(__name__)


def _refresh_gauges() -> None:
    """Write this worker's current state into its gauges before reading them."""
    svc = services()
    state = svc.dispatcher.status()
    metrics.POOL_BUSY.set(state["thread_pool"]["busy"])
    metrics.POOL_QUEUED.set(state["thread_pool"].get("queued", 0))
    metrics.LOOP_PENDING.set(state["async_loop"]["pending_tasks"])
    metrics.CACHE_ENTRIES.set(svc.cache.size())
    stats = svc.store.pool.get_stats()
    metrics.DB_POOL_SIZE.set(stats.get("pool_size", 0))
    metrics.DB_POOL_WAITING.set(stats.get("requests_waiting", 0))
    svc.chat.record_figures()


@bp.after_app_request
def _refresh_after(response: Response) -> Response:
    # Every worker keeps its gauges current as it serves, so the sums another worker
    # reads are never older than this worker's last request.
    try:
        _refresh_gauges()
    except Exception:  # figures must never fail a request
        logger.debug("could not refresh the gauges", exc_info=True)
    return response


@bp.get("/api/metrics")
def metrics_json() -> Response:
    """Return the figures summed over all workers, as JSON."""
    _refresh_gauges()
    svc = services()
    body = figures.summary()
    started = body.pop("started_at") or svc.started_at  # the server's first worker
    body["uptime_seconds"] = round(max(0.0, time.time() - started), 3)
    body["worker"] = {"pid": os.getpid(), "uptime_seconds": round(time.time() - svc.started_at, 3),
                      **svc.dispatcher.status()}
    return jsonify(body)


@bp.get("/metrics")
def metrics_text() -> Response:
    """Return the figures in the Prometheus text format."""
    _refresh_gauges()
    return Response(figures.prometheus_text(), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})
