"""Build the OpenAPI 3.1 document from the pydantic models that validate the requests.

Request schemas come from the very models the views validate with (ChatBody,
ConversationCreate, ConversationRename, PageQuery, CompletionRequest); answers from the
response models. Each model's ``$defs`` land in ``components/schemas``.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Literal

from pydantic import BaseModel, Field

from . import __version__
from .api.openai_api import CompletionRequest
from .schemas import (ChatBody, ChatReply, ConversationCreate, ConversationList,
                      ConversationRename, ConversationWithMessages, ErrorReply, PageQuery)
from .schemas import Conversation as ConversationModel

_REF = "#/components/schemas/{model}"


# -- Answers that only the document needs a model for --------------------------------------
class HealthReply(BaseModel):
    """The answer of GET /api/health (200, or 503 when the database cannot be reached)."""

    status: Literal["healthy", "degraded", "unhealthy"]
    version: str
    uptime_seconds: float
    components: dict[str, dict[str, Any]]


class LiveReply(BaseModel):
    status: Literal["alive"]


class ReadyReply(BaseModel):
    status: Literal["ready", "not_ready"]
    database: Literal["up", "down"]


class Latency(BaseModel):
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    count: int
    mean_ms: float | None


class RequestFigures(BaseModel):
    total: int
    by_endpoint_status: dict[str, int] = Field(..., description="keys are 'endpoint|status'")


class ChatFigures(BaseModel):
    total: int
    by_processing_method: dict[str, int]
    by_provider: dict[str, int]
    latency: Latency
    upstream_latency: Latency


class CacheFigures(BaseModel):
    hits: int
    misses: int
    hit_rate: float = Field(..., ge=0, le=1)
    entries: int


class UpstreamFigures(BaseModel):
    errors: dict[str, int] = Field(..., description="failures by kind")
    errors_total: int
    retries: int


class MetricsSummary(BaseModel):
    """The answer of GET /api/metrics: every figure summed over the server's workers."""

    requests: RequestFigures
    chat: ChatFigures
    cache: CacheFigures
    rate_limited: int
    load_shed: int
    inflight: int
    upstream: UpstreamFigures
    thread_pool: dict[str, int]
    event_loop: dict[str, int]
    database: dict[str, int]
    local: dict[str, Any] | None = Field(None, description="the local model's tokens and speed")
    uptime_seconds: float = Field(..., description="seconds since the server's first worker started")
    worker: dict[str, Any] = Field(..., description="the answering worker's own dispatcher state")


class ClearCacheReply(BaseModel):
    success: bool
    cleared: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """The answer of GET /v1/models."""

    object: Literal["list"]
    data: list[ModelCard]


class CompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class CompletionChoice(BaseModel):
    index: int
    message: CompletionMessage
    finish_reason: str | None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion object."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatStreamStart(BaseModel):
    """First event of a streamed chat."""

    conversation_id: str | None
    model: str
    provider: str


class ChatStreamDelta(BaseModel):
    """One piece of the reply, in order."""

    delta: str


class ChatStreamDone(BaseModel):
    """Last event of a streamed chat."""

    done: Literal[True]
    conversation_id: str | None = None
    message_id: str | None
    finish_reason: str
    cached: bool
    processing_method: Literal["async", "thread", "cache"]
    processing_time: float


class ChatStreamError(BaseModel):
    """`event: error`: the stream failed after it started, and ends."""

    code: str
    message: str


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """OpenAI's chat.completion.chunk object: one event of a streamed completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None = None
    details: list[dict[str, Any]] | None = None


class OpenAIErrorReply(BaseModel):
    """Errors of the /v1 endpoints, in OpenAI's shape."""

    error: OpenAIErrorBody


# -- Examples ---------------------------------------------------------------------------
_CID = "0f8fad5b-d9cb-469f-a165-70867728950e"
_MID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
_CONV = {"id": _CID, "title": "Hello!", "model": "gpt-4o-mini", "system_prompt": None,
         "created_at": "2025-01-01T12:00:00.000Z", "updated_at": "2025-01-01T12:00:02.000Z",
         "message_count": 2}
_MSGS = [{"id": "16fd2706-8baf-433b-82eb-8c7fada847da", "role": "user", "content": "Hello!",
          "created_at": "2025-01-01T12:00:01.000Z", "model": None, "cached": False,
          "finish_reason": None},
         {"id": _MID, "role": "assistant", "content": "Hi! How can I help?",
          "created_at": "2025-01-01T12:00:02.000Z", "model": "gpt-4o-mini", "cached": False,
          "finish_reason": "stop"}]
