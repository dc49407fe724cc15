"""Primitives that work the same under gevent's monkey-patching and without it.

After patching, ``threading`` and ``concurrent.futures`` make greenlets and gevent locks;
native threads (the event-loop thread, the pool threads) must use the original
primitives instead, and greenlets must be woken from those threads in a thread-safe way.
"""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def gevent_active() -> bool:
    """Tell whether gevent has patched threading in this process."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("threading"))


def original(module: str, name: str) -> Any:
    """Return module.name as it was before gevent patched it."""
    if gevent_active():
        from gevent import monkey

        return monkey.get_original(module, name)
    return getattr(__import__(module), name)


def native_lock() -> Any:
    """Return a real OS lock, safe between the hub and native threads."""
    return original("_thread", "allocate_lock")()


def native_event() -> Any:
    """Return an event that native threads can poll without the hub."""
    if gevent_active():
        return _NativeFlag()
    import threading

    return threading.Event()


class _NativeFlag:
    """A set-once flag readable from any thread (is_set only; no blocking wait)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class NativeLoop(asyncio.SelectorEventLoop):
    """An event loop safe to run on a native thread of a gevent-patched process.

    Built on the original selector, and its default executor runs calls on real OS
    threads: under patching, concurrent.futures would start greenlets that no hub
    runs on this thread (anyio's getaddrinfo goes through it, for one).
    """

    def __init__(self) -> None:
        super().__init__(original("selectors", "DefaultSelector")())

    async def getaddrinfo(self, host: Any, port: Any, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> Any:
        # The patched socket.getaddrinfo would start a gevent hub and resolver pool in
        # whichever native thread calls it; the original one just blocks that thread.
        resolve = original("socket", "getaddrinfo")
        return await self.run_in_executor(None, resolve, host, port, family, type, proto, flags)

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if executor is not None:
            return super().run_in_executor(executor, func, *args)
        future: asyncio.Future[T] = self.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def work() -> None:
            try:
                result, error = func(*args), None
            except BaseException as exc:
                result, error = None, exc
            if not self.is_closed():
                self.call_soon_threadsafe(settle, result, error)

        original("_thread", "start_new_thread")(work, ())
        return future


class Waker:
    """Wake one waiter in the calling thread (or greenlet) from any other thread."""

    def __init__(self) -> None:
        self._gevent = gevent_active()
        if self._gevent:
            import gevent
            import gevent.event

            self._event: Any = gevent.event.Event()
            self._watcher = gevent.get_hub().loop.async_()
            self._watcher.start(self._event.set)
        else:
            import threading

            self._event = threading.Event()
            self._watcher = None

    def notify(self) -> None:
        """Wake the waiter; thread-safe."""
        if self._watcher is not None:
            self._watcher.send()
        else:
            self._event.set()

    def wait(self, timeout: float | None) -> bool:
        """Wait until notified or timeout; return whether notified."""
        fired = self._event.wait(timeout)
        self._event.clear()
        return bool(fired)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
