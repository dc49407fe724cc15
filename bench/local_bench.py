"""Measure the local provider: tokens/s and time to first token at 1, 2 and 4 concurrent generations.

    python -m bench.local_bench [--configs 2x2,2x1,4x2] [--max-tokens 128] [--rounds 2]
                                [--url http://127.0.0.1:4343 | --serve] [--quick]

Direct: the provider in this process, no HTTP. A config is N_THREADSxMAX_CONCURRENT: the
provider's thread budget and its slots (one model each, n_threads // max_concurrent threads
per model). 2x2 is the default provider, 2x1 one shared model whose generations queue, 4x2
two models with two threads each (oversubscribed on two cores).

Through HTTP (--url of a running server, or --serve to start gunicorn with LLM_PROVIDER=local
and an embedded database): streamed POST /api/chat with provider "local"; time to first token
is the first delta as the client sees it, tokens come from the server's /api/metrics.

--quick (what `./start.sh perf` runs): config 2x2, one round, 64 tokens. Run from the
repository root. Writes bench/results/local.json. Needs requirements-local.txt; exits 2 and
writes nothing when the local provider is unavailable.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chat.providers.base import ChatRequest
from chat.providers.local import LocalProvider, available

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "local.json"
LEVELS = (1, 2, 4)

TOPICS = ["the history of the sea", "how bridges are built", "the life of bees", "winter in the mountains",
          "the first computers", "a journey by train", "growing tomatoes", "the moon landing"]


def prompt(topic: str) -> str:
    return f"Write a long essay about {topic}."


# -- one generation, direct or over HTTP ---------------------------------------------------


def one_generation(provider: LocalProvider, topic: str, max_tokens: int, out: list[dict[str, float]]) -> None:
    """Stream one long answer from the provider and note its timings."""
    request = ChatRequest(messages=({"role": "user", "content": prompt(topic)},),
                          model=provider.model_name, temperature=0.0, max_tokens=max_tokens)
    began = time.monotonic()
    first = last = None
    for piece in provider.stream(request):
        if piece.text:
            first = first or time.monotonic()
            last = time.monotonic()
    tokens = piece.extra["completion_tokens"]
    out.append(_sample(began, first, last, tokens))


def one_http_generation(url: str, topic: str, max_tokens: int, out: list[dict[str, float]],
                        headers: dict[str, str] | None = None) -> None:
    """Stream one long answer through POST /api/chat and note its timings."""
    parts = urlsplit(url)
    body = json.dumps({"message": f"{prompt(topic)} ({uuid.uuid4().hex[:6]})", "provider": "local",
                       "stream": True, "max_tokens": max_tokens, "temperature": 0, "cache": False})
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    began = time.monotonic()
    first = last = None
    deltas = 0
    try:
        conn.request("POST", "/api/chat", body, {"Content-Type": "application/json",
                                                 "X-Client-Id": f"local-bench-{uuid.uuid4().hex}",
                                                 **(headers or {})})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"POST /api/chat answered {response.status}: {response.read()[:300]!r}")
        for raw in response:  # one SSE line at a time, as it arrives
            if raw.startswith(b"event: error"):
                raise RuntimeError(f"the stream failed: {response.read()[:300]!r}")
            if raw.startswith(b"data: ") and b'"delta"' in raw:
                deltas += 1
                first = first or time.monotonic()
                last = time.monotonic()
    finally:
        conn.close()
    # One delta per token (a multi-byte character split over two tokens arrives as one).
    out.append(_sample(began, first, last, deltas))


def _sample(began: float, first: float | None, last: float | None, tokens: int) -> dict[str, float]:
    end = time.monotonic()
    decode = (last - first) if first and last and last > first else 0.0
    return {"tokens": tokens, "ttft": (first or end) - began, "seconds": end - began,
            "decode_tps": (tokens - 1) / decode if decode else 0.0}


# -- levels of concurrency ---------------------------------------------------------------


def run_level(generate: Callable[[str, list[dict[str, float]]], None], concurrency: int,
              rounds: int, count_tokens: Callable[[], int] | None = None) -> dict[str, Any]:
    """Run `rounds` rounds of `concurrency` simultaneous generations and summarise them.

    count_tokens, when given, reads the exact number of tokens generated so far (the server's
    metrics); otherwise each generation's own count is summed.
    """
    samples: list[dict[str, float]] = []
    walls: list[float] = []
    errors: list[BaseException] = []
    before = count_tokens() if count_tokens else 0

    def guarded(topic: str) -> None:
        try:
            generate(topic, samples)
        except BaseException as exc:  # noqa: BLE001 - reported after the round
            errors.append(exc)

    for round_no in range(rounds):
        topics = [TOPICS[(round_no * concurrency + i) % len(TOPICS)] for i in range(concurrency)]
        threads = [threading.Thread(target=guarded, args=(topic,)) for topic in topics]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        walls.append(time.monotonic() - began)
        if errors:
            raise RuntimeError(f"{len(errors)} generation(s) failed: {errors[0]}") from errors[0]
    tokens = count_tokens() - before if count_tokens else sum(int(s["tokens"]) for s in samples)
    ttfts = [s["ttft"] for s in samples]
    return {
        "concurrency": concurrency,
        "generations": len(samples),
        "tokens": tokens,
        "aggregate_tokens_per_second": round(tokens / sum(walls), 1),
        "per_generation_tokens_per_second": round(statistics.median(s["tokens"] / s["seconds"]
                                                                   for s in samples), 1),
        "per_generation_decode_tokens_per_second": round(statistics.median(s["decode_tps"]
                                                                          for s in samples), 1),
        "ttft_median_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def bench_config(threads: int, max_concurrent: int, max_tokens: int, rounds: int,
                 levels: tuple[int, ...] = LEVELS) -> dict[str, Any]:
    """Measure one provider configuration in this process at each level of concurrency."""
    provider = LocalProvider(n_threads=threads, max_concurrent=max_concurrent)
    per_model = provider.threads_per_model

    def generate(topic: str, out: list[dict[str, float]], tokens: int = max_tokens) -> None:
        one_generation(provider, topic, tokens, out)

    try:
        began = time.monotonic()
        # Load every slot's model first so loading is not counted as generation time.
        run_level(lambda topic, out: generate(topic, out, 4), max_concurrent, 1)
        warmup = time.monotonic() - began
        results = [run_level(generate, c, rounds) for c in levels]
    finally:
        provider.close()
    return {"n_threads": threads, "max_concurrent": max_concurrent, "threads_per_model": per_model,
            "warmup_s": round(warmup, 2), "levels": results}


def bench_http(url: str, max_tokens: int, rounds: int, levels: tuple[int, ...] = LEVELS,
               api_key: str = "") -> dict[str, Any]:
    """Measure streamed chats with provider "local" through a running server's HTTP API."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def get(path: str) -> Any:
        request = urllib.request.Request(url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    health = get("/api/health")
    provider = health["components"]["provider"]
    if "local" not in provider["configured"]:
        reason = provider.get("unavailable", {}).get("local", "not configured")
        raise RuntimeError(f"local provider unavailable on the server at {url}: {reason}")
    local = provider["configured"]["local"]

    def server_tokens() -> int:
        # The local tokens counter, summed over the server's workers. A stream's tokens are
        # counted before its done event is sent, so a finished round is fully counted.
        return int(get("/api/metrics")["local"]["tokens"])

    exact = "local" in get("/api/metrics")  # an older server: count deltas instead

    def generate(topic: str, out: list[dict[str, float]], tokens: int = max_tokens) -> None:
        one_http_generation(url, topic, tokens, out, headers)

    began = time.monotonic()
    run_level(lambda topic, out: generate(topic, out, 4), 2, 1)  # load both slots' models
    warmup = time.monotonic() - began
    results = []
    for level in levels:
        result = run_level(generate, level, rounds, server_tokens if exact else None)
        results.append(result)
    return {"url": url, "workers": health["components"]["rate_limit"].get("workers", 1),
            "model_path": local.get("model_path"), "warmup_s": round(warmup, 2),
            "tokens_from": "server metrics" if exact else "streamed deltas", "levels": results}


# -- a server of our own -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(workers: int = 1, **settings: Any) -> Iterator[str]:
    """Run gunicorn (LLM_PROVIDER=local, embedded PostgreSQL in a temporary folder); yield its URL."""
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="local-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "CHAT_"))}
    env.pop("DATABASE_URL", None)
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "WEB_CONCURRENCY": str(workers),
                "LLM_PROVIDER": "local", "DATA_DIR": os.path.join(folder, "data"),
                "RATE_LIMIT_CHAT": "100000 per minute", "LOG_LEVEL": "WARNING", "API_KEYS": "",
                "REQUEST_TIMEOUT": "300", "PYTHONUNBUFFERED": "1"})
    env.update({k.upper(): str(v) for k, v in settings.items()})
    log_path = os.path.join(folder, "gunicorn.log")
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([gunicorn, "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/api/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start:\n{Path(log_path).read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


# -- report ------------------------------------------------------------------------------


def run(*, configs: str = "2x2,2x1,4x2", max_tokens: int = 128, rounds: int = 2, url: str = "",
        start_server: bool = False, api_key: str = "", out: str | Path | None = DEFAULT_OUT,
        levels: tuple[int, ...] = LEVELS) -> dict[str, Any]:
    """Run the benchmark and return the report (written to `out` unless None).

    Raises RuntimeError when the local provider is unavailable here.
    """
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"local provider unavailable: {reason}")
    import llama_cpp

    load_before = os.getloadavg()
    measured = []
    for config in filter(None, configs.split(",")):
        threads, slots = (int(part) for part in config.lower().split("x"))
        measured.append(bench_config(threads, slots, max_tokens, rounds, levels))
    http_report = None
    if url:
        http_report = bench_http(url, max_tokens, rounds, levels, api_key)
    elif start_server:
        with serve() as own:
            http_report = bench_http(own, max_tokens, rounds, levels)
            http_report["url"] = "gunicorn started by the benchmark (1 gevent worker, default local settings)"
    report = {
        "model": LocalProvider().check()["model_path"],
        "llama_cpp_python": llama_cpp.__version__,
        "cpus": os.cpu_count(),
        "max_tokens": max_tokens,
        "rounds": rounds,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "configs": measured,
        "http": http_report,
    }
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict[str, Any]) -> str:
    """Render the report as a text table."""
    lines = [f"{'path':>10} {'thr/model':>9} {'conc':>4} {'agg tok/s':>9} {'gen tok/s':>9} "
             f"{'decode':>7} {'ttft med':>8} {'ttft max':>8}"]
    rows = [(f"direct {c['n_threads']}x{c['max_concurrent']}", c["threads_per_model"], c["levels"])
            for c in report["configs"]]
    if report.get("http"):
        rows.append(("http", "-", report["http"]["levels"]))
    for name, per_model, levels in rows:
        for level in levels:
            lines.append(f"{name:>10} {per_model:>9} {level['concurrency']:>4} "
                         f"{level['aggregate_tokens_per_second']:>9} "
                         f"{level['per_generation_tokens_per_second']:>9} "
                         f"{level['per_generation_decode_tokens_per_second']:>7} "
                         f"{level['ttft_median_s']:>8} {level['ttft_max_s']:>8}")
    lines.append(f"load average {report['loadavg_before']} -> {report['loadavg_after']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table and write the JSON report; 2 when local is unavailable."""
    parser = argparse.ArgumentParser(prog="python -m bench.local_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None, help="N_THREADSxMAX_CONCURRENT, comma-separated "
                        "(default 2x2,2x1,4x2; --quick: 2x2; empty: skip the direct runs)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 128 (--quick: 64)")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (--quick: 1)")
    parser.add_argument("--url", default="", help="also measure through this running server's HTTP API")
    parser.add_argument("--serve", action="store_true", help="start gunicorn with LLM_PROVIDER=local "
                        "and measure through it (ignored with --url)")
    parser.add_argument("--api-key", default=os.environ.get("LOCAL_BENCH_API_KEY", ""),
                        help="for --url when the server has API_KEYS")
    parser.add_argument("--quick", action="store_true", help="a short run for ./start.sh perf")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    quick = args.quick
    configs = args.configs if args.configs is not None else ("2x2" if quick else "2x2,2x1,4x2")
    max_tokens = args.max_tokens or (64 if quick else 128)
    rounds = args.rounds or (1 if quick else 2)
    try:
        report = run(configs=configs, max_tokens=max_tokens, rounds=rounds, url=args.url,
                     start_server=args.serve, api_key=args.api_key, out=args.out)
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 2 if "unavailable" in str(exc) else 1
    print(table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
