"""Run upstream work on a dedicated event-loop thread or, as fallback, a native thread pool.

Under gevent (gunicorn's gevent worker patches everything after fork) ``threading``
and ``concurrent.futures`` run greenlets, so the loop thread is started with the
original ``_thread`` primitives and built on the original selector, and greenlets
wait for it through an async watcher of their hub: a thread-safe wake-up that never
freezes the hub. Without gevent the same code runs on plain threads.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import Overloaded, UpstreamTimeout
from .greenbridge import NativeLoop, Waker, gevent_active, native_event, native_lock, original

logger = logging.getLogger(__name__)
T = TypeVar("T")

ASYNC, THREAD, CACHE = "async", "thread", "cache"
_END = object()


class Dispatcher:
    """Own one event-loop thread and one native thread pool per process."""

    def __init__(self, *, pool_size: int = 32, max_inflight: int = 1000,
                 loop_max_tasks: int = 5000) -> None:
        self.pool_size = pool_size
        self.max_inflight = max_inflight
        self.loop_max_tasks = loop_max_tasks
        self._lock = native_lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_alive = False
        self._loop_ready: Any = None
        self._pool: concurrent.futures.Executor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight = 0
        self._pool_busy = 0
        self._pool_submitted = 0
        self._pool_pending = 0  # submitted and not finished: running or queued
        self._closed = False
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread and the pool (idempotent)."""
        self._ensure_loop()
        self._ensure_pool()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop | None:
        with self._lock:
            if self._loop is not None or self._closed:
                return self._loop if self._loop_alive else None
            loop = NativeLoop()
            self._loop = loop
            self._loop_alive = True
            original("_thread", "start_new_thread")(self._run_loop, (loop,))
        return loop

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        except BaseException:  # a dead loop must degrade to the pool, not kill the worker
            logger.exception("event-loop thread stopped with an error")
        finally:
            self._loop_alive = False
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception:
                pass
            loop.close()

    def _ensure_pool(self) -> concurrent.futures.Executor:
        with self._lock:
            if self._pool is None:
                if gevent_active():
                    from gevent.threadpool import ThreadPoolExecutor
                else:
                    from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(max_workers=self.pool_size)
            return self._pool

    def close(self, timeout: float = 5.0) -> None:
        """Cancel loop tasks, stop the loop thread and the pool."""
        with self._lock:
            self._closed = True
            loop, self._loop = self._loop, None
            pool, self._pool = self._pool, None
        if loop is not None and self._loop_alive:
            async def _shutdown() -> None:
                for task in list(self._tasks):
                    task.cancel()
                loop.stop()

            loop.call_soon_threadsafe(lambda: loop.create_task(_shutdown()))
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def stop_loop_for_test(self) -> None:
        """Stop the loop thread as a crash would, leaving the pool to carry the load."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            deadline = time.monotonic() + 2
            while self._loop_alive and time.monotonic() < deadline:
                time.sleep(0.01)

    # -- admission ---------------------------------------------------------
    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count one chat in flight; shed it with Overloaded past MAX_INFLIGHT."""
        with self._lock:
            if self._inflight >= self.max_inflight:
                raise Overloaded(f"{self._inflight} chats in flight, the limit is {self.max_inflight}",
                                 retry_after=1)
            self._inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight -= 1

    @property
    def inflight(self) -> int:
        return self._inflight

    def loop_usable(self) -> bool:
        """Tell whether the loop thread is alive and not saturated."""
        return (not self._closed and self._ensure_loop() is not None
                and len(self._tasks) < self.loop_max_tasks)

    def choose(self, *, supports_async: bool, prefer_async: bool) -> str:
        """Pick the path for one request."""
        if supports_async and prefer_async and self.loop_usable():
            return ASYNC
        return THREAD

    # -- single calls --------------------------------------------------------
    def run(self, method: str, *, coro_factory: Callable[[], Awaitable[T]] | None,
            sync_fn: Callable[[], T] | None, timeout: float) -> T:
        """Run on the chosen path and wait at most timeout seconds."""
        if method == ASYNC:
            assert coro_factory is not None
            return self.run_async(coro_factory, timeout)
        assert sync_fn is not None
        return self.run_thread(sync_fn, timeout)

    def run_async(self, coro_factory: Callable[[], Awaitable[T]], timeout: float) -> T:
        """Run a coroutine made on the loop thread; cancel it when timeout passes."""
        loop = self._ensure_loop()
        if loop is None:
            raise RuntimeError("the event-loop thread is not running")
        waker = Waker()
        holder: dict[str, asyncio.Task[Any]] = {}

        def start() -> None:
            task = loop.create_task(self._as_coroutine(coro_factory))
            holder["task"] = task
            self._tasks.add(task)
            task.add_done_callback(lambda t: (self._tasks.discard(t), waker.notify()))

        loop.call_soon_threadsafe(start)
        try:
            if not waker.wait(max(timeout, 0)):
                raise UpstreamTimeout(f"no answer within {timeout:.1f} s")
            task = holder["task"]
            if task.cancelled():
                raise UpstreamTimeout("the upstream call was cancelled")
            return task.result()
        finally:
            task = holder.get("task")
            if task is None or not task.done():
                loop.call_soon_threadsafe(self._cancel, holder)
            waker.close()

    @staticmethod
    async def _as_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
        return await factory()

    @staticmethod
    def _cancel(holder: dict[str, asyncio.Task[Any]]) -> None:
        task = holder.get("task")
        if task is not None:
            task.cancel()

    def run_thread(self, fn: Callable[[], T], timeout: float) -> T:
        """Run a blocking call on a native pool thread and wait at most timeout."""
        pool = self._ensure_pool()
        future = self._submit(pool, fn)
        try:
            return future.result(timeout=max(timeout, 0))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise UpstreamTimeout(f"no answer within {timeout:.1f} s") from None
        except TimeoutError as exc:
            if future.done():
                raise
            future.cancel()
            raise UpstreamTimeout(f"no answer within {timeout:.1f} s") from exc

    def _submit(self, pool: concurrent.futures.Executor, fn: Callable[[], T]) -> Any:
        """Submit fn to the pool, counting it as pending until its future settles."""
        with self._lock:
            self._pool_pending += 1
        try:
            future = pool.submit(self._counted, fn)
        except BaseException:
            self._settled(None)
            raise
        future.add_done_callback(self._settled)
        return future

    def _settled(self, _future: Any) -> None:
        with self._lock:
            self._pool_pending -= 1

    def _counted(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self._pool_busy += 1
            self._pool_submitted += 1
        try:
            return fn()
        finally:
            with self._lock:
                self._pool_busy -= 1

    # -- streams -------------------------------------------------------------
    def stream(self, method: str, *, agen_factory: Callable[[], AsyncIterator[T]] | None,
               iter_factory: Callable[[Any], Iterator[T]] | None,
               timeout: float, heartbeat: float | None = None) -> Iterator[T | None]:
        """Yield items from a provider stream as they arrive; None marks a silent heartbeat.

        Closing the returned generator cancels the upstream work.
        """
        deadline = time.monotonic() + timeout
        items: collections.deque[Any] = collections.deque()
        waker = Waker()
        cancel = native_event()
        holder: dict[str, Any] = {}

        def push(item: Any) -> None:
            items.append(item)
            waker.notify()

        if method == ASYNC:
            loop = self._ensure_loop()
            if loop is None:
                raise RuntimeError("the event-loop thread is not running")
            assert agen_factory is not None

            async def pump() -> None:
                try:
                    async for piece in agen_factory():
                        push(piece)
                    push(_END)
                except asyncio.CancelledError:
                    push(_END)
                    raise
                except BaseException as exc:
                    push(exc)

            def start() -> None:
                task = loop.create_task(pump())
                holder["task"] = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            loop.call_soon_threadsafe(start)
        else:
            assert iter_factory is not None
            pool = self._ensure_pool()

            def pump_thread() -> None:
                try:
                    for piece in iter_factory(cancel):
                        if cancel.is_set():
                            break
                        push(piece)
                    push(_END)
                except BaseException as exc:
                    push(exc)

            holder["future"] = self._submit(pool, pump_thread)

        finished = False
        try:
            while True:
                while items:
                    item = items.popleft()
                    if item is _END:
                        finished = True
                        return
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    yield item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamTimeout(f"the stream did not finish within {timeout:.1f} s")
                wait = min(remaining, heartbeat) if heartbeat else remaining
                if not waker.wait(wait) and not items and heartbeat and remaining > wait:
                    yield None
        finally:
            if not finished:
                cancel.set()
                if "task" in holder or method == ASYNC:
                    loop2 = self._loop
                    if loop2 is not None and self._loop_alive:
                        loop2.call_soon_threadsafe(self._cancel, holder)
            waker.close()

    # -- state ---------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Describe the loop thread and the pool for health and metrics."""
        return {
            "async_loop": {
                "alive": bool(self._loop is not None and self._loop_alive),
                "pending_tasks": len(self._tasks),
                "max_tasks": self.loop_max_tasks,
            },
            "thread_pool": {
                "size": self.pool_size,
                "busy": self._pool_busy,
                "queued": max(0, self._pool_pending - self._pool_busy),
                "submitted": self._pool_submitted,
                "native": True,
            },
            "inflight": self._inflight,
            "max_inflight": self.max_inflight,
            "closed": self._closed,
            "gevent": gevent_active(),
        }
