"""gunicorn settings: gevent workers, every value overridable from the environment.

Run: gunicorn -c gunicorn.conf.py app:app
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


# -- Where to listen ---------------------------------------------------------
bind = os.environ.get("BIND") or f"{os.environ.get('HOST') or '0.0.0.0'}:{_int('PORT', 4343)}"
backlog = _int("BACKLOG", 2048)  # pending connections; 64-8192

# -- Workers -------------------------------------------------------------------
# One gevent worker per core: each holds thousands of connections as greenlets.
workers = _int("WEB_CONCURRENCY", multiprocessing.cpu_count())  # 1-2x cores
worker_class = "gevent"
worker_connections = _int("WORKER_CONNECTIONS", 2000)  # per worker; 100-10000
# The app is imported in each worker after gevent has patched it: psycopg picks its
# (cooperative) wait function at import time, so preloading would freeze the hub.
preload_app = False

# -- Time limits -----------------------------------------------------------------
timeout = _int("WORKER_TIMEOUT", 120)  # silent worker is killed; keep above REQUEST_TIMEOUT
graceful_timeout = _int("GRACEFUL_TIMEOUT", 30)  # in-flight chats get this long after SIGTERM
keepalive = _int("KEEPALIVE", 5)  # seconds an idle keep-alive connection stays open; 2-75

# -- Recycling -------------------------------------------------------------------
max_requests = _int("MAX_REQUESTS", 0)  # 0 = never recycle; 1000-100000 bounds slow leaks
max_requests_jitter = _int("MAX_REQUESTS_JITTER", 0)  # spreads recycling; ~10% of max_requests

# -- Logging: the app writes JSON access lines itself -----------------------------
accesslog = None
errorlog = "-"
loglevel = (os.environ.get("LOG_LEVEL") or "info").lower()
proc_name = "chat-backend"

# The app reads the worker count to say loudly when limits are per worker.
os.environ["WEB_CONCURRENCY"] = str(workers)

_owned: dict[str, object] = {}


def on_starting(server) -> None:  # type: ignore[no-untyped-def]
    """Prepare what all workers share: figures folder, cache generation, embedded database."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        folder = tempfile.mkdtemp(prefix="chat-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        _owned["metrics_dir"] = folder
    else:
        folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # figures from a previous run are not ours
            if name.endswith(".db"):
                os.remove(os.path.join(folder, name))
    if not os.environ.get("CHAT_CACHE_GENERATION_FILE"):
        os.environ["CHAT_CACHE_GENERATION_FILE"] = os.path.join(folder, "cache-generation")
    if not os.environ.get("DATABASE_URL") and not os.environ.get("CHAT_EMBEDDED_DATABASE_URL"):
        from chat.embedded_db import EmbeddedPostgres

        embedded = EmbeddedPostgres(os.environ.get("DATA_DIR") or "./data")
        os.environ["CHAT_EMBEDDED_DATABASE_URL"] = embedded.start()
        _owned["embedded"] = embedded
        server.log.info("embedded PostgreSQL started in %s", embedded.pgdata)


def when_ready(server) -> None:  # type: ignore[no-untyped-def]
    server.log.info("chat backend listening on %s with %d gevent workers", bind, workers)


def post_worker_init(worker) -> None:  # type: ignore[no-untyped-def]
    """Move start-up objects out of the garbage collector's way."""
    import gc

    # Everything built at start-up lives as long as the worker; freezing it keeps full
    # collections (100+ ms pauses of every greenlet) from scanning it again and again.
    gc.collect()
    gc.freeze()


def worker_exit(server, worker) -> None:  # type: ignore[no-untyped-def]
    """Close the worker's loop thread, pool and database pool."""
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("chat") if app is not None else None
    if services is not None:
        services.close()


def child_exit(server, worker) -> None:  # type: ignore[no-untyped-def]
    """Drop a dead worker's live gauges so sums stay right."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:  # type: ignore[no-untyped-def]
    """Stop the embedded database and remove the figures folder this master made."""
    embedded = _owned.get("embedded")
    if embedded is not None:
        embedded.stop()  # type: ignore[attr-defined]
        server.log.info("embedded PostgreSQL stopped")
    folder = _owned.get("metrics_dir")
    if folder:
        shutil.rmtree(str(folder), ignore_errors=True)
