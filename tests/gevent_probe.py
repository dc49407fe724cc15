"""Run N concurrent chats in a gevent-patched process and report timings as JSON.

Used by tests/test_gevent_dispatch.py: python tests/gevent_probe.py DB_URL UPSTREAM_URL N
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import gevent  # noqa: E402

from chat import create_app  # noqa: E402


def main() -> None:
    database_url, upstream_url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app = create_app({"database_url": database_url, "g4f_base_url": upstream_url,
                      "llm_base_url": upstream_url, "llm_api_key": "k", "thread_pool_size": count,
                      "rate_limit_chat": "100000 per minute", "log_level": "WARNING",
                      "db_pool_max": 20, "request_timeout": 20})
    gaps: list[float] = []
    running = True

    def ticker() -> None:
        last = time.perf_counter()
        while running:
            gevent.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last - 0.01)
            last = now

    def chat(provider: str, use_async: bool, i: int) -> tuple[int, str]:
        client = app.test_client()
        body = {"message": f"probe {uuid.uuid4().hex} #delay=1", "provider": provider,
                "use_async": use_async}
        response = client.post("/api/chat", json=body)
        return response.status_code, (response.get_json() or {}).get("processing_method", "")

    results = {}
    tick = gevent.spawn(ticker)
    for provider in sys.argv[4].split(","):
        for use_async in (True, False):
            # A warm-up round builds each pool thread's loop, client and connection:
            # what is measured is the steady state of a running server.
            gevent.joinall([gevent.spawn(chat, provider, use_async, i) for i in range(count)])
            gaps.clear()
            started = time.perf_counter()
            cpu = time.process_time()
            jobs = [gevent.spawn(chat, provider, use_async, i) for i in range(count)]
            gevent.joinall(jobs)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
            outcomes = [job.value for job in jobs]
            results[f"{provider}/{'async' if use_async else 'thread'}"] = {
                "seconds": round(elapsed, 3),
                "cpu_seconds": round(cpu, 3),
                "ok": sum(1 for status, _ in outcomes if status == 200),
                "methods": sorted({method for _, method in outcomes}),
                "max_tick_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
                "p95_tick_gap_ms": round(sorted(gaps)[int(len(gaps) * 0.95)] * 1000, 1) if gaps else None,
                "ticks": len(gaps),
            }
    running = False
    tick.join()
    app.extensions["chat"].close()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
