"""ChatService: cache, single flight, dispatch to a provider, and storing each exchange."""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .cache import ResponseCache, cache_key
from .dispatcher import ASYNC, CACHE, Dispatcher
from .greenbridge import native_lock
from .errors import ChatError, Overloaded, UpstreamError, UpstreamTimeout
from .providers import ProviderRegistry
from .providers.retry import flush_retries
from .providers.base import ChatRequest, Completion, StreamPiece
from .store import Reply, Store, title_from

logger = logging.getLogger(__name__)


@dataclass
class Exchange:
    """One chat request, resolved: who asks, what goes upstream, where it is stored."""

    owner: str
    provider: str
    model: str
    transcript: list[dict[str, str]]
    turns: list[dict[str, str]]
    conversation_id: str | None
    create: bool
    title: str
    system_prompt: str | None
    temperature: float | None = None
    max_tokens: int | None = None
    use_async: bool = True
    use_cache: bool = True
    store: bool = True
    started: float = field(default_factory=time.monotonic)

    def request(self) -> ChatRequest:
        return ChatRequest(messages=tuple(self.transcript), model=self.model,
                           temperature=self.temperature, max_tokens=self.max_tokens)

    def key(self) -> str:
        return cache_key(provider=self.provider, model=self.model, temperature=self.temperature,
                         max_tokens=self.max_tokens, messages=self.transcript)


@dataclass
class Answer:
    """The outcome of a non-streamed chat."""

    text: str
    model: str
    provider: str
    cached: bool
    processing_method: str
    processing_time: float
    finish_reason: str
    conversation_id: str | None
    message_id: str | None
    queue_size: int
    usage: dict[str, int | None] = field(default_factory=dict)


