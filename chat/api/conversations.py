"""The caller's stored conversations: list, create, read, rename, delete."""
from __future__ import annotations

import uuid

from flask import Blueprint, Response, jsonify, request

from ..auth import owner
from ..errors import ConversationNotFound
from ..schemas import ConversationCreate, ConversationRename, PageQuery, validate
from .common import body_as, query_as, services

bp = Blueprint("conversations", __name__, url_prefix="/api/conversations")


def _conversation_id(value: str) -> str:
    # A malformed id is as unknown as a missing one: never tell callers more than 404.
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ConversationNotFound(f"conversation {value} not found") from None


@bp.get("")
def list_conversations() -> Response:
    """List the caller's conversations, newest activity first."""
    page: PageQuery = query_as(PageQuery)
    items, cursor = services().store.list_conversations(owner(), limit=page.limit,
                                                        cursor=page.cursor)
    return jsonify({"conversations": items, "next_cursor": cursor})


@bp.post("")
def create_conversation() -> tuple[Response, int]:
    """Create an empty conversation."""
    body: ConversationCreate = body_as(ConversationCreate)
    svc = services()
    if body.model is not None:
        svc.providers.check_choice(svc.settings.llm_provider, body.model)
    conv = svc.store.create_conversation(owner(), title=body.title.strip(),
                                         model=body.model or svc.settings.llm_model,
                                         system_prompt=body.system_prompt)
    return jsonify(conv), 201


@bp.get("/<conversation_id>")
def get_conversation(conversation_id: str) -> Response:
    """Return one conversation with a page of its messages, oldest first."""
    args = request.args.to_dict()
    args.setdefault("limit", "100")

    page: PageQuery = validate(PageQuery, args)
    conv, messages, cursor = services().store.get_messages(
        owner(), _conversation_id(conversation_id), limit=page.limit, cursor=page.cursor)
    return jsonify({**conv, "messages": messages, "next_cursor": cursor})


@bp.patch("/<conversation_id>")
def rename_conversation(conversation_id: str) -> Response:
    """Rename a conversation."""
    cid = _conversation_id(conversation_id)
    body: ConversationRename = body_as(ConversationRename)
    return jsonify(services().store.rename(owner(), cid, body.title))


@bp.delete("/<conversation_id>")
def delete_conversation(conversation_id: str) -> tuple[str, int]:
    """Delete a conversation and its messages."""
    services().store.delete(owner(), _conversation_id(conversation_id))
    return "", 204
