"""/api/metrics and /metrics sum over every gunicorn worker, and survive a worker's death.

Two gevent workers share one PROMETHEUS_MULTIPROC_DIR. Whichever worker answers, the
totals are the same; after one worker is SIGKILLed and replaced, the counters it wrote
stay counted while its live gauges (chats in flight) drop out of the sums.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow  # real gunicorn
N = 12

# Every figure the issue lists, as /metrics names it.
FIGURES = (
    "chat_http_requests_total",            # requests by endpoint, method, status
    "chat_requests_total",                 # chats by processing_method and provider
    "chat_request_duration_seconds_bucket",
    "chat_upstream_duration_seconds_bucket",
    "chat_cache_hits_total", "chat_cache_misses_total", "chat_cache_entries",
    "chat_rate_limited_total",
    "chat_inflight",
    "chat_upstream_errors_total", "chat_upstream_retries_total",
    "chat_load_shed_total",
    "chat_threadpool_busy", "chat_threadpool_queued",
    "chat_eventloop_pending",
    "chat_db_pool_size", "chat_db_pool_waiting",
)


@pytest.fixture(scope="module")
def server(database_url: str, upstream: Any) -> Iterator[Any]:
    from servers import Gunicorn

    with Gunicorn(database_url=database_url, upstream_url=upstream.url, workers=2,
                  retry_attempts=2, request_timeout=30) as live:
        live.started = time.time()
        yield live


def fresh_get(url: str) -> requests.Response:
    """GET on a new connection, so either worker may accept it."""
    with requests.Session() as s:
        s.trust_env = False
        return s.get(url, timeout=10, headers={"Connection": "close"})


def chat(server: Any, message: str) -> requests.Response:
    with requests.Session() as s:
        s.trust_env = False
        return s.post(server.url + "/api/chat", json={"message": message}, timeout=30,
                      headers={"Connection": "close", "X-Client-Id": "metrics-workers-test"})


def prometheus(server: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = fresh_get(server.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def prom(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def readings(server: Any, want_pids: set[int], timeout: float = 40) -> list[dict[str, Any]]:
    """Read /api/metrics until every wanted worker has answered at least once.

    A worker that was just forked answers only once it has imported the app.
    """
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = fresh_get(server.url + "/api/metrics")
        assert response.status_code == 200
        bodies.append(response.json())
        if want_pids <= {b["worker"]["pid"] for b in bodies} and len(bodies) >= 4:
            break
        time.sleep(0.05)
    seen = {b["worker"]["pid"] for b in bodies}
    assert want_pids <= seen, f"workers {want_pids - seen} never answered within {timeout:.0f} s"
    return bodies


def assert_totals(server: Any, bodies: list[dict[str, Any]], n: int, misses: int) -> None:
    for body in bodies:
        who = f"worker {body['worker']['pid']}"
        assert body["chat"]["total"] == n, who
        assert sum(body["chat"]["by_processing_method"].values()) == n, who
        assert body["chat"]["by_provider"].get("g4f") == n, who
        assert body["requests"]["by_endpoint_status"].get("/api/chat|200") == n, who
        assert body["chat"]["latency"]["count"] == n, who
        assert body["chat"]["upstream_latency"]["count"] == n, who
        assert body["cache"]["misses"] == misses and body["cache"]["hits"] == 0, who
        assert body["upstream"]["errors"].get("http_500") == 1, who
        assert body["upstream"]["retries"] == 1, who
        latency = body["chat"]["latency"]
        assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"], who
        assert body["uptime_seconds"] >= time.time() - server.started - 1, "uptime is the server's"
    for _ in range(4):  # /metrics from whichever worker answers
        samples = prometheus(server)
        assert prom(samples, "chat_requests_total") == n
        assert prom(samples, "chat_http_requests_total", endpoint="/api/chat", method="POST",
                    status="200") == n
        assert prom(samples, "chat_request_duration_seconds_count") == n
        assert prom(samples, "chat_request_duration_seconds_bucket", le="+Inf") == n
        assert prom(samples, "chat_upstream_duration_seconds_count") == n
        assert prom(samples, "chat_cache_misses_total") == misses


def test_figures_sum_over_workers_and_survive_a_killed_worker(server: Any) -> None:
    pids = set(server.worker_pids())
    assert len(pids) == 2

    tag = uuid.uuid4().hex[:8]
    for i in range(N):
        response = chat(server, f"workers {tag} {i}")
        assert response.status_code == 200, response.text
    failed = chat(server, f"workers {tag} #fail=500")  # retried once, then 502
    assert failed.status_code == 502

    samples = prometheus(server)
    missing = [name for name in FIGURES if name not in samples]
    assert not missing, f"/metrics lacks {missing}"
    methods = {lab["processing_method"] for lab, _ in samples["chat_requests_total"]}
    assert methods <= {"async", "thread", "cache"} and methods
    assert {lab["provider"] for lab, _ in samples["chat_requests_total"]} == {"g4f"}

    bodies = readings(server, pids)
    assert_totals(server, bodies, N, misses=N + 1)  # +1: the failed chat
    for body in bodies:
        assert body["inflight"] == 0
        for key in ("busy", "queued"):
            assert body["thread_pool"][key] == 0
        assert body["database"]["pool_size"] >= 1

    # A slow chat holds one worker; find which from the workers' own state.
    slow = threading.Thread(target=lambda: _swallow(chat, server, f"slow {tag} #delay=20"), daemon=True)
    slow.start()
    holder = None
    deadline = time.monotonic() + 15
    while holder is None and time.monotonic() < deadline:
        body = fresh_get(server.url + "/api/metrics").json()
        if body["inflight"] == 1 and body["worker"]["inflight"] == 1:
            holder = body["worker"]["pid"]
        elif body["inflight"] == 1:
            holder_candidates = pids - {body["worker"]["pid"]}
            holder = holder_candidates.pop() if len(holder_candidates) == 1 else None
        time.sleep(0.05)
    assert holder is not None, "the slow chat never showed as in flight"

    os.kill(holder, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = set(server.worker_pids())
        if len(now) == 2 and holder not in now:
            break
        time.sleep(0.2)
    new_pids = set(server.worker_pids())
    assert holder not in new_pids and len(new_pids) == 2, f"worker not replaced: {new_pids}"
    _wait_ready(server, new_pids)
    slow.join(5)

    # Counters of the dead worker stay counted; its in-flight chat is no longer in flight.
    bodies = readings(server, new_pids)
    assert_totals(server, bodies, N, misses=N + 2)  # +1: the slow chat looked up the cache
    for body in bodies:
        assert body["inflight"] == 0, "a dead worker's live gauges must drop out of the sums"
    assert prom(prometheus(server), "chat_inflight") == 0

    # And the server keeps counting across old and new workers.
    for i in range(3):
        assert chat(server, f"after kill {tag} {i}").status_code == 200
    bodies = readings(server, new_pids)
    for body in bodies:
        assert body["chat"]["total"] == N + 3
        assert body["requests"]["by_endpoint_status"].get("/api/chat|200") == N + 3


def _swallow(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except requests.RequestException:
        pass  # the worker holding it is killed


def _wait_ready(server: Any, pids: set[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fresh_get(server.url + "/api/health/ready").status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready after the worker was replaced")
