"""POST /api/chat: one chat turn, answered as JSON or as server-sent events."""
from __future__ import annotations

import itertools
import json
from collections.abc import Generator, Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, stream_with_context

from ..auth import owner
from ..errors import ChatError
from ..schemas import ChatBody
from .common import body_as, services

bp = Blueprint("chat", __name__)


@bp.post("/api/chat")
def chat() -> Response:
    """Answer one chat turn."""
    svc = services()
    settings = svc.settings
    body: ChatBody = body_as(ChatBody, max_message_chars=settings.max_message_chars,
                             max_messages=settings.max_messages)
    exchange = svc.chat.prepare(
        owner(), message=body.message,
        messages=[t.model_dump() for t in body.messages] if body.messages is not None else None,
        conversation_id=str(body.conversation_id) if body.conversation_id else None,
        system_prompt=body.system_prompt, model=body.model, provider=body.provider,
        temperature=body.temperature, max_tokens=body.max_tokens, use_async=body.use_async,
        use_cache=body.cache)
    if body.stream:
        events = svc.chat.stream(exchange, heartbeat=settings.stream_heartbeat)
        head = open_stream(events)  # load shedding and early failures answer plain HTTP errors
        return sse_response(_chat_events(head, events))
    answer = svc.chat.answer(exchange)
    g.processing_method = answer.processing_method
    return jsonify({
        "success": True, "message": answer.text, "conversation_id": answer.conversation_id,
        "message_id": answer.message_id, "model": answer.model, "provider": answer.provider,
        "cached": answer.cached, "processing_method": answer.processing_method,
        "processing_time": answer.processing_time, "queue_size": answer.queue_size,
        "finish_reason": answer.finish_reason,
    })


def open_stream(events: Generator[dict[str, Any], None, None]) -> list[dict[str, Any]]:
    """Pull the start event and the one after it (a piece, a heartbeat or done).

    A provider that fails before its first piece (or load shedding) then raises here,
    in the view, and answers a plain JSON error with its status instead of a 200 stream.
    """
    head = [next(events)]
    try:
        head.append(next(events))
    except StopIteration:
        pass
    return head


def _chat_events(head: list[dict[str, Any]],
                 events: Generator[dict[str, Any], None, None]) -> Iterator[str]:
    try:
        for event in itertools.chain(head, events):
            if event.get("heartbeat"):
                yield ": keep-alive\n\n"
            else:
                if event.get("done"):
                    g.processing_method = event.get("processing_method")  # for the access log
                yield sse(event)
    except ChatError as exc:
        yield sse({"code": exc.code, "message": exc.message}, event="error")
    finally:
        events.close()


def sse(data: Any, *, event: str | None = None) -> str:
    """Format one server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_response(chunks: Iterator[str]) -> Response:
    """Stream chunks as text/event-stream that proxies do not buffer."""
    response = Response(stream_with_context(chunks), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response
