"""The error tree: each error knows its HTTP status and API code."""
from __future__ import annotations

from typing import Any


class ChatError(Exception):
    """Base of every error the API reports to clients."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after = retry_after


class InvalidJSON(ChatError):
    """The body is not parseable JSON."""

    status, code = 400, "invalid_json"


class Unauthorized(ChatError):
    """Auth is on and the key is missing or wrong."""

    status, code = 401, "unauthorized"


class Forbidden(ChatError):
    """An admin endpoint was called without the admin key."""

    status, code = 403, "forbidden"


class NotFound(ChatError):
    """No such route."""

    status, code = 404, "not_found"


class ConversationNotFound(NotFound):
    """The conversation does not exist or belongs to another caller."""

    code = "conversation_not_found"


class MethodNotAllowed(ChatError):
    """The route exists but not for this method."""

    status, code = 405, "method_not_allowed"


class PayloadTooLarge(ChatError):
    """The body is over MAX_BODY_BYTES."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ChatError):
    """A POST body that is not JSON."""

    status, code = 415, "unsupported_media_type"


class ValidationFailed(ChatError):
    """Fields are wrong; details list each one."""

    status, code = 422, "validation_error"


class RateLimited(ChatError):
    """The per-client limit was hit."""

    status, code = 429, "rate_limited"


class UpstreamError(ChatError):
    """The model provider failed after retries."""

    status, code = 502, "upstream_error"

    def __init__(self, message: str, *, kind: str = "error", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.kind = kind


class UpstreamTimeout(UpstreamError):
    """The request deadline passed before the provider answered."""

    status, code = 504, "upstream_timeout"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, kind="timeout", **kwargs)


class Overloaded(ChatError):
    """Too many chats in flight: shed load instead of queueing."""

    status, code = 503, "overloaded"


class StorageUnavailable(ChatError):
    """The database cannot be reached."""

    status, code = 503, "storage_unavailable"


class ProviderUnavailable(ValidationFailed):
    """The requested provider is configured out or cannot run here."""
