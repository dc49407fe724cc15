"""Request and response models: they validate bodies and generate the OpenAPI document."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from .errors import ValidationFailed


class Turn(BaseModel):
    """One message of a client-held transcript."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(..., json_schema_extra={"maxLength": 8000})

    @field_validator("content")
    @classmethod
    def _bounded(cls, value: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_message_chars", 8000)
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters, got {len(value)}")
        return value


class ChatBody(BaseModel):
    """The body of POST /api/chat."""

    # The extra keywords document what the validators below check (limits at their defaults,
    # MAX_MESSAGE_CHARS and MAX_MESSAGES); they do not change validation.
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "oneOf": [{"title": "a new user turn", "required": ["message"]},
                  {"title": "a client-held transcript", "required": ["messages"]}],
        "examples": [{"message": "Hello!"},
                     {"messages": [{"role": "user", "content": "Hi"}], "stream": True}]})

    message: str | None = Field(None, description="the new user turn; send it or `messages`",
                                json_schema_extra={"minLength": 1, "maxLength": 8000, "pattern": r"\S"})
    messages: list[Turn] | None = Field(None, description="a client-held transcript, last turn from the user",
                                        json_schema_extra={"minItems": 1, "maxItems": 50})
    conversation_id: uuid.UUID | None = None
    system_prompt: str | None = None
    model: str | None = None
    provider: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=32768)
    stream: bool = False
    use_async: bool = Field(True, validation_alias=AliasChoices("use_async", "useAsync"))
    cache: bool = True

    @field_validator("message")
    @classmethod
    def _message_bounds(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        value = value.strip()
        limit = (info.context or {}).get("max_message_chars", 8000)
        if not value:
            raise ValueError("must not be empty")
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters, got {len(value)}")
        return value

    @field_validator("system_prompt")
    @classmethod
    def _prompt_bounds(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = (info.context or {}).get("max_message_chars", 8000)
        if value is not None and len(value) > limit:
            raise ValueError(f"must be at most {limit} characters, got {len(value)}")
        return value or None

    @field_validator("messages")
    @classmethod
    def _transcript_bounds(cls, value: list[Turn] | None, info: ValidationInfo) -> list[Turn] | None:
        # A field validator, so that `details` names the field `messages`.
        if value is None:
            return None
        limit = (info.context or {}).get("max_messages", 50)
        if not 1 <= len(value) <= limit:
            raise ValueError(f"must hold 1 to {limit} items, got {len(value)}")
        if value[-1].role != "user":
            raise ValueError("the last item must have role 'user'")
        return value

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> ChatBody:
        if (self.message is None) == (self.messages is None):
            raise ValueError("send exactly one of 'message' and 'messages'")
        if self.messages is not None:
            if self.conversation_id is not None:
                raise ValueError("'conversation_id' goes with 'message', not 'messages'")
        return self


class ConversationCreate(BaseModel):
    """The body of POST /api/conversations."""

    model_config = ConfigDict(extra="ignore")

    title: str = Field("", max_length=200)
    system_prompt: str | None = Field(None, max_length=8000)
    model: str | None = Field(None, max_length=200)


class ConversationRename(BaseModel):
    """The body of PATCH /api/conversations/<id>."""

    model_config = ConfigDict(extra="ignore")

    title: str = Field(..., min_length=1, max_length=200)

    @field_validator("title")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("must not be blank")
        return value


class PageQuery(BaseModel):
    """Paging query parameters."""

    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = None


class ChatReply(BaseModel):
    """The answer of POST /api/chat."""

    success: bool = True
    message: str
    conversation_id: str
    message_id: str
    model: str
    provider: str
    cached: bool
    processing_method: Literal["async", "thread", "cache"]
    processing_time: float
    queue_size: int
    finish_reason: str | None = None


class Conversation(BaseModel):
    """A stored conversation (API.md's conv object)."""

    id: uuid.UUID
    title: str
    model: str | None
    system_prompt: str | None
    created_at: datetime
    updated_at: datetime
    message_count: int = Field(..., ge=0)


class Message(BaseModel):
    """A stored message (API.md's msg object)."""

    id: uuid.UUID
    role: Literal["system", "user", "assistant"]
    content: str
    created_at: datetime
    model: str | None
    cached: bool
    finish_reason: str | None


class ConversationList(BaseModel):
    """The answer of GET /api/conversations."""

    conversations: list[Conversation]
    next_cursor: str | None


class ConversationWithMessages(Conversation):
    """The answer of GET /api/conversations/<id>: the conversation and a page of messages."""

    messages: list[Message]
    next_cursor: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorReply(BaseModel):
    """Every error answer."""

    success: bool = False
    error: ErrorBody
    request_id: str


def validate(model: type[BaseModel], data: Any, **context: Any) -> Any:
    """Validate data against model; raise ValidationFailed listing each field."""
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object",
                               details=[{"field": "body", "message": "expected an object"}])
    try:
        result = model.model_validate(data, context=context)
    except ValidationError as exc:
        details = []
        for err in exc.errors(include_url=False, include_input=False):
            field = ".".join(str(p) for p in err["loc"]) or "body"
            message = err["msg"].removeprefix("Value error, ")
            details.append({"field": field, "message": message})
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        raise ValidationFailed(f"invalid request: {summary}", details=details) from None
    details = [{"field": field, "message": "must not contain NUL characters or lone surrogates"}
               for field in _unstorable_text(result.model_dump(), "")]
    if details:
        raise ValidationFailed(f"invalid request: {details[0]['field']}: {details[0]['message']}",
                               details=details)
    return result


def _unstorable_text(value: Any, path: str) -> list[str]:
    """Name the strings PostgreSQL cannot store (NUL) or UTF-8 cannot encode (lone surrogates)."""
    if isinstance(value, str):
        if "\x00" in value:
            return [path or "body"]
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [path or "body"]
        return []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [bad for key, item in items
            for bad in _unstorable_text(item, f"{path}.{key}" if path else str(key))]
