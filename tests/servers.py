"""Start the real server (gunicorn with gevent workers, or Redis) for integration tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from collections.abc import Callable
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, step: float = 0.02) -> Any:
    """Poll predicate until it returns something true or timeout passes; return its last value."""
    end = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < end:
        time.sleep(step)
    return value


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Wait until url answers 200."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s: {last}")


class Gunicorn:
    """Run `gunicorn -c gunicorn.conf.py app:app` on a free loopback port with settings."""

    def __init__(self, *, database_url: str, upstream_url: str, workers: int = 1,
                 **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_dir = tempfile.mkdtemp(prefix="chat-test-metrics-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "CHAT_"))}
        env.update({
            "HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": str(workers),
            "DATABASE_URL": database_url, "G4F_BASE_URL": upstream_url, "LLM_BASE_URL": upstream_url,
            "LLM_API_KEY": "test-key", "RATE_LIMIT_CHAT": "100000 per minute",
            "LOG_LEVEL": "WARNING", "RETRY_BACKOFF": "0.01", "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            "G4F_CACHE_DIR": "/tmp/chat-tests-g4f", "PYTHONUNBUFFERED": "1",
        })
        env.update({k.upper(): str(v) for k, v in settings.items()})
        self.env = env
        self.log_path = Path(tempfile.mkstemp(prefix="chat-gunicorn-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Gunicorn:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_http(self.url + "/api/health/ready", timeout)
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"gunicorn did not start:\n{self.log()[-3000:]}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """Return the pids of the gunicorn workers (children of the master)."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int | None:
        """Send sig to the master and wait for it to exit; kill it if it does not."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Redis:
    """Run a private redis-server on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="chat-test-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Redis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Redis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
