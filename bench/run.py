"""Load benchmark: the real server in its production configuration against the fake upstream.

    python -m bench.run [--quick] [--workers N] [--latency S] [--fail-rate P]
    ./start.sh perf [--quick] ...

Starts the fake OpenAI-compatible upstream and gunicorn (gunicorn.conf.py, gevent workers,
the embedded PostgreSQL unless --database-url), then runs bounded closed-loop scenarios on
loopback: uncached chats on the g4f and openai paths at rising concurrency, cached chats,
health probes under chat load, and a bare Flask JSON endpoint (bench/bare_app.py, same
gunicorn settings) as the ceiling. Prints one table and the targets, writes
bench/results/<timestamp>.json, bench/results/latest.json and bench/results/latest.png.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from . import report
from .fake_upstream import FakeUpstream
from .load import Phases, Prober, RequestFactory, closed_loop
from .server import Server, Usage, raise_fd_limit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass
class Scenario:
    """One measured run: a kind of request at one concurrency."""

    kind: str  # uncached-g4f, uncached-openai, cached, health, bare
    concurrency: int

    @property
    def name(self) -> str:
        if self.kind == "health":
            return f"health under {self.concurrency} chats"
        return f"{self.kind} c={self.concurrency}"


def plan(quick: bool, levels: list[int] | None) -> list[Scenario]:
    """Return the scenarios of a full or a quick run, in the order they run."""
    chat_levels = levels or ([10, 100, 500] if quick else [10, 100, 500, 1000])
    light_levels = [100] if quick else [10, 100]
    scenarios = [Scenario("uncached-g4f", c) for c in chat_levels]
    scenarios += [Scenario("uncached-openai", c) for c in chat_levels]
    scenarios += [Scenario("cached", c) for c in light_levels]
    scenarios.append(Scenario("health", 100 if quick else 500))
    scenarios += [Scenario("bare", c) for c in light_levels]
    return scenarios


def requests_for(scenario: Scenario, tag: str) -> RequestFactory:
    """Return the request factory of a scenario; uncached chats never repeat a message."""
    if scenario.kind == "bare":
        return lambda i: ("POST", "/echo", {"message": f"bench {tag} bare"})
    if scenario.kind == "cached":
        message = f"bench {tag} cached c{scenario.concurrency}"
        return lambda i: ("POST", "/api/chat", {"message": message, "provider": "g4f"})
    # The health scenario's chat load is uncached g4f.
    provider = "openai" if scenario.kind == "uncached-openai" else "g4f"
    prefix = f"bench {tag} {scenario.name}"
    return lambda i: ("POST", "/api/chat", {"message": f"{prefix} n{i}", "provider": provider})


def product_env(args: argparse.Namespace, upstream_url: str, data_dir: str) -> dict[str, str]:
    """Return the settings of the production server under test (loopback upstream, no limit)."""
    return {
        "LLM_PROVIDER": "g4f", "G4F_BASE_URL": upstream_url, "LLM_BASE_URL": upstream_url,
        "LLM_API_KEY": "bench-key", "DATABASE_URL": args.database_url or "", "DATA_DIR": data_dir,
        # Every request comes from 127.0.0.1: the per-client limit would stop the load at 20.
        "RATE_LIMIT_CHAT": "100000000 per minute",
        "REDIS_URL": "", "API_KEYS": "", "ADMIN_KEY": "", "LOG_LEVEL": args.log_level,
    }


def run_scenario(scenario: Scenario, server: Server, upstream: FakeUpstream | None,
                 phases: Phases, latency: float, tag: str) -> list[dict[str, Any]]:
    """Run one scenario and return its table rows."""
    prober: Prober | None = None
    if scenario.kind == "health":
        prober = Prober(server.url, ("/api/health/live", "/api/health"), interval=0.1)

    def on_window(edge: str) -> None:
        if prober is not None:
            prober.start() if edge == "start" else prober.stop()

    if upstream is not None:
        upstream.reset()
    load_avg = os.getloadavg()[0]
    kind = "uncached-g4f" if scenario.kind == "health" else scenario.kind
    # Uncached clients are spread over one upstream latency, the others over 0.2 s.
    phases = replace(phases, stagger=latency if kind.startswith("uncached") else 0.2)
    with Usage(server) as usage:
        result = asyncio.run(closed_loop(server.url, requests_for(scenario, tag),
                                         scenario.concurrency, phases, on_window=on_window))
    upstream_latency = latency if kind.startswith("uncached") else 0.0
    row: dict[str, Any] = {"scenario": scenario.name, "kind": scenario.kind,
                           **result.summary(upstream_latency), **usage.figures(),
                           "loadavg_1m_before": round(load_avg, 2)}
    row["cpu_ms_per_request"] = (round(usage.cpu_seconds() * 1000 / len(result.samples), 2)
                                 if result.samples else None)
    if kind.startswith("uncached") and latency > 0:
        ideal = scenario.concurrency / latency
        row["ideal_rps"] = round(ideal, 1)
        row["ideal_pct"] = round(100 * row["rps"] / ideal, 1)
    if upstream is not None and kind.startswith("uncached"):
        stats = upstream.stats()
        row["upstream_max_in_flight"] = stats["max_in_flight"]
        row["upstream_statuses"] = stats["by_status"]
    if prober is None:
        return [row]
    rows = []
    for path in prober.paths:
        probe = prober.summary(path)
        rows.append({"scenario": f"{path} under {scenario.concurrency} chats", "kind": "health",
                     "concurrency": scenario.concurrency, "rps": None, **probe,
                     "rss_mb": row["rss_mb"], "methods": {}, "load": row})
    return rows


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("gunicorn", "gevent", "Flask", "g4f", "openai", "aiohttp", "psycopg"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and the targets; write JSON and PNG."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: fewer levels, 3 s windows")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers (default 1)")
    parser.add_argument("--latency", type=float, default=1.0, help="fake upstream latency, seconds")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="fake upstream random 500 rate, 0..1")
    parser.add_argument("--duration", type=float, help="measured window per scenario, seconds")
    parser.add_argument("--levels", help="chat concurrency levels, comma-separated (default 10,100,500,1000)")
    parser.add_argument("--only", help="run only scenarios whose name contains this text")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", ""),
                        help="PostgreSQL URL (default: the embedded server in a temporary folder)")
    parser.add_argument("--log-level", default="INFO", help="server LOG_LEVEL (production default INFO)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)

    duration = args.duration or (3.0 if args.quick else 10.0)
    phases = Phases(duration=duration, warmup=1.0 if args.quick else 2.0,
                    max_warmup=8.0 if args.quick else 15.0, drain=15.0 if args.quick else 20.0)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else None
    scenarios = [s for s in plan(args.quick, levels) if not args.only or args.only in s.name]
    fd_limit = raise_fd_limit()
    tag = uuid.uuid4().hex[:8]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    work = tempfile.mkdtemp(prefix="chat-bench-")
    started = time.monotonic()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        product = [s for s in scenarios if s.kind != "bare"]
        if product:
            with FakeUpstream(latency=args.latency, fail_rate=args.fail_rate) as upstream:
                env = product_env(args, upstream.url, os.path.join(work, "data"))
                say(f"starting gunicorn (app:app, {args.workers} worker(s)), upstream {upstream.url} "
                    f"latency {args.latency:g} s fail rate {args.fail_rate:g}")
                with Server("app:app", env, workers=args.workers, log_dir=work) as server:
                    for scenario in product:
                        say(f"  {scenario.name} ...")
                        rows += run_scenario(scenario, server, upstream, phases, args.latency, tag)
                        time.sleep(1.0)  # let the last drained requests settle
        bare = [s for s in scenarios if s.kind == "bare"]
        if bare:
            # DATABASE_URL only keeps gunicorn.conf.py from starting a database bare_app never uses.
            env = {"DATABASE_URL": "postgresql://unused", "LOG_LEVEL": args.log_level}
            say(f"starting gunicorn (bench.bare_app:app, {args.workers} worker(s))")
            with Server("bench.bare_app:app", env, workers=args.workers, ready_path="/ping",
                        log_dir=work) as server:
                for scenario in bare:
                    say(f"  {scenario.name} ...")
                    rows += run_scenario(scenario, server, None, phases, args.latency, tag)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    checks = report.targets(rows)
    result: dict[str, Any] = {
        "meta": {"timestamp": stamp, "quick": args.quick, "workers": args.workers,
                 "upstream_latency_s": args.latency, "upstream_fail_rate": args.fail_rate,
                 "window_s": duration, "database": "external" if args.database_url else "embedded",
                 "server_log_level": args.log_level, "cpus": os.cpu_count(), "fd_limit": fd_limit,
                 "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                 "total_seconds": round(time.monotonic() - started, 1),
                 "platform": platform.platform(), "versions": versions()},
        "scenarios": rows,
        "targets": checks,
    }
    print(report.table(rows))
    print("\ntargets:")
    print(report.targets_text(checks) or "  (none measurable in this run)")
    out = Path(args.out)
    written = report.write_json(result, out, stamp)
    if not args.no_chart:
        written.append(report.chart(rows, out / "latest.png", upstream_latency=args.latency,
                                    workers=args.workers))
    print(f"\n{len(rows)} rows in {result['meta']['total_seconds']} s, load average "
          f"{result['meta']['loadavg_before']} -> {result['meta']['loadavg_after']}; wrote "
          + ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