_CHAT_REPLY = {"success": True, "message": "Hi! How can I help?", "conversation_id": _CID,
               "message_id": _MID, "model": "gpt-4o-mini", "provider": "g4f", "cached": False,
               "processing_method": "async", "processing_time": 1.234, "queue_size": 0,
               "finish_reason": "stop"}
_CHAT_STREAM = (f'data: {{"conversation_id":"{_CID}","model":"gpt-4o-mini","provider":"g4f"}}\n\n'
                'data: {"delta":"Hi! "}\n\ndata: {"delta":"How can I help?"}\n\n'
                f'data: {{"done":true,"message_id":"{_MID}","finish_reason":"stop","cached":false,'
                '"processing_method":"async","processing_time":1.2}\n\n')
_COMPLETION = {"id": "chatcmpl-4f1c", "object": "chat.completion", "created": 1735732800,
               "model": "gpt-4o-mini",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                            "finish_reason": "stop", "logprobs": None}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
_COMPLETION_STREAM = ('data: {"id":"chatcmpl-4f1c","object":"chat.completion.chunk","created":1735732800,'
                      '"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi!"},'
                      '"finish_reason":null,"logprobs":null}]}\n\ndata: [DONE]\n\n')
_HEALTH = {"status": "healthy", "version": __version__, "uptime_seconds": 3600.5, "components": {
    "async_loop": {"status": "up", "alive": True, "pending_tasks": 0},
    "thread_pool": {"status": "up", "size": 32, "busy": 0},
    "database": {"status": "up", "pool_size": 2}, "cache": {"backend": "memory", "entries": 12},
    "rate_limit": {"limit": "20 per minute"}, "provider": {"default": "g4f"}}}
_LATENCY = {"p50_ms": 850.0, "p95_ms": 2100.0, "p99_ms": 4000.0, "count": 120, "mean_ms": 990.5}
_METRICS = {"requests": {"total": 250, "by_endpoint_status": {"/api/chat|200": 120}},
            "chat": {"total": 120, "by_processing_method": {"async": 90, "cache": 30},
                     "by_provider": {"g4f": 120}, "latency": _LATENCY, "upstream_latency": _LATENCY},
            "cache": {"hits": 30, "misses": 90, "hit_rate": 0.25, "entries": 90},
            "rate_limited": 2, "load_shed": 0, "inflight": 1,
            "upstream": {"errors": {"timeout": 1}, "errors_total": 1, "retries": 2},
            "thread_pool": {"busy": 0, "queued": 0}, "event_loop": {"pending_tasks": 1},
            "database": {"pool_size": 4, "waiting": 0},
            "local": {"tokens": 0, "tokens_per_second": None}, "uptime_seconds": 3600.5,
            "worker": {"pid": 4242, "uptime_seconds": 600.2, "inflight": 1, "max_inflight": 1000}}

# status -> (code, example message) of API.md's error table.
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_json", "the body is not valid JSON"),
    401: ("unauthorized", "a valid API key is required"),
    403: ("forbidden", "this endpoint needs the admin key"),
    404: ("conversation_not_found", f"conversation {_CID} not found"),
    405: ("method_not_allowed", "method GET is not allowed on /api/chat"),
    413: ("payload_too_large", "the request body is too large"),
    415: ("unsupported_media_type", "send the body as application/json"),
    422: ("validation_error", "invalid request: message: must not be empty"),
    429: ("rate_limited", "rate limit exceeded: 20 per 1 minute; try again later"),
    500: ("internal_error", "internal error; quote the request id when reporting it"),
    502: ("upstream_error", "provider 'g4f' failed after 3 attempts"),
    503: ("overloaded", "1000 chats in flight, the limit is 1000"),
    504: ("upstream_timeout", "no answer within 30.0 s"),
}
_DESCRIPTIONS = {
    400: "The body is not parseable JSON (on /v1 also: fields wrong, as OpenAI answers).",
    401: "Auth is on and the key is missing or wrong.",
    403: "Admin endpoint without the admin key.",
    404: "Unknown conversation, or one the caller does not own.",
    405: "The path exists, but not for this method; `Allow` lists the methods it takes.",
    413: "Body over MAX_BODY_BYTES.", 415: "POST body not JSON.",
    422: "Fields wrong; `details` lists each field and why.",
    429: "Per-client limit hit; retry after `Retry-After` seconds.",
    500: "A bug; logged with the request id.",
    502: "The model provider failed after retries.",
    503: "Load shed (`overloaded`, with Retry-After) or database down (`storage_unavailable`).",
    504: "The request deadline passed before the provider answered.",
}
_BODY_ERRORS = (400, 413, 415, 422)
_CHAT_ERRORS = (*_BODY_ERRORS, 401, 404, 429, 500, 502, 503, 504)

