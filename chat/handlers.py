"""Turn every error into API.md's JSON shape (or OpenAI's on /v1)."""
from __future__ import annotations

import logging
import math
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_limiter import RateLimitExceeded
from werkzeug.exceptions import HTTPException

from . import metrics
from .errors import ChatError

logger = logging.getLogger(__name__)

_HTTP_CODES = {400: "invalid_json", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited"}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error", 502: "api_error", 503: "api_error", 504: "timeout_error"}


def error_response(status: int, code: str, message: str, *,
                   details: list[dict[str, Any]] | None = None,
                   retry_after: float | None = None) -> Response:
    """Build the JSON error answer for the current request."""
    if request.path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": message,
                                          "type": _OPENAI_TYPES.get(status, "api_error"),
                                          "code": code, "param": None}}
        if details:
            body["error"]["details"] = details
    else:
        error: dict[str, Any] = {"code": code, "message": message}
        if details:
            error["details"] = details
        body = {"success": False, "error": error, "request_id": g.get("request_id")}
    response = jsonify(body)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        g.retry_after = response.headers["Retry-After"]
    return response


def _own_retry_after(response: Response) -> Response:
    """Keep Retry-After meaning what this server says: an error's own hint, or the 429's window.

    Flask-Limiter sets Retry-After on every response of a limited endpoint (seconds until
    its window resets) and raises any smaller value to it, which told a shed client
    (503 overloaded, Retry-After 1) to wait a minute. This hook is registered before the
    limiter's, so it runs after it.
    """
    own = g.get("retry_after")
    if own is not None:
        response.headers["Retry-After"] = own
    elif response.status_code != 429:
        response.headers.pop("Retry-After", None)
    return response


def _chat_error(exc: ChatError) -> Response:
    if exc.status >= 500:
        logger.warning("%s: %s", exc.code, exc.message)
    return error_response(exc.status, exc.code, exc.message, details=exc.details,
                          retry_after=exc.retry_after)


def _rate_limited(exc: RateLimitExceeded) -> Response:
    metrics.RATE_LIMITED.inc()
    return error_response(429, "rate_limited",
                          f"rate limit exceeded: {exc.description}; try again later")


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = _HTTP_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
    messages = {404: f"no such endpoint: {request.method} {request.path}",
                405: f"method {request.method} is not allowed on {request.path}",
                413: "the request body is too large"}
    response = error_response(status, code, messages.get(status, exc.description or exc.name))
    if getattr(exc, "valid_methods", None):  # RFC 9110: a 405 names the allowed methods
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    return response


def _unexpected(exc: Exception) -> Response:
    logger.exception("unhandled error")
    return error_response(500, "internal_error", "internal error; quote the request id when reporting it")


def init_app(app: Flask) -> None:
    """Register the error handlers."""
    app.register_error_handler(ChatError, _chat_error)
    app.register_error_handler(RateLimitExceeded, _rate_limited)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    app.after_request(_own_retry_after)
