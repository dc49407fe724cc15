"""Per-client rate limits on the chat endpoints (Flask-Limiter)."""
from __future__ import annotations

import logging

from flask import Flask
from flask_limiter import Limiter

from .auth import rate_key
from .settings import Settings

logger = logging.getLogger(__name__)

#: Endpoints that share the per-client chat limit.
CHAT_ENDPOINTS = ("chat.chat", "openai.chat_completions")


def init_app(app: Flask, settings: Settings) -> Limiter:
    """Bind a limiter to this app and apply the chat limit to the chat endpoints."""
    storage = settings.redis_url or "memory://"
    limiter = Limiter(
        rate_key,
        app=app,
        storage_uri=storage,
        strategy="moving-window",
        headers_enabled=True,
        enabled=settings.rate_limit_enabled,
        key_prefix="chat-limits",
        # A limiter outage must not take chat down with it.
        swallow_errors=True,
        in_memory_fallback_enabled=bool(settings.redis_url),
    )
    for endpoint in CHAT_ENDPOINTS:
        view = app.view_functions.get(endpoint)
        if view is not None:
            app.view_functions[endpoint] = limiter.shared_limit(
                settings.rate_limit_chat, scope="chat")(view)
    app.extensions["chat_limiter"] = limiter
    if not settings.redis_url and settings.web_concurrency > 1:
        logger.warning("rate limits are per worker: %d workers and no REDIS_URL make the limit "
                       "about %d times as loose", settings.web_concurrency, settings.web_concurrency)
    return limiter