_HEADERS = {
    "X-Request-ID": {"description": "The request id: echoed when sane, else generated.",
                     "required": True, "schema": {"type": "string", "minLength": 1}},
    "X-Process-Time": {"description": "Server time in seconds.", "required": True,
                       "schema": {"type": "number", "minimum": 0}},
    "X-RateLimit-Limit": {"description": "Requests allowed in the window.",
                          "schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"description": "Requests left in the window.",
                              "schema": {"type": "integer"}},
    "X-RateLimit-Reset": {"description": "When the window resets (Unix time).",
                          "schema": {"type": "number"}},
    "Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                    "schema": {"type": "integer", "minimum": 0}},
}
_COMMON_HEADERS = ("X-Request-ID", "X-Process-Time")
_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    # -- schemas ----------------------------------------------------------------------
    def ref(self, model: type[BaseModel], mode: Literal["validation", "serialization"] = "validation",
            ) -> dict[str, str]:
        """Put model (and its $defs) in components/schemas; return a $ref to it."""
        schema = model.model_json_schema(ref_template=_REF, mode=mode)
        for name, sub in schema.pop("$defs", {}).items():
            self._add(name, sub)
        self._add(model.__name__, schema)
        return {"$ref": _REF.format(model=model.__name__)}

    def _add(self, name: str, schema: dict[str, Any]) -> None:
        if self.schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are named {name!r}")

    # -- pieces of operations ------------------------------------------------------------
    def body(self, model: type[BaseModel], examples: dict[str, Any]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {
            "schema": self.ref(model),
            "examples": {name: {"value": value} for name, value in examples.items()}}}}

    def answer(self, description: str, model: type[BaseModel] | None = None,
               example: Any = None, *, media: str = "application/json",
               headers: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> dict[str, Any]:
        content: dict[str, Any] = {}
        if model is not None or media != "application/json":
            schema = self.ref(model, "serialization") if model is not None else {"type": "string"}
            content[media] = {"schema": schema}
            if example is not None:
                content[media]["example"] = example
        content.update(extra or {})
        result: dict[str, Any] = {"description": description, "headers": {
            name: {"$ref": f"#/components/headers/{name}"} for name in (*_COMMON_HEADERS, *headers)}}
        if content:
            result["content"] = content
        return result

    def errors(self, *statuses: int, openai: bool = False, limited: bool = False) -> dict[str, Any]:
        out = {}
        for status in statuses:
            code, message = _ERRORS[status]
            if openai:
                model: type[BaseModel] = OpenAIErrorReply
                example: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error"
                                                     if status < 500 else "api_error",
                                                     "code": code, "param": None}}
            else:
                model = ErrorReply
                example = {"success": False, "error": {"code": code, "message": message},
                           "request_id": "3f2a9c1e5b7d4e0f"}
            headers: tuple[str, ...] = _LIMIT_HEADERS if limited else ()
            if status == 429:
                headers = (*headers, "Retry-After")
            out[str(status)] = self.answer(_DESCRIPTIONS[status], model, example, headers=headers)
        return out

    def page_params(self, default_limit: int) -> list[dict[str, Any]]:
        props = PageQuery.model_json_schema()["properties"]
        limit = {**props["limit"], "default": default_limit}
        return [{"name": "limit", "in": "query", "required": False, "schema": limit,
                 "description": "page size"},
                {"name": "cursor", "in": "query", "required": False,
                 "schema": {"type": "string"}, "description": "`next_cursor` of the previous page"}]


_CLIENT_ID = {"name": "X-Client-Id", "in": "header", "required": False,
              "description": "Opaque id (8-128 characters) that owns conversations when auth is off.",
              "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:\\-]{8,128}$"}}
_CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True,
                    "schema": {"type": "string", "format": "uuid"}, "example": _CID}
_PUBLIC: list[dict[str, Any]] = []
_ADMIN = [{}, {"adminKey": []}, {"bearerAuth": []}]


