"""Who is calling: API keys, client ids, admin rights."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re

from flask import Flask, current_app, request

from .errors import Forbidden, Unauthorized
from .settings import Settings

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{8,128}$")
ANONYMOUS = "anonymous"
# Reachable without a key even when auth is on.
PUBLIC_PREFIXES = ("/api/health", "/docs", "/redoc", "/openapi.json", "/static/", "/metrics")
PUBLIC_PATHS = ("/", "/favicon.ico")


def _presented_key() -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Key", "").strip()


def _matches(candidate: str, keys: list[str]) -> bool:
    # Compare against every key so the time taken says nothing about which one matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def _key_owner(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]


def owner() -> str:
    """Return the owner id of the current caller's conversations."""
    settings: Settings = current_app.extensions["chat"].settings
    if settings.auth_enabled:
        return _key_owner(_presented_key())
    client = request.headers.get("X-Client-Id", "")
    return "client:" + client if _CLIENT_ID.match(client) else ANONYMOUS


def rate_key() -> str:
    """Key the per-client limit by API key when auth is on, else by client address."""
    settings: Settings = current_app.extensions["chat"].settings
    if settings.auth_enabled:
        return _key_owner(_presented_key())
    return request.remote_addr or "unknown"


def _is_loopback() -> bool:
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def require_admin() -> None:
    """Allow only the admin key, or loopback callers when no admin key is set."""
    settings: Settings = current_app.extensions["chat"].settings
    if settings.admin_key:
        presented = request.headers.get("X-Admin-Key", "") or _presented_key()
        if not presented or not hmac.compare_digest(presented.encode(), settings.admin_key.encode()):
            raise Forbidden("this endpoint needs the admin key")
    elif not _is_loopback():
        raise Forbidden("without ADMIN_KEY set, admin endpoints answer only loopback clients")


def _check_key() -> None:
    settings: Settings = current_app.extensions["chat"].settings
    if not settings.auth_enabled or request.method == "OPTIONS":
        return
    path = request.path
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return
    if path == "/api/clear-cache" and settings.admin_key:
        return  # the admin key alone is enough there
    key = _presented_key()
    if not key or not _matches(key, settings.api_keys):
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'")


def init_app(app: Flask) -> None:
    """Check keys before every request."""
    app.before_request(_check_key)