class ChatService:
    """Answer chats; knows nothing of HTTP."""

    def __init__(self, *, store: Store, cache: ResponseCache, dispatcher: Dispatcher,
                 providers: ProviderRegistry, request_timeout: float, history_limit: int,
                 default_provider: str, default_model: str) -> None:
        self.store = store
        self.cache = cache
        self.dispatcher = dispatcher
        self.providers = providers
        self.request_timeout = request_timeout
        self.history_limit = history_limit
        self.default_provider = default_provider
        self.default_model = default_model
        self._figures_lock = native_lock()
        self._local_tokens_reported = 0

    def record_figures(self) -> None:
        """Move figures gathered on loop and pool threads into the metrics."""
        flush_retries()
        self.record_local_figures()

    def record_local_figures(self) -> None:
        """Move the local model's newly generated tokens and its last speed into the metrics.

        Runs on the request's greenlet (after each local generation) and before metrics are
        read, never on the pool thread that generated: prometheus_client's locks are gevent's
        there. A generation that ends after its request left is counted at the next call.
        """
        if "local" not in self.providers.names():
            return
        provider = self.providers.get("local")
        total = getattr(provider, "tokens_total", None)
        if total is None:
            return
        with self._figures_lock:
            new, self._local_tokens_reported = total - self._local_tokens_reported, total
        if new > 0:
            metrics.LOCAL_TOKENS.inc(new)
        rate = getattr(provider, "last_tokens_per_second", None)
        if rate:
            metrics.LOCAL_TOKENS_PER_SECOND.set(rate)

    # -- building an exchange -------------------------------------------------
    def prepare(self, owner: str, *, message: str | None, messages: list[dict[str, str]] | None,
                conversation_id: str | None = None, system_prompt: str | None = None,
                model: str | None = None, provider: str | None = None,
                temperature: float | None = None, max_tokens: int | None = None,
                use_async: bool = True, use_cache: bool = True, store: bool = True) -> Exchange:
        """Check the provider and model, load history, and build the transcript."""
        provider_name = provider or self.default_provider
        if provider_name not in self.providers.names():
            self.providers.check_choice(provider_name, model or "")  # 422 naming the provider, not a KeyError
        served = self.providers.models(provider_name)
        model_name = model or (self.default_model if self.default_model in served
                               else self.providers.default_model(provider_name))
        self.providers.check_choice(provider_name, model_name)
        if messages is not None:
            system = next((m["content"] for m in messages if m["role"] == "system"), system_prompt)
            transcript = ([{"role": "system", "content": system_prompt}]
                          if system_prompt and not any(m["role"] == "system" for m in messages) else [])
            transcript += [dict(m) for m in messages]
            first_user = next(m["content"] for m in messages if m["role"] == "user")
            return Exchange(owner, provider_name, model_name, transcript, [dict(m) for m in messages],
                            _new_id() if store else None, store, title_from(first_user), system, temperature, max_tokens,
                            use_async, use_cache, store)
        assert message is not None
        create = conversation_id is None
        if conversation_id is not None:
            conv, history = self.store.history(owner, conversation_id, limit=self.history_limit)
            system_prompt = conv["system_prompt"]
            if model is None and conv["model"] in self.providers.models(provider_name):
                model_name = conv["model"]  # a conversation keeps the model it was created with
        else:
            history = []
            conversation_id = _new_id() if store else None
        transcript = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        transcript += history + [{"role": "user", "content": message}]
        return Exchange(owner, provider_name, model_name, transcript,
                        [{"role": "user", "content": message}], conversation_id,
                        create and store, title_from(message), system_prompt, temperature, max_tokens,
                        use_async, use_cache, store)

    # -- non-streamed -----------------------------------------------------------
    def answer(self, ex: Exchange) -> Answer:
        """Answer from the cache or the provider, then store the exchange."""
        key = ex.key()
        hit = self.cache.get(key) if ex.use_cache else None
        queue = self.dispatcher.inflight
        if hit is not None:
            method, cached, completion = CACHE, True, _from_cache(hit)
        else:
            with self._admitted():
                if ex.use_cache:
                    value, shared = self.cache.single_flight(key, lambda: self._call(ex))
                else:
                    value, shared = self._call(ex), False
            completion = _from_cache(value)
            method = CACHE if shared else value["processing_method"]
            cached = shared
        elapsed = time.monotonic() - ex.started
        conversation_id, message_id = self._save(ex, completion.text, completion.model, cached,
                                                 completion.finish_reason, elapsed)
        metrics.CHAT_REQUESTS.labels(processing_method=method, provider=ex.provider).inc()
        metrics.CHAT_LATENCY.labels(provider=ex.provider).observe(elapsed)
        return Answer(completion.text, completion.model, ex.provider, cached, method,
                      round(elapsed, 4), completion.finish_reason, conversation_id, message_id,
                      queue, {"prompt_tokens": completion.prompt_tokens,
                              "completion_tokens": completion.completion_tokens})

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        # admit() is a context manager: Overloaded comes from entering it, not calling it.
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.dispatcher.admit())
            except Overloaded:
                metrics.LOAD_SHED.inc()
                raise
            yield

    def _call(self, ex: Exchange) -> dict[str, Any]:
        provider = self.providers.get(ex.provider)
        deadline = ex.started + self.request_timeout
        request = ex.request()
        method = self.dispatcher.choose(supports_async=provider.supports_async,
                                        prefer_async=ex.use_async)
        started = time.monotonic()
        metrics.INFLIGHT.inc()
        try:
            completion: Completion = self.dispatcher.run(
                method,
                coro_factory=lambda: provider.acomplete(request, deadline=deadline),
                sync_fn=lambda: provider.complete(request, deadline=deadline),
                timeout=deadline - time.monotonic())
        except ChatError as exc:
            _count_error(exc)
            raise
        except Exception as exc:  # a provider bug must still answer in the API's shape
            error = _unexpected(ex.provider, exc)
            _count_error(error)
            raise error from exc
        finally:
            metrics.INFLIGHT.dec()
            self.record_figures()
        metrics.UPSTREAM_LATENCY.labels(provider=ex.provider).observe(time.monotonic() - started)
        value = {"text": completion.text, "model": completion.model,
                 "finish_reason": completion.finish_reason,
                 "prompt_tokens": completion.prompt_tokens,
                 "completion_tokens": completion.completion_tokens}
        if ex.use_cache or self.cache.enabled:
            self.cache.set(ex.key(), value)
        return {**value, "processing_method": method}

    def _save(self, ex: Exchange, text: str, model: str, cached: bool, finish_reason: str,
              elapsed: float) -> tuple[str | None, str | None]:
        if not ex.store or ex.conversation_id is None:
            return ex.conversation_id, None
        reply = Reply(content=text, model=model, provider=ex.provider, cached=cached,
                      finish_reason=finish_reason, latency_ms=int(elapsed * 1000))
        return self.store.save_exchange(ex.owner, conversation_id=ex.conversation_id,
                                        create=ex.create, turns=ex.turns, reply=reply, title=ex.title,
                                        model=ex.model, system_prompt=ex.system_prompt)

    # -- streamed ---------------------------------------------------------------
    def stream(self, ex: Exchange, *, heartbeat: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield events: start, deltas (None for heartbeats), then done; store what was sent.

        Closing the generator early (the client went away) cancels the upstream call
        and stores the partial reply with finish_reason 'cancelled'.
        """
        key = ex.key()
        hit = self.cache.get(key) if ex.use_cache else None
        start = {"conversation_id": ex.conversation_id, "model": ex.model, "provider": ex.provider}
        if hit is not None:
            yield start
            yield from self._stream_cached(ex, hit)
            return
        pieces: list[str] = []
        finish = "cancelled"
        method = ASYNC
        with self._admitted():
            yield start
            provider = self.providers.get(ex.provider)
            deadline = ex.started + self.request_timeout
            request = ex.request()
            method = self.dispatcher.choose(supports_async=provider.supports_async,
                                            prefer_async=ex.use_async)
            metrics.INFLIGHT.inc()
            try:
                source = self.dispatcher.stream(
                    method,
                    agen_factory=lambda: provider.astream(request, deadline=deadline),
                    iter_factory=lambda cancel: provider.stream(request, deadline=deadline,
                                                                cancel=cancel),
                    timeout=deadline - time.monotonic(), heartbeat=heartbeat)
                try:
                    for piece in source:
                        if piece is None:
                            yield {"heartbeat": True}
                            continue
                        assert isinstance(piece, StreamPiece)
                        if piece.text:
                            pieces.append(piece.text)
                            yield {"delta": piece.text}
                        if piece.finish_reason:
                            finish = piece.finish_reason
                    if finish == "cancelled":
                        finish = "stop"
                finally:
                    source.close()
            except ChatError as exc:
                _count_error(exc)
                finish = "error"
                if not pieces:
                    raise
                self._store_stream(ex, pieces, finish)
                raise
            except Exception as exc:
                error = _unexpected(ex.provider, exc)
                _count_error(error)
                if pieces:
                    self._store_stream(ex, pieces, "error")
                raise error from exc
            except GeneratorExit:
                self._store_stream(ex, pieces, "cancelled")
                raise
            finally:
                metrics.INFLIGHT.dec()
                self.record_figures()
        text = "".join(pieces)
        if finish in ("stop", "length"):
            self.cache.set(key, {"text": text, "model": ex.model, "finish_reason": finish})
        conversation_id, message_id = self._store_stream(ex, pieces, finish)
        metrics.CHAT_REQUESTS.labels(processing_method=method, provider=ex.provider).inc()
        elapsed = time.monotonic() - ex.started
        metrics.CHAT_LATENCY.labels(provider=ex.provider).observe(elapsed)
        yield {"done": True, "conversation_id": conversation_id, "message_id": message_id,
               "finish_reason": finish, "cached": False, "processing_method": method,
               "processing_time": round(elapsed, 4)}

    def _stream_cached(self, ex: Exchange, hit: dict[str, Any]) -> Iterator[dict[str, Any]]:
        text = hit["text"]
        # A few deltas rather than one, so clients exercise their streaming path.
        step = max(len(text) // 4, 64)
        for i in range(0, len(text), step):
            yield {"delta": text[i:i + step]}
        elapsed = time.monotonic() - ex.started
        conversation_id, message_id = self._save(ex, text, hit.get("model", ex.model), True,
                                                 hit.get("finish_reason", "stop"), elapsed)
        metrics.CHAT_REQUESTS.labels(processing_method=CACHE, provider=ex.provider).inc()
        yield {"done": True, "conversation_id": conversation_id, "message_id": message_id,
               "finish_reason": hit.get("finish_reason", "stop"), "cached": True,
               "processing_method": CACHE, "processing_time": round(elapsed, 4)}

    def _store_stream(self, ex: Exchange, pieces: list[str], finish: str) -> tuple[str | None, str | None]:
        elapsed = time.monotonic() - ex.started
        try:
            return self._save(ex, "".join(pieces), ex.model, False, finish, elapsed)
        except ChatError:
            logger.exception("could not store the streamed exchange")
            raise


def _new_id() -> str:
    return str(uuid.uuid4())


def _from_cache(value: dict[str, Any]) -> Completion:
    return Completion(text=value["text"], model=value["model"],
                      finish_reason=value.get("finish_reason", "stop"),
                      prompt_tokens=value.get("prompt_tokens"),
                      completion_tokens=value.get("completion_tokens"))


def _unexpected(provider: str, exc: BaseException) -> UpstreamError:
    """Wrap an exception a provider let through: a timeout stays a timeout."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"provider {provider!r} did not finish before the deadline")
    logger.error("provider %r raised an unexpected error", provider, exc_info=exc)
    return UpstreamError(f"provider {provider!r} failed: {type(exc).__name__}")


def _count_error(exc: ChatError) -> None:
    if isinstance(exc, UpstreamError):
        metrics.UPSTREAM_ERRORS.labels(kind=exc.kind).inc()


__all__ = ["Answer", "ChatService", "Exchange"]
