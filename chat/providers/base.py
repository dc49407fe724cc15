"""The provider interface every model backend implements."""
from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatRequest:
    """One call to a model: the full transcript and the sampling parameters."""

    messages: tuple[dict[str, str], ...]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass
class Completion:
    """A finished reply from a provider."""

    text: str
    model: str
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class StreamPiece:
    """One piece of a streamed reply; the last piece may carry the finish reason."""

    text: str
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Provider(abc.ABC):
    """A model backend: async methods run on the loop thread, sync ones on pool threads.

    ``deadline`` is a ``time.monotonic()`` instant no call may outlive; ``cancel`` is an
    event the sync methods check between pieces. Methods raise only ChatError subclasses.
    """

    name: str = ""
    #: True when ``acomplete``/``astream`` are real coroutines safe on the loop thread.
    supports_async: bool = True
    #: True when the sync methods block a native thread for the whole generation.
    blocking: bool = False

    @abc.abstractmethod
    def models(self) -> list[str]:
        """Return the model names this provider serves."""

    @abc.abstractmethod
    def check(self) -> dict[str, Any]:
        """Return a cheap status description; must not call the network."""

    async def acomplete(self, request: ChatRequest, *, deadline: float) -> Completion:
        """Answer on the event-loop thread."""
        raise TypeError(f"provider {self.name!r} has no async API")

    def complete(self, request: ChatRequest, *, deadline: float, cancel: Any = None) -> Completion:
        """Answer on a native pool thread."""
        raise TypeError(f"provider {self.name!r} has no sync API")

    def astream(self, request: ChatRequest, *, deadline: float) -> AsyncIterator[StreamPiece]:
        """Stream pieces on the event-loop thread."""
        raise TypeError(f"provider {self.name!r} cannot stream asynchronously")

    def stream(self, request: ChatRequest, *, deadline: float, cancel: Any = None) -> Iterator[StreamPiece]:
        """Stream pieces on a native pool thread."""
        raise TypeError(f"provider {self.name!r} cannot stream synchronously")

    async def aclose(self) -> None:
        """Release clients bound to the event-loop thread; runs on that thread."""

    def close(self) -> None:
        """Release clients and sessions."""


#: How often a pool thread streaming from a silent upstream checks for a cancel, seconds.
CANCEL_POLL = 0.1


async def _anext(pieces: AsyncIterator[StreamPiece]) -> StreamPiece:
    return await pieces.__anext__()


async def _settle(known: set[asyncio.Task[Any]], timeout: float = 0.5) -> None:
    """Run the aclose() tasks that generator finalizers scheduled on this loop.

    Closing a provider generator at a yield leaves the generators it was iterating to
    the loop's finalizer hook; on a pool thread's loop those would run (and close the
    upstream connection) only when the thread next streams.
    """
    me = asyncio.current_task()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        await asyncio.sleep(0)
        others = asyncio.all_tasks() - known - {me}
        if not others:
            return
        await asyncio.wait(others, timeout=max(end - time.monotonic(), 0))


class AsyncProvider(Provider):
    """A provider written once, async; its sync methods run that code on a private loop.

    Each native pool thread gets its own event loop (built like the dispatcher's loop,
    safe under gevent), so the thread path and the loop path share one implementation
    and one set of error mappings. Clients bound to a loop are kept per loop.
    """

    def __init__(self) -> None:
        from ..greenbridge import original

        self._thread_loops: dict[int, asyncio.AbstractEventLoop] = {}
        self._get_ident = original("_thread", "get_ident")
        self._loop_clients: dict[int, Any] = {}

    def loop_client(self, factory: Callable[[], Any]) -> Any:
        """Return this loop's client, building it on first use inside that loop."""
        key = id(asyncio.get_running_loop())
        client = self._loop_clients.get(key)
        if client is None:
            client = self._loop_clients[key] = factory()
        return client

    def _thread_loop(self) -> asyncio.AbstractEventLoop:
        from ..greenbridge import NativeLoop

        ident = self._get_ident()
        loop = self._thread_loops.get(ident)
        if loop is None or loop.is_closed():
            loop = self._thread_loops[ident] = NativeLoop()
        return loop

    def complete(self, request: ChatRequest, *, deadline: float, cancel: Any = None) -> Completion:
        return self._thread_loop().run_until_complete(self.acomplete(request, deadline=deadline))

    def stream(self, request: ChatRequest, *, deadline: float, cancel: Any = None) -> Iterator[StreamPiece]:
        from ..errors import UpstreamTimeout

        loop = self._thread_loop()
        pieces = self.astream(request, deadline=deadline).__aiter__()
        pending: asyncio.Task[StreamPiece] | None = None
        finished = False
        try:
            while cancel is None or not cancel.is_set():
                pending = loop.create_task(_anext(pieces))
                # Wait in short slices so that a cancel (the client went away) is seen
                # within CANCEL_POLL even while the upstream is silent.
                while not pending.done():
                    if cancel is not None and cancel.is_set():
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise UpstreamTimeout(f"provider {self.name!r} timed out")
                    loop.run_until_complete(asyncio.wait({pending}, timeout=min(left, CANCEL_POLL)))
                try:
                    piece = pending.result()
                except StopAsyncIteration:
                    finished = True
                    return
                pending = None
                yield piece
        finally:
            if pending is not None and not pending.done():
                # Cancelling the waiting task unwinds the provider's (nested) generators
                # at once and closes the upstream response, as on the loop thread; an
                # aclose() alone would leave inner generators to a finalizer that runs
                # only the next time this thread's loop runs.
                pending.cancel()
                loop.run_until_complete(asyncio.wait({pending}))
            if not finished:
                known = asyncio.all_tasks(loop)
                loop.run_until_complete(pieces.aclose())
                loop.run_until_complete(_settle(known))

    async def aclose_clients(self) -> None:
        """Close the clients of the running loop."""

    def close(self) -> None:
        for loop in list(self._thread_loops.values()):
            if not loop.is_closed() and not loop.is_running():
                try:
                    loop.run_until_complete(self.aclose())
                finally:
                    loop.close()
        self._thread_loops.clear()
