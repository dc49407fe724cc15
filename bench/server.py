"""Run the server as production does (gunicorn -c gunicorn.conf.py) for the benchmark."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
# Loopback must never go through an HTTP proxy taken from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> int:
    """Lift the soft open-files limit towards the hard one; return the new soft limit."""
    # A worker holding 1000 clients also holds up to 1000 upstream connections: more
    # descriptors than the usual soft limit of 1024. gunicorn inherits it from us.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """Return the user+system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Return a process's resident set size in MiB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """One gunicorn server on a free loopback port, with the given WSGI target and settings."""

    def __init__(self, target: str, env: dict[str, str], *, workers: int = 1,
                 ready_path: str = "/api/health/ready", log_dir: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.target = target
        self.ready_path = ready_path
        # Our own settings win; figures and cache-generation files are the master's to make.
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("PROMETHEUS_MULTIPROC_DIR", "CHAT_")) and k != "BIND"}
        base.update({"HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": str(workers),
                     "PYTHONUNBUFFERED": "1"})
        base.update(env)
        self.env = base
        folder = log_dir or tempfile.gettempdir()
        self.log_path = Path(folder) / f"bench-{target.replace(':', '-')}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> Server:
        """Start gunicorn and wait until every worker answers."""
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", self.target], cwd=ROOT,
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with _OPENER.open(self.url + self.ready_path, timeout=2) as response:
                    if response.status == 200 and len(self.worker_pids()) >= int(self.env["WEB_CONCURRENCY"]):
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.target} did not start within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """Return the pids of the master's children (the workers)."""
        if self.proc is None:
            return []
        master = str(self.proc.pid)
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as handle:
                    ppid = handle.read().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if ppid == master:
                pids.append(int(name))
        return sorted(pids)

    def stop(self, timeout: float = 40.0) -> None:
        """Stop gracefully (SIGTERM), then kill the whole group if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Usage:
    """Sample the workers' RSS while a scenario runs and total their CPU time."""

    def __init__(self, server: Server, interval: float = 0.5) -> None:
        self.server = server
        self.interval = interval
        self.peak_total = 0.0
        self.peak_worker = 0.0
        self._cpu_start: dict[int, float] = {}
        self._cpu_end: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        sizes = []
        for pid in self.server.worker_pids():
            try:
                sizes.append(rss_mb(pid))
                self._cpu_end[pid] = cpu_seconds(pid)
            except OSError:
                continue
        if sizes:
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_worker = max(self.peak_worker, max(sizes))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Usage:
        for pid in self.server.worker_pids():
            try:
                self._cpu_start[pid] = cpu_seconds(pid)
            except OSError:
                pass
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def cpu_seconds(self) -> float:
        """Return the CPU seconds the workers used between enter and exit."""
        return sum(end - self._cpu_start.get(pid, 0.0) for pid, end in self._cpu_end.items())

    def figures(self) -> dict[str, Any]:
        return {"rss_mb": round(self.peak_total, 1), "rss_mb_max_worker": round(self.peak_worker, 1),
                "worker_cpu_s": round(self.cpu_seconds(), 2)}
