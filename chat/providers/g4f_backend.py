"""g4f (free providers) through its AsyncClient, on the loop thread or a pool thread's own loop.

g4f's sync Client makes a new event loop per call with the patched selector, which
fails under gevent, so the thread path runs the same AsyncClient code on a private
loop per pool thread (AsyncProvider).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import g4f.errors
import requests
from g4f.client import AsyncClient
from g4f.requests import aiohttp as g4f_aiohttp

from ..errors import ChatError, UpstreamError, UpstreamTimeout
from ..settings import SettingsError
from .base import AsyncProvider, ChatRequest, Completion, StreamPiece
from .retry import async_retrying, remaining

logger = logging.getLogger(__name__)

# g4f reports a status as "Response 500: ..." (raise_for_status) or "Error 500: ..." (raise_error).
_STATUS = re.compile(r"(?:Response|Error) (\d{3})")
DEFAULT_MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "o3-mini",
                  "llama-3.3-70b", "deepseek-v3", "gemini-2.0-flash"]


def _status_of(exc: BaseException) -> int | None:
    match = _STATUS.search(str(exc))
    return int(match.group(1)) if match else None


def is_transient(exc: BaseException) -> bool:
    """Tell whether a retry may help: connection errors, 429 and 5xx only."""
    if isinstance(exc, (asyncio.TimeoutError, g4f.errors.MissingAuthError,
                        g4f.errors.PaymentRequiredError)):
        return False
    if isinstance(exc, g4f.errors.RateLimitError):
        return True
    if isinstance(exc, g4f.errors.ResponseError):
        status = _status_of(exc)
        return status is not None and (status == 429 or status >= 500)
    return isinstance(exc, (aiohttp.ClientConnectionError, requests.ConnectionError,
                            ConnectionError))


def wrap_error(name: str, exc: BaseException) -> ChatError:
    """Turn a g4f, aiohttp or requests error into the API's error, with a short message."""
    error = _wrap(name, exc)
    error.message = _short(error.message)
    return error


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _wrap(name: str, exc: BaseException) -> ChatError:
    if isinstance(exc, ChatError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, g4f.errors.TimeoutError)):
        return UpstreamTimeout(f"provider {name!r} timed out")
    if isinstance(exc, (aiohttp.ClientConnectionError, requests.ConnectionError, ConnectionError)):
        return UpstreamError(f"provider {name!r} could not be reached: {exc}", kind="connection")
    if isinstance(exc, (g4f.errors.MissingAuthError, g4f.errors.PaymentRequiredError)):
        return UpstreamError(f"provider {name!r} refused the request: {exc}", kind="auth")
    if isinstance(exc, g4f.errors.RateLimitError):
        return UpstreamError(f"provider {name!r} is rate limited: {exc}", kind="rate_limited")
    if isinstance(exc, g4f.errors.ResponseError):
        status = _status_of(exc)
        return UpstreamError(f"provider {name!r} answered HTTP {status}: {exc}",
                             kind=f"http_{status}" if status else "error")
    if isinstance(exc, (json.JSONDecodeError, aiohttp.ContentTypeError, KeyError, IndexError,
                        TypeError, ValueError)):
        return UpstreamError(f"provider {name!r} sent an answer that could not be read",
                             kind="invalid_response")
    if isinstance(exc, g4f.errors.G4FError):
        return UpstreamError(f"provider {name!r} failed: {exc}", kind="error")
    return UpstreamError(f"provider {name!r} failed: {type(exc).__name__}: {exc}", kind="error")


class G4FProvider(AsyncProvider):
    """Answer through g4f, either letting it pick a free provider or pinned to one."""

    name = "g4f"

    def __init__(self, *, provider_name: str = "", base_url: str = "", api_key: str = "",
                 models: list[str] | None = None, default_model: str = "gpt-4o-mini",
                 max_connections: int = 1000, retry_attempts: int = 3,
                 retry_backoff: float = 0.25) -> None:
        super().__init__()
        self._models = models or ([default_model] + [m for m in DEFAULT_MODELS
                                                     if m != default_model])
        self._pinned = provider_name or ("custom" if base_url else "auto")
        self._provider: Any = None
        if base_url:
            from g4f.client.factory import create_custom_provider

            self._provider = create_custom_provider(base_url=base_url, api_key=api_key or None,
                                                    name="CustomUpstream", models=self._models,
                                                    default_model=default_model)
        elif provider_name:
            from g4f.Provider import ProviderUtils

            self._provider = ProviderUtils.convert.get(provider_name)
            if self._provider is None:
                raise SettingsError(f"G4F_PROVIDER={provider_name!r}: no such g4f provider")
        self._max_connections = max_connections
        self._retry = {"attempts": retry_attempts, "backoff": retry_backoff}

    def models(self) -> list[str]:
        return list(self._models)

    def check(self) -> dict[str, Any]:
        return {"name": self.name, "g4f_provider": self._pinned, "models": len(self._models)}

    def _client(self) -> AsyncClient:
        return self.loop_client(self._new_client)

    def _new_client(self) -> AsyncClient:
        # g4f caps each loop's shared aiohttp connector at 20 connections per host, which
        # would cap a loop thread at 20 concurrent chats; give each loop a connector sized
        # to our own in-flight bound instead (tests/test_gevent_dispatch.py measures it).
        g4f_aiohttp._loop_connectors[asyncio.get_running_loop()] = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=self._max_connections,
            keepalive_timeout=30, ttl_dns_cache=300)
        return AsyncClient(provider=self._provider)

    def _kwargs(self, request: ChatRequest, deadline: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": request.model, "messages": list(request.messages),
                                  "timeout": max(remaining(deadline), 0.01)}
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.max_tokens is not None:
            kwargs["max_tokens"] = request.max_tokens
        return kwargs

    async def acomplete(self, request: ChatRequest, *, deadline: float) -> Completion:
        client = self._client()
        try:
            async for attempt in async_retrying(self.name, deadline=deadline,
                                                is_transient=is_transient, **self._retry):
                with attempt:
                    response = await asyncio.wait_for(
                        client.chat.completions.create(**self._kwargs(request, deadline)),
                        remaining(deadline))
        except Exception as exc:
            raise wrap_error(self.name, exc) from exc
        choices = getattr(response, "choices", None)
        if not choices:
            raise UpstreamError(f"provider {self.name!r} returned no answer",
                                kind="invalid_response")
        usage = getattr(response, "usage", None)
        return Completion(text=choices[0].message.content or "",
                          model=getattr(response, "model", None) or request.model,
                          finish_reason=choices[0].finish_reason or "stop",
                          prompt_tokens=getattr(usage, "prompt_tokens", None),
                          completion_tokens=getattr(usage, "completion_tokens", None))

    async def astream(self, request: ChatRequest, *, deadline: float) -> AsyncIterator[StreamPiece]:
        client = self._client()
        try:
            chunks = client.chat.completions.create(**self._kwargs(request, deadline), stream=True)
            async for chunk in chunks:
                choices = getattr(chunk, "choices", None)
                if not choices:
                    continue
                text = getattr(choices[0].delta, "content", None) or ""
                finish = getattr(choices[0], "finish_reason", None)
                if text or finish:
                    yield StreamPiece(text=text if isinstance(text, str) else str(text),
                                      finish_reason=finish)
        except Exception as exc:
            raise wrap_error(self.name, exc) from exc

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop_clients.pop(id(loop), None)
        connector = g4f_aiohttp._loop_connectors.pop(loop, None)
        if connector is not None:
            await connector.close()
