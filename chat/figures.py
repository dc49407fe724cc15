"""Read the Prometheus figures of every worker and summarise them for people."""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector


def registry() -> CollectorRegistry:
    """Return a registry that sums every worker's figures when running multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return merged
    return REGISTRY


def prometheus_text() -> bytes:
    """Render all figures in the Prometheus text format."""
    return generate_latest(registry())


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Estimate a quantile from cumulative histogram buckets by linear interpolation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            span = count - lower_count
            fraction = (rank - lower_count) / span if span else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


def summary() -> dict[str, Any]:
    """Return the figures as JSON-ready dicts: counts, hit rate, latency percentiles."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in registry().collect():
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))

    def total(name: str) -> float:
        return sum(v for _, v in samples.get(name, []))

    def by(name: str, *labels: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for lab, value in samples.get(name, []):
            out["|".join(lab.get(k, "") for k in labels)] += value
        return {k: int(v) for k, v in sorted(out.items())}

    def percentiles(name: str) -> dict[str, float | None]:
        merged: dict[float, float] = defaultdict(float)
        for lab, value in samples.get(f"{name}_bucket", []):
            merged[float(lab["le"])] += value
        buckets = sorted(merged.items())
        result = {}
        for label, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            value = _quantile(buckets, q)
            result[label] = round(value * 1000, 2) if value is not None else None
        count = total(f"{name}_count")
        result["count"] = int(count)
        result["mean_ms"] = round(total(f"{name}_sum") / count * 1000, 2) if count else None
        return result

    hits, misses = total("chat_cache_hits_total"), total("chat_cache_misses_total")
    started = [v for _, v in samples.get("chat_start_time_seconds", []) if v > 0]
    local_tokens = int(total("chat_local_tokens_total"))
    local_rates = [v for _, v in samples.get("chat_local_tokens_per_second", []) if v > 0]
    return {
        "started_at": min(started) if started else None,
        "requests": {"total": int(total("chat_http_requests_total")),
                     "by_endpoint_status": by("chat_http_requests_total", "endpoint", "status")},
        "chat": {"total": int(total("chat_requests_total")),
                 "by_processing_method": by("chat_requests_total", "processing_method"),
                 "by_provider": by("chat_requests_total", "provider"),
                 "latency": percentiles("chat_request_duration_seconds"),
                 "upstream_latency": percentiles("chat_upstream_duration_seconds")},
        "cache": {"hits": int(hits), "misses": int(misses),
                  "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
                  "entries": int(total("chat_cache_entries"))},
        "rate_limited": int(total("chat_rate_limited_total")),
        "load_shed": int(total("chat_load_shed_total")),
        "inflight": int(total("chat_inflight")),
        "upstream": {"errors": by("chat_upstream_errors_total", "kind"),
                     "errors_total": int(total("chat_upstream_errors_total")),
                     "retries": int(total("chat_upstream_retries_total"))},
        "thread_pool": {"busy": int(total("chat_threadpool_busy")),
                        "queued": int(total("chat_threadpool_queued"))},
        "event_loop": {"pending_tasks": int(total("chat_eventloop_pending"))},
        "database": {"pool_size": int(total("chat_db_pool_size")),
                     "waiting": int(total("chat_db_pool_waiting"))},
        "local": {"tokens": local_tokens,
                  "tokens_per_second": round(max(local_rates), 2) if local_rates else None},
    }
