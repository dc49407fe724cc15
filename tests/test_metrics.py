"""/api/metrics (JSON for people) and /metrics (Prometheus text) count what happened.

Figures are process-global (prometheus_client), so every test reads them before and after
it acts and asserts on the difference."""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import FakeUpstream
from conftest import new_client


def figures(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/api/metrics")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def endpoint_status(body: dict[str, Any], endpoint: str, status: int) -> int:
    """Return the request count for one endpoint and status from /api/metrics."""
    total = 0
    for key, count in body["requests"]["by_endpoint_status"].items():
        parts = key.split("|")
        if parts[0] == endpoint and str(status) in parts[1:]:
            total += count
    return total


def prometheus(client: FlaskClient) -> dict[str, float]:
    """Return every sample of /metrics keyed by name and sorted labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def prom_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in samples.items():
        sample_name, _, rest = key.partition("{")
        if sample_name != name:
            continue
        present = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p)
        if all(present.get(k) == v for k, v in labels.items()):
            total += value
    return total


def chat(client: FlaskClient, **body: Any) -> Any:
    return client.post("/api/chat", json=body)


def test_api_metrics_counts_chats_cache_errors_and_latency(client: FlaskClient,
                                                           upstream: FakeUpstream) -> None:
    before = figures(client)
    tag = uuid.uuid4().hex[:8]

    first = chat(client, message=f"metrics async {tag}", provider="g4f", use_async=True)
    assert first.get_json()["processing_method"] == "async"
    second = chat(client, message=f"metrics thread {tag}", provider="openai", use_async=False)
    assert second.get_json()["processing_method"] == "thread"
    again = chat(client, message=f"metrics async {tag}", provider="g4f", use_async=True)
    assert again.get_json()["processing_method"] == "cache"
    streamed = chat(client, message=f"metrics stream {tag}", provider="g4f", stream=True)
    assert streamed.status_code == 200 and b'"done":true' in streamed.data
    failed = chat(client, message=f"metrics fail {tag} #fail=400", provider="openai")
    assert failed.status_code == 502

    after = figures(client)

    # Requests by endpoint and status.
    assert endpoint_status(after, "/api/chat", 200) - endpoint_status(before, "/api/chat", 200) == 4
    assert endpoint_status(after, "/api/chat", 502) - endpoint_status(before, "/api/chat", 502) == 1
    assert after["requests"]["total"] - before["requests"]["total"] >= 6  # 5 chats + 1 metrics read

    # Chats by processing method and provider.
    methods_before = before["chat"]["by_processing_method"]
    methods_after = after["chat"]["by_processing_method"]
    for method, grew in (("async", 2), ("thread", 1), ("cache", 1)):
        assert methods_after.get(method, 0) - methods_before.get(method, 0) == grew, method
    assert after["chat"]["total"] - before["chat"]["total"] == 4
    providers_before, providers_after = before["chat"]["by_provider"], after["chat"]["by_provider"]
    assert providers_after.get("g4f", 0) - providers_before.get("g4f", 0) == 3
    assert providers_after.get("openai", 0) - providers_before.get("openai", 0) == 1

    # Cache: one hit; the three fresh questions and the failing one missed.
    assert after["cache"]["hits"] - before["cache"]["hits"] == 1
    assert after["cache"]["misses"] - before["cache"]["misses"] == 4
    hits, misses = after["cache"]["hits"], after["cache"]["misses"]
    assert 0.0 < after["cache"]["hit_rate"] <= 1.0
    assert abs(after["cache"]["hit_rate"] - hits / (hits + misses)) < 1e-3

    # Upstream errors by kind: the 400 is counted, and was not retried.
    errors_before, errors_after = before["upstream"]["errors"], after["upstream"]["errors"]
    assert errors_after.get("http_400", 0) - errors_before.get("http_400", 0) == 1
    assert after["upstream"]["errors_total"] - before["upstream"]["errors_total"] == 1
    assert after["upstream"]["retries"] == before["upstream"]["retries"]

    # Latency percentiles in milliseconds, ordered.
    latency = after["chat"]["latency"]
    for name in ("p50_ms", "p95_ms", "p99_ms"):
        assert isinstance(latency[name], (int, float)) and latency[name] > 0, latency
    assert latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
    assert latency["count"] - before["chat"]["latency"]["count"] == 4

    # The rest of API.md's list, present and numeric.
    assert isinstance(after["uptime_seconds"], (int, float)) and after["uptime_seconds"] >= 0
    assert after["uptime_seconds"] >= before["uptime_seconds"]
    for key in ("rate_limited", "inflight", "load_shed"):
        assert isinstance(after[key], int), key
    assert after["inflight"] == 0
    assert isinstance(after["thread_pool"], dict) and isinstance(after["event_loop"], dict)


def test_latency_percentiles_reflect_slow_chats(client: FlaskClient, upstream: FakeUpstream) -> None:
    """Slow chats show in the latency figures: the new observations average at least their delay."""
    before = figures(client)["chat"]["latency"]
    for i in range(3):
        assert chat(client, message=f"slowish {i} {uuid.uuid4()} #delay=0.3").status_code == 200
    after = figures(client)["chat"]["latency"]
    assert after["count"] - before["count"] == 3
    added_ms = (after["mean_ms"] * after["count"]) - ((before["mean_ms"] or 0) * before["count"])
    assert added_ms / 3 >= 300
    assert after["p99_ms"] >= after["p50_ms"] > 0


def test_timeouts_and_rate_limits_are_counted(make_app: Callable[..., Flask],
                                              upstream: FakeUpstream) -> None:
    client = new_client(make_app(request_timeout=1, rate_limit_chat="2 per minute"))
    before = figures(client)
    timed_out = chat(client, message=f"late {uuid.uuid4()} #delay=3")
    assert timed_out.status_code == 504
    assert chat(client, message=f"ok {uuid.uuid4()}").status_code == 200
    limited = chat(client, message=f"too many {uuid.uuid4()}")
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Limit"] == "2"
    after = figures(client)
    errors_before, errors_after = before["upstream"]["errors"], after["upstream"]["errors"]
    assert errors_after.get("timeout", 0) - errors_before.get("timeout", 0) == 1
    assert after["rate_limited"] - before["rate_limited"] == 1
    assert endpoint_status(after, "/api/chat", 429) - endpoint_status(before, "/api/chat", 429) == 1
    assert endpoint_status(after, "/api/chat", 504) - endpoint_status(before, "/api/chat", 504) == 1


def test_prometheus_text_has_the_figures(client: FlaskClient, upstream: FakeUpstream) -> None:
    before = prometheus(client)
    text = f"prometheus {uuid.uuid4()}"
    assert chat(client, message=text).status_code == 200
    assert chat(client, message=text).get_json()["cached"] is True

    response = client.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    raw = response.get_data(as_text=True)
    for name in ("chat_requests_total", "chat_http_requests_total", "chat_cache_hits_total",
                 "chat_request_duration_seconds_bucket"):
        assert name in raw, name
    after = prometheus(client)

    def grew(name: str, **labels: str) -> float:
        return prom_sum(after, name, **labels) - prom_sum(before, name, **labels)

    assert grew("chat_requests_total") == 2
    assert grew("chat_requests_total", processing_method="cache") == 1
    assert grew("chat_cache_hits_total") == 1
    assert grew("chat_request_duration_seconds_count") == 2
    assert grew("chat_request_duration_seconds_bucket", le="+Inf") == 2
    assert grew("chat_http_requests_total", endpoint="/api/chat", status="200") == 2
    # Buckets are cumulative: never fewer observations under a larger bound.
    buckets = sorted((float(dict(p.split("=", 1) for p in key.partition("{")[2].rstrip("}").split(","))["le"]), v)
                     for key, v in after.items()
                     if key.startswith("chat_request_duration_seconds_bucket{") and "provider=g4f" in key)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts

    # /api/metrics and /metrics tell the same story.
    summary = figures(client)
    assert summary["cache"]["hits"] == int(prom_sum(prometheus(client), "chat_cache_hits_total"))
    assert summary["chat"]["total"] == int(prom_sum(prometheus(client), "chat_requests_total"))
    assert json.dumps(summary)  # JSON-ready
