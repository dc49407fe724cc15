"""A production chat backend for large language models."""
from __future__ import annotations

import atexit
import logging
from typing import Any

from flask import Flask

__version__ = "1.0.0"

logger = logging.getLogger(__name__)


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Build the application: settings, services, extensions and blueprints."""
    from flask_cors import CORS
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import auth, handlers, limits, observability
    from .api import admin, chat, conversations, docs, health, metrics_view, openai_api
    from .services import build_services
    from .settings import Settings

    settings = Settings.load(overrides)
    observability.configure_logging(settings.log_level)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops,  # type: ignore[method-assign]
                                x_proto=settings.trusted_proxy_hops)
    services = build_services(settings)
    app.extensions["chat"] = services
    atexit.register(services.close)

    observability.init_app(app)
    auth.init_app(app)
    handlers.init_app(app)
    CORS(app, origins=settings.cors_origins, expose_headers=[
        "X-Request-ID", "X-Process-Time", "Retry-After", "X-RateLimit-Limit",
        "X-RateLimit-Remaining", "X-RateLimit-Reset"])
    for module in (chat, conversations, health, metrics_view, admin, openai_api, docs):
        app.register_blueprint(module.bp)
    try:
        from . import web
    except ImportError:
        pass
    else:
        app.register_blueprint(web.bp)
    limits.init_app(app, settings)
    logger.info("chat backend ready: provider %s, model %s", settings.llm_provider, settings.llm_model)
    return app
