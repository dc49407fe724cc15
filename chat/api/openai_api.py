"""The OpenAI-compatible API: POST /v1/chat/completions and GET /v1/models."""
from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Generator, Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..auth import owner
from ..errors import ChatError, ConversationNotFound, ValidationFailed
from ..schemas import validate
from ..service import Exchange
from .chat import open_stream, sse_response
from .common import json_body, services

bp = Blueprint("openai", __name__, url_prefix="/v1")


class OpenAIMessage(BaseModel):
    """One message in OpenAI's format; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: str = Field(..., json_schema_extra={"enum": ["system", "user", "assistant", "developer"]})
    content: str | list[dict[str, Any]] | None = ""

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        value = "system" if value == "developer" else value
        if value not in ("system", "user", "assistant"):
            raise ValueError("must be 'system', 'user', 'assistant' or 'developer'")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class CompletionRequest(BaseModel):
    """OpenAI's chat completion request (the fields this server acts on)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[OpenAIMessage] = Field(..., min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)


def _bad_request(exc: ValidationFailed) -> ValidationFailed:
    # OpenAI answers invalid requests with 400; its SDKs raise BadRequestError for it.
    exc.status = 400
    return exc


def _exchange(body: CompletionRequest) -> Exchange:
    svc = services()
    settings = svc.settings
    turns = [{"role": m.role, "content": m.text()} for m in body.messages]
    if len(turns) > settings.max_messages:
        raise ValidationFailed(f"'messages' must hold at most {settings.max_messages} items",
                               details=[{"field": "messages", "message": "too many items"}])
    if turns[-1]["role"] != "user":
        raise ValidationFailed("the last message must have role 'user'",
                               details=[{"field": "messages", "message": "last role must be user"}])
    for i, turn in enumerate(turns):
        if len(turn["content"]) > settings.max_message_chars:
            raise ValidationFailed(f"message {i} is longer than {settings.max_message_chars} characters",
                                   details=[{"field": f"messages.{i}.content", "message": "too long"}])
    model = body.model or settings.llm_model
    provider = svc.providers.provider_for_model(model, settings.llm_provider) or settings.llm_provider
    conversation = request.headers.get("X-Conversation-Id", "").strip()
    ex = svc.chat.prepare(owner(), message=None, messages=turns, model=model, provider=provider,
                          temperature=body.temperature,
                          max_tokens=body.max_tokens or body.max_completion_tokens,
                          store=bool(conversation))
    if conversation:
        try:
            ex.conversation_id = str(uuid.UUID(conversation))
        except ValueError:
            raise ConversationNotFound(f"conversation {conversation} not found") from None
        try:
            svc.store.get_conversation(ex.owner, ex.conversation_id)
        except ConversationNotFound:
            ex.create = True  # the client names a new conversation
        else:
            ex.create, ex.turns = False, [turns[-1]]
    return ex


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """Answer an OpenAI chat completion request."""
    try:
        body: CompletionRequest = validate(CompletionRequest, json_body())
        ex = _exchange(body)
    except ValidationFailed as exc:
        raise _bad_request(exc) from None
    svc = services()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        events = svc.chat.stream(ex, heartbeat=svc.settings.stream_heartbeat)
        head = open_stream(events)[1:]  # drop the start event; early failures raise here
        return sse_response(_chunks(itertools.chain(head, events), events, completion_id,
                                    created, ex.model))
    answer = svc.chat.answer(ex)
    g.processing_method = answer.processing_method
    prompt = answer.usage.get("prompt_tokens") or _estimate_tokens(" ".join(t["content"] for t in ex.transcript))
    completion = answer.usage.get("completion_tokens") or _estimate_tokens(answer.text)
    response = jsonify({
        "id": completion_id, "object": "chat.completion", "created": created, "model": answer.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "finish_reason": answer.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    })
    _stamp(response, answer.processing_method, answer.cached, answer.conversation_id if ex.store else None)
    return response


def _stamp(response: Response, method: str, cached: bool, conversation_id: str | None) -> None:
    response.headers["X-Processing-Method"] = method
    response.headers["X-Cache"] = "HIT" if cached else "MISS"
    if conversation_id:
        response.headers["X-Conversation-Id"] = conversation_id


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, Any],
           finish: str | None = None) -> str:
    data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                         "logprobs": None}]}
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chunks(events: Iterator[dict[str, Any]], source: Generator[dict[str, Any], None, None],
            completion_id: str, created: int, model: str) -> Iterator[str]:
    yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""})
    try:
        for event in events:
            if event.get("heartbeat"):
                yield ": keep-alive\n\n"
            elif "delta" in event:
                yield _chunk(completion_id, created, model, {"content": event["delta"]})
            elif event.get("done"):
                g.processing_method = event.get("processing_method")  # for the access log
                yield _chunk(completion_id, created, model, {}, event.get("finish_reason", "stop"))
        yield "data: [DONE]\n\n"
    except ChatError as exc:
        error = {"error": {"message": exc.message, "type": "api_error", "code": exc.code}}
        yield f"data: {json.dumps(error)}\n\n"
    finally:
        source.close()


@bp.get("/models")
def list_models() -> Response:
    """List the models a client may ask for."""
    created = int(services().started_at)
    return jsonify({"object": "list", "data": [
        {"id": model, "object": "model", "created": created, "owned_by": provider}
        for model, provider in services().providers.all_models()]})
