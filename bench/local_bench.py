"""Measure the local provider: tokens/s and time to first token at 1, 2 and 4 concurrent generations.

    python -m bench.local_bench [--configs 2x2,2x1,4x2] [--max-tokens 128] [--rounds 2]

A config is N_THREADSxMAX_CONCURRENT: the provider's thread budget and its slots (one model
each, n_threads // max_concurrent threads per model). 2x2 is the default provider, 2x1 one
shared model whose generations queue, 4x2 two models with two threads each (oversubscribed
on two cores).

Run from the repository root. Writes bench/results/local.json. Needs requirements-local.txt.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from chat.providers.base import ChatRequest
from chat.providers.local import LocalProvider, available

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]

TOPICS = ["the history of the sea", "how bridges are built", "the life of bees", "winter in the mountains",
          "the first computers", "a journey by train", "growing tomatoes", "the moon landing"]


def one_generation(provider: LocalProvider, topic: str, max_tokens: int, out: list[dict[str, float]]) -> None:
    """Stream one long answer and note its timings."""
    request = ChatRequest(messages=({"role": "user", "content": f"Write a long essay about {topic}."},),
                          model=provider.model_name, temperature=0.0, max_tokens=max_tokens)
    began = time.monotonic()
    first = last = None
    for piece in provider.stream(request):
        if piece.text:
            first = first or time.monotonic()
            last = time.monotonic()
    tokens = piece.extra["completion_tokens"]
    decode = (last - first) if first and last and last > first else 0.0
    out.append({"tokens": tokens, "ttft": (first or time.monotonic()) - began,
                "seconds": time.monotonic() - began,
                "decode_tps": (tokens - 1) / decode if decode else 0.0})


def run_level(provider: LocalProvider, concurrency: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """Run `rounds` rounds of `concurrency` simultaneous generations and summarise them."""
    samples: list[dict[str, float]] = []
    walls: list[float] = []
    for round_no in range(rounds):
        threads = [threading.Thread(target=one_generation,
                                    args=(provider, TOPICS[(round_no * concurrency + i) % len(TOPICS)],
                                          max_tokens, samples))
                   for i in range(concurrency)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        walls.append(time.monotonic() - began)
    tokens = sum(s["tokens"] for s in samples)
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


def bench_config(threads: int, max_concurrent: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """Measure one provider configuration at 1, 2 and 4 concurrent generations."""
    provider = LocalProvider(n_threads=threads, max_concurrent=max_concurrent)
    per_model = provider.threads_per_model
    try:
        began = time.monotonic()
        # Load every slot's model first so loading is not counted as generation time.
        run_level(provider, max_concurrent, 4, 1)
        warmup = time.monotonic() - began
        levels = [run_level(provider, c, max_tokens, rounds) for c in (1, 2, 4)]
    finally:
        provider.close()
    return {"n_threads": threads, "max_concurrent": max_concurrent, "threads_per_model": per_model,
            "warmup_s": round(warmup, 2), "levels": levels}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="2x2,2x1,4x2", help="N_THREADSxMAX_CONCURRENT, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "local.json"))
    args = parser.parse_args(argv)
    ok, reason = available()
    if not ok:
        print(f"local provider unavailable: {reason}", file=sys.stderr)
        return 2
    import llama_cpp

    load_before = os.getloadavg()
    configs = []
    for config in args.configs.split(","):
        threads, slots = (int(part) for part in config.lower().split("x"))
        configs.append(bench_config(threads, slots, args.max_tokens, args.rounds))
    report = {
        "model": LocalProvider().check()["model_path"],
        "llama_cpp_python": llama_cpp.__version__,
        "cpus": os.cpu_count(),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "configs": configs,
    }
    print(f"{'config':>6} {'thr/model':>9} {'conc':>4} {'agg tok/s':>9} {'gen tok/s':>9} {'decode':>7} "
          f"{'ttft med':>8} {'ttft max':>8}")
    for config in configs:
        name = f"{config['n_threads']}x{config['max_concurrent']}"
        for level in config["levels"]:
            print(f"{name:>6} {config['threads_per_model']:>9} {level['concurrency']:>4} "
                  f"{level['aggregate_tokens_per_second']:>9} {level['per_generation_tokens_per_second']:>9} "
                  f"{level['per_generation_decode_tokens_per_second']:>7} {level['ttft_median_s']:>8} "
                  f"{level['ttft_max_s']:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average {report['loadavg_before']} -> {report['loadavg_after']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