def _sse(data: dict[str, Any]) -> dict[str, Any]:
    """Describe one server-sent event whose `data` line is as given."""
    return {"type": "object", "description": "One server-sent event.", "required": ["data"],
            "properties": {"event": {"type": "string", "description": "`error` when the stream failed"},
                           "data": data, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def _operation(op_id: str, tag: str, summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"operationId": op_id, "tags": [tag], "summary": summary, **more, "responses": responses}


@functools.lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    b = _Builder()
    chat_events = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
        b.ref(m, "serialization") for m in (ChatStreamStart, ChatStreamDelta, ChatStreamDone,
                                            ChatStreamError)]}}
    completion_events = {"anyOf": [
        {"const": "[DONE]"},
        {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
            b.ref(ChatCompletionChunk, "serialization"), b.ref(OpenAIErrorReply, "serialization")]}}]}
    chat_stream = {"text/event-stream": {"schema": _sse(chat_events), "example": _CHAT_STREAM}}
    completion_stream = {"text/event-stream": {"schema": _sse(completion_events),
                                               "example": _COMPLETION_STREAM}}
    conv_errors = (401, 500, 503)
    paths: dict[str, Any] = {
        "/api/chat": {"post": _operation(
            "chat", "chat", "Answer one chat turn",
            {"200": b.answer("The reply; with `stream: true` server-sent events instead.", ChatReply,
                             _CHAT_REPLY, headers=_LIMIT_HEADERS, extra=chat_stream),
             **b.errors(*_CHAT_ERRORS, limited=True)},
            description="Send exactly one of `message` and `messages`. Unknown fields are ignored. "
                        "Every status of the error table can answer except 403 (admin only) "
                        "and 405 (other methods).",
            parameters=[_CLIENT_ID],
            requestBody=b.body(ChatBody, {
                "message": {"message": "Hello!"},
                "continue": {"message": "And then?", "conversation_id": _CID},
                "transcript": {"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}]},
                "stream": {"message": "Tell me a story", "stream": True}}))},
        "/api/conversations": {
            "get": _operation("listConversations", "conversations",
                              "The caller's conversations, newest activity first",
                              {"200": b.answer("A page of conversations.", ConversationList,
                                               {"conversations": [_CONV], "next_cursor": None}),
                               **b.errors(422, *conv_errors)},
                              parameters=[*b.page_params(20), _CLIENT_ID]),
            "post": _operation("createConversation", "conversations", "Create an empty conversation",
                               {"201": b.answer("The new conversation.", ConversationModel,
                                                {**_CONV, "message_count": 0}),
                                **b.errors(*_BODY_ERRORS, *conv_errors)},
                               parameters=[_CLIENT_ID],
                               requestBody=b.body(ConversationCreate, {
                                   "titled": {"title": "Trip plans", "system_prompt": "Be brief."},
                                   "empty": {}}))},
        "/api/conversations/{conversation_id}": {
            "parameters": [_CONVERSATION_ID, _CLIENT_ID],
            "get": _operation("getConversation", "conversations",
                              "One conversation with a page of its messages, oldest first",
                              {"200": b.answer("The conversation and its messages.",
                                               ConversationWithMessages,
                                               {**_CONV, "messages": _MSGS, "next_cursor": None}),
                               **b.errors(404, 422, *conv_errors)},
                              parameters=b.page_params(100)),
            "patch": _operation("renameConversation", "conversations", "Rename a conversation",
                                {"200": b.answer("The renamed conversation.", ConversationModel,
                                                 {**_CONV, "title": "Trip plans"}),
                                 **b.errors(404, *_BODY_ERRORS, *conv_errors)},
                                requestBody=b.body(ConversationRename,
                                                   {"rename": {"title": "Trip plans"}})),
            "delete": _operation("deleteConversation", "conversations",
                                 "Delete a conversation and its messages",
                                 {"204": b.answer("Deleted."), **b.errors(404, *conv_errors)})},
        "/api/health": {"get": _operation(
            "health", "operations", "Every component's state",
            {"200": b.answer("Healthy or degraded (the event loop is down, the pool serves).",
                             HealthReply, _HEALTH),
             "503": b.answer("Unhealthy: the database cannot be reached.", HealthReply,
                             {**_HEALTH, "status": "unhealthy"})}, security=_PUBLIC)},
        "/api/health/live": {"get": _operation(
            "live", "operations", "The process is up",
            {"200": b.answer("Alive.", LiveReply, {"status": "alive"})}, security=_PUBLIC)},
        "/api/health/ready": {"get": _operation(
            "ready", "operations", "The database is reachable and the worker can serve chats",
            {"200": b.answer("Ready.", ReadyReply, {"status": "ready", "database": "up"}),
             "503": b.answer("Not ready.", ReadyReply, {"status": "not_ready", "database": "down"})},
            security=_PUBLIC)},
        "/api/metrics": {"get": _operation(
            "metricsSummary", "operations", "The figures summed over all workers, for people",
            {"200": b.answer("Counts, hit rate, latency percentiles, uptime.", MetricsSummary, _METRICS),
             **b.errors(401, 500)})},
        "/metrics": {"get": _operation(
            "metricsPrometheus", "operations", "The figures in the Prometheus text format",
            {"200": b.answer("Prometheus exposition format 0.0.4.", media="text/plain",
                             example="# TYPE chat_requests_total counter\n"
                                     'chat_requests_total{processing_method="async",provider="g4f"} 90.0\n'),
             **b.errors(500)}, security=_PUBLIC)},
        "/api/clear-cache": {"post": _operation(
            "clearCache", "operations", "Empty the response cache of every worker (admin)",
            {"200": b.answer("Cleared.", ClearCacheReply, {"success": True, "cleared": 12}),
             **b.errors(401, 403, 500)},
            description="Needs `ADMIN_KEY` (`X-Admin-Key` or bearer); without one, loopback callers only.",
            security=_ADMIN)},
        "/v1/chat/completions": {"post": _operation(
            "createChatCompletion", "openai", "OpenAI-compatible chat completion",
            {"200": b.answer("A chat.completion object, or chat.completion.chunk events ending in "
                             "`data: [DONE]` with `stream: true`.", ChatCompletion, _COMPLETION,
                             headers=_LIMIT_HEADERS, extra=completion_stream),
             **b.errors(400, 401, 404, 413, 415, 429, 500, 502, 503, 504, openai=True, limited=True)},
            description="Stateless unless `X-Conversation-Id` names a conversation to store the exchange in.",
            parameters=[{"name": "X-Conversation-Id", "in": "header", "required": False,
                         "schema": {"type": "string", "format": "uuid"},
                         "description": "Store the exchange in this conversation."}],
            requestBody=b.body(CompletionRequest, {
                "simple": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]},
                "stream": {"messages": [{"role": "user", "content": "Hi"}], "stream": True}}))},
        "/v1/models": {"get": _operation(
            "listModels", "openai", "The models a client may ask for",
            {"200": b.answer("The model list.", ModelList, {"object": "list", "data": [
                {"id": "gpt-4o-mini", "object": "model", "created": 1735732800, "owned_by": "g4f"}]}),
             **b.errors(401, 500, openai=True)})},
        "/": {"get": _operation("webPage", "docs", "The web chat page",
                                {"200": b.answer("HTML page.", media="text/html")}, security=_PUBLIC)},
        "/openapi.json": {"get": _operation("openapi", "docs", "This document",
                                            {"200": b.answer("OpenAPI 3.1 document.", extra={
                                                "application/json": {"schema": {"type": "object"}}})},
                                            security=_PUBLIC)},
        "/docs": {"get": _operation("swaggerUi", "docs", "Swagger UI",
                                    {"200": b.answer("HTML page.", media="text/html")}, security=_PUBLIC)},
        "/redoc": {"get": _operation("redoc", "docs", "ReDoc",
                                     {"200": b.answer("HTML page.", media="text/html")}, security=_PUBLIC)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Chat backend API", "version": __version__,
                 "description": "A production chat backend for large language models. "
                                "Errors share one JSON shape; every answer carries X-Request-ID."},
        "servers": [{"url": "/"}],
        "tags": [{"name": "chat"}, {"name": "conversations"}, {"name": "openai",
                                                                 "description": "OpenAI-compatible"},
                 {"name": "operations"}, {"name": "docs"}],
        "security": [{}, {"bearerAuth": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(b.schemas.items())),
            # API.md's whole error table, one reusable answer per status.
            "responses": {f"Error{status}": answer for status, answer in
                          b.errors(*sorted(_ERRORS)).items()},
            "headers": {name: dict(value) for name, value in _HEADERS.items()},
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "An API key from API_KEYS (only when auth is on)."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "adminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"},
            },
        },
    }


def document() -> dict[str, Any]:
    """Return a fresh copy of the OpenAPI document."""
    return copy.deepcopy(_document())
