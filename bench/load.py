"""A closed-loop HTTP load generator: N clients, each sending its next request when the last ends.

Every scenario has three bounded phases: warm-up (not counted), a measured window, and a
drain in which no new request starts. Throughput and latency come from the requests that
finished inside the window; errors count over the whole scenario.
"""
from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

#: Builds the i-th request of a scenario: (method, path, JSON body or None).
RequestFactory = Callable[[int], tuple[str, str, Any]]


@dataclass
class Sample:
    """One finished request."""

    sent: float
    done: float
    status: int
    method: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.done - self.sent

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300


@dataclass
class Phases:
    """How long each phase may last, in seconds."""

    duration: float = 10.0
    warmup: float = 2.0
    max_warmup: float = 15.0
    drain: float = 20.0
    request_timeout: float = 60.0
    #: Spread the clients' first requests over this many seconds: clients that all start
    #: at once stay in lockstep, and a short window then counts whole waves or none.
    stagger: float = 0.0


@dataclass
class LoadResult:
    """What one closed-loop run measured."""

    concurrency: int
    window: tuple[float, float]
    samples: list[Sample] = field(default_factory=list)
    unfinished: int = 0

    def in_window(self) -> list[Sample]:
        start, end = self.window
        return [s for s in self.samples if start <= s.done <= end]

    def summary(self, upstream_latency: float = 0.0) -> dict[str, Any]:
        """Return throughput, latency percentiles, added latency, errors and methods."""
        start, end = self.window
        counted = self.in_window()
        ok = [s for s in counted if s.ok]
        latencies = sorted(s.latency for s in ok)
        errors = Counter(s.error or f"http_{s.status}" for s in self.samples if not s.ok)
        if self.unfinished:
            errors["unfinished"] += self.unfinished
        seconds = max(end - start, 1e-9)
        out: dict[str, Any] = {
            "concurrency": self.concurrency,
            "window_s": round(seconds, 2),
            "requests": len(self.samples) + self.unfinished,
            "completed_in_window": len(counted),
            "rps": round(len(ok) / seconds, 1),
            "errors": sum(errors.values()),
            "error_kinds": dict(errors),
            "methods": dict(Counter(s.method for s in self.samples if s.ok and s.method)),
        }
        for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
            value = percentile(latencies, q)
            out[f"{name}_ms"] = round(value * 1000, 1) if value is not None else None
            out[f"added_{name}_ms"] = (round((value - upstream_latency) * 1000, 1)
                                       if value is not None else None)
        out["max_ms"] = round(latencies[-1] * 1000, 1) if latencies else None
        return out


def _error_code(data: Any) -> str | None:
    """Return the error code of an API error body, if it has one."""
    error = data.get("error") if isinstance(data, dict) else None
    return str(error.get("code")) if isinstance(error, dict) and error.get("code") else None


def percentile(values: list[float], q: float) -> float | None:
    """Return the q-quantile of sorted values (nearest rank), or None when empty."""
    if not values:
        return None
    rank = min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))
    return values[rank]


async def closed_loop(base_url: str, make_request: RequestFactory, concurrency: int,
                      phases: Phases, *, on_window: Callable[[str], None] | None = None) -> LoadResult:
    """Run concurrency clients against base_url through the three phases."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=phases.request_timeout)
    counter = 0
    samples: list[Sample] = []
    began = time.monotonic()
    stop_at = float("inf")

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def client(number: int) -> None:
            nonlocal counter
            await asyncio.sleep(phases.stagger * number / concurrency)
            while time.monotonic() < stop_at:
                index, counter = counter, counter + 1
                method, path, body = make_request(index)
                sent = time.monotonic()
                try:
                    async with session.request(method, base_url + path, json=body) as response:
                        data = await response.json(content_type=None)
                        kind = data.get("processing_method") if isinstance(data, dict) else None
                        # An error keeps the API's code: http_503 alone cannot tell overload from storage.
                        error = _error_code(data) if response.status >= 400 else None
                        samples.append(Sample(sent, time.monotonic(), response.status, kind,
                                              f"http_{response.status}_{error}" if error else None))
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    samples.append(Sample(sent, time.monotonic(), 0, None, type(exc).__name__))

        tasks = [asyncio.create_task(client(number)) for number in range(concurrency)]
        # Warm-up lasts at least `warmup` (and the stagger) and until a first wave has
        # finished (at high concurrency one request can take several seconds), but never
        # past max_warmup.
        least = max(phases.warmup, phases.stagger)
        while True:
            await asyncio.sleep(0.05)
            elapsed = time.monotonic() - began
            if elapsed >= phases.max_warmup or (
                    elapsed >= least and len(samples) >= min(concurrency, 50)):
                break
        window_start = time.monotonic()
        if on_window:
            on_window("start")
        stop_at = window_start + phases.duration
        await asyncio.sleep(phases.duration)
        window_end = time.monotonic()
        if on_window:
            on_window("end")
        _, pending = await asyncio.wait(tasks, timeout=phases.drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return LoadResult(concurrency, (window_start, window_end), samples, len(pending))


class Prober:
    """Ask for some paths every interval on fresh connections, as an orchestrator's probes do."""

    def __init__(self, base_url: str, paths: tuple[str, ...], interval: float = 0.1) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.paths = paths
        self.interval = interval
        self.samples: dict[str, list[Sample]] = {path: [] for path in paths}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        # A thread of its own, so probe timings do not wait behind the load's callbacks.
        while not self._stop.is_set():
            for path in self.paths:
                sent = time.monotonic()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    response.read()
                    self.samples[path].append(Sample(sent, time.monotonic(), response.status))
                except (OSError, http.client.HTTPException) as exc:
                    self.samples[path].append(Sample(sent, time.monotonic(), 0, None, type(exc).__name__))
                finally:
                    conn.close()
            self._stop.wait(self.interval)

    def summary(self, path: str) -> dict[str, Any]:
        """Return the probes' latency percentiles and failures for one path."""
        samples = self.samples[path]
        latencies = sorted(s.latency for s in samples)
        out: dict[str, Any] = {"probes": len(samples),
                               "errors": sum(1 for s in samples if not s.ok),
                               "statuses": dict(Counter(s.status for s in samples))}
        for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
            value = percentile(latencies, q)
            out[f"{name}_ms"] = round(value * 1000, 1) if value is not None else None
        out["max_ms"] = round(latencies[-1] * 1000, 1) if latencies else None
        return out
