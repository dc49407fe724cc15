"""The provider interface every model backend implements."""
from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterator
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
