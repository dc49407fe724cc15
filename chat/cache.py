"""Response cache: in-process TTL cache or Redis, with single flight for identical misses.

A clear bumps a generation number that is part of every key. The generation lives
where every worker sees it: in Redis, or in a small shared memory-mapped file when
several workers share one machine, or in the process when it is alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from cachetools import TTLCache

from . import metrics

logger = logging.getLogger(__name__)


def cache_key(**parts: Any) -> str:
    """Hash everything that shapes an answer into a key."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class Generation(Protocol):
    def get(self) -> int: ...
    def bump(self) -> int: ...


class LocalGeneration:
    """A generation counter for one process."""

    def __init__(self) -> None:
        self._value = 0

    def get(self) -> int:
        return self._value

    def bump(self) -> int:
        self._value += 1
        return self._value


class FileGeneration:
    """A generation counter in a memory-mapped file shared by the workers of one server."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        self._path = path

    def get(self) -> int:
        return int(struct.unpack_from("<Q", self._map, 0)[0])

    def bump(self) -> int:
        import fcntl

        # flock serialises bumps from several workers; reads need no lock (8-byte word).
        with open(self._path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                value = self.get() + 1
                struct.pack_into("<Q", self._map, 0, value)
                self._map.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return value


class ResponseCache:
    """Look up, store and clear cached replies; make one upstream call per identical miss."""

    def __init__(self, *, ttl: float = 300, max_entries: int = 1024, redis_url: str = "",
                 generation_file: str = "", namespace: str = "chat:cache") -> None:
        self.ttl = ttl
        self.enabled = ttl > 0 and max_entries > 0
        self._local: TTLCache[str, Any] = TTLCache(maxsize=max(max_entries, 1), ttl=max(ttl, 1))
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._redis: Any = None
        self._namespace = namespace
        self.backend = "memory"
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=2,
                                               socket_connect_timeout=2)
            self.backend = "redis"
            self.generation: Generation = _RedisGeneration(self._redis, f"{namespace}:gen")
        elif generation_file:
            self.generation = FileGeneration(generation_file)
        else:
            self.generation = LocalGeneration()

    def _full_key(self, key: str) -> str:
        return f"{self._namespace}:{self.generation.get()}:{key}"

    def get(self, key: str) -> dict[str, Any] | None:
        """Return the cached reply for key, or None."""
        if not self.enabled:
            return None
        full = self._full_key(key)
        value: Any
        if self._redis is not None:
            try:
                raw = self._redis.get(full)
            except Exception as exc:  # a cache outage must not fail chats
                logger.warning("redis cache read failed: %s", exc)
                return None
            value = json.loads(raw) if raw else None
        else:
            with self._lock:
                value = self._local.get(full)
        (metrics.CACHE_HITS if value is not None else metrics.CACHE_MISSES).inc()
        return value

    def set(self, key: str, value: dict[str, Any]) -> None:
        """Store a reply under key for the TTL."""
        if not self.enabled:
            return
        full = self._full_key(key)
        if self._redis is not None:
            try:
                self._redis.set(full, json.dumps(value), ex=max(int(self.ttl), 1))
            except Exception as exc:
                logger.warning("redis cache write failed: %s", exc)
            return
        with self._lock:
            self._local[full] = value
            metrics.CACHE_ENTRIES.set(len(self._local))

    def single_flight(self, key: str, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Run compute once for concurrent callers of one key; return (value, shared)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        assert flight is not None
        if not leader:
            return flight.wait(), True
        try:
            value = compute()
            flight.resolve(value)
            return value, False
        except BaseException as exc:
            flight.fail(exc)
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)

    def clear(self) -> int:
        """Drop every entry for every worker; return how many this process held."""
        with self._lock:
            count = len(self._local)
            self._local.clear()
            metrics.CACHE_ENTRIES.set(0)
        if self._redis is not None:
            try:
                count = sum(1 for _ in self._redis.scan_iter(
                    f"{self._namespace}:{self.generation.get()}:*", count=1000))
            except Exception as exc:
                logger.warning("redis cache count failed: %s", exc)
        self.generation.bump()
        return count

    def size(self) -> int:
        with self._lock:
            return len(self._local)

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend, "enabled": self.enabled, "ttl": self.ttl,
                "entries": self.size(), "generation": self.generation.get()}


class _Flight:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def resolve(self, value: Any) -> None:
        self._value = value
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._event.set()

    def wait(self) -> Any:
        self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _RedisGeneration:
    def __init__(self, client: Any, key: str) -> None:
        self._client = client
        self._key = key

    def get(self) -> int:
        try:
            return int(self._client.get(self._key) or 0)
        except Exception:
            return 0

    def bump(self) -> int:
        return int(self._client.incr(self._key))
