"""The caller's stored conversations: create, list, read, rename, delete, and who may see them."""
from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from conftest import new_client

CONV_FIELDS = {"id", "title", "model", "system_prompt", "created_at", "updated_at", "message_count"}
MSG_FIELDS = {"id", "role", "content", "created_at", "model", "cached", "finish_reason"}
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


def when(stamp: str) -> datetime:
    assert ISO_UTC.match(stamp), stamp
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timezone.utc.utcoffset(None)
    return parsed


def assert_conv(conv: dict[str, Any]) -> None:
    assert set(conv) == CONV_FIELDS
    assert str(uuid.UUID(conv["id"])) == conv["id"]
    assert isinstance(conv["title"], str)
    assert isinstance(conv["message_count"], int)
    assert when(conv["updated_at"]) >= when(conv["created_at"])


def assert_msg(msg: dict[str, Any]) -> None:
    assert set(msg) == MSG_FIELDS
    assert str(uuid.UUID(msg["id"])) == msg["id"]
    assert msg["role"] in ("system", "user", "assistant")
    assert isinstance(msg["cached"], bool)
    when(msg["created_at"])


def assert_error(response: TestResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"success", "error", "request_id"}
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body["error"]


def create(client: FlaskClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/conversations", json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def chat(client: FlaskClient, message: str, conversation_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message}
    if conversation_id:
        body["conversation_id"] = conversation_id
    response = client.post("/api/chat", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def listed(client: FlaskClient, query: str = "limit=100") -> list[dict[str, Any]]:
    response = client.get(f"/api/conversations?{query}")
    assert response.status_code == 200
    return response.get_json()["conversations"]


def stored_messages(app: Flask, conversation_id: str) -> int:
    """Count the message rows of a conversation straight from the database."""
    with app.extensions["chat"].store.pool.connection() as conn:
        row = conn.execute("SELECT count(*) AS n FROM messages WHERE conversation_id = %s",
                           (conversation_id,)).fetchone()
    return int(row["n"])


def test_create_with_defaults(client: FlaskClient) -> None:
    response = client.post("/api/conversations", json={})
    assert response.status_code == 201
    assert response.mimetype == "application/json"
    conv = response.get_json()
    assert_conv(conv)
    assert conv["title"] == ""
    assert conv["model"] == "gpt-4o-mini"
    assert conv["system_prompt"] is None
    assert conv["message_count"] == 0
    assert client.get(f"/api/conversations/{conv['id']}").get_json() == {
        **conv, "messages": [], "next_cursor": None}


def test_create_with_title_system_prompt_and_model(client: FlaskClient, upstream: Any) -> None:
    conv = create(client, title="  Trip plans ", system_prompt="Answer in French.", model="gpt-4o")
    assert_conv(conv)
    assert conv["title"] == "Trip plans"
    assert conv["system_prompt"] == "Answer in French."
    assert conv["model"] == "gpt-4o"
    # The stored system prompt and model are used when the conversation continues.
    reply = chat(client, "bonjour", conv["id"])
    assert reply["conversation_id"] == conv["id"]
    assert reply["model"] == "gpt-4o"
    sent = upstream.stats()["last_request"]
    assert sent["model"] == "gpt-4o"
    assert sent["messages"][0] == {"role": "system", "content": "Answer in French."}
    after = client.get(f"/api/conversations/{conv['id']}").get_json()
    assert after["title"] == "Trip plans"  # an explicit title is kept
    assert after["message_count"] == 2


def test_a_new_conversation_is_titled_by_its_first_user_message(client: FlaskClient) -> None:
    short = chat(client, "What is the capital of France?")
    conv = client.get(f"/api/conversations/{short['conversation_id']}").get_json()
    assert conv["title"] == "What is the capital of France?"

    long_message = "".join(f"word{i} " for i in range(40)).strip()
    assert len(long_message) > 80
    reply = chat(client, long_message)
    conv = client.get(f"/api/conversations/{reply['conversation_id']}").get_json()
    assert conv["title"] == long_message[:80]

    transcript = client.post("/api/chat", json={"messages": [
        {"role": "system", "content": "be kind"}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer"}, {"role": "user", "content": "second question"}]})
    conv = client.get(f"/api/conversations/{transcript.get_json()['conversation_id']}").get_json()
    assert conv["title"] == "first question"

    untitled = create(client)
    chat(client, "fills the empty title", untitled["id"])
    assert client.get(f"/api/conversations/{untitled['id']}").get_json()["title"] == "fills the empty title"


def test_list_is_newest_activity_first_with_cursor_paging(app: Flask) -> None:
    client = new_client(app)
    ids = [create(client, title=f"conv {i}")["id"] for i in range(5)]
    everything = listed(client)
    assert [c["id"] for c in everything] == ids[::-1]
    for conv in everything:
        assert_conv(conv)

    pages: list[list[str]] = []
    cursor = None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(f"/api/conversations?{query}")
        assert response.status_code == 200
        body = response.get_json()
        assert set(body) == {"conversations", "next_cursor"}
        pages.append([c["id"] for c in body["conversations"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10
    assert [len(p) for p in pages] == [2, 2, 1]
    flat = [cid for page in pages for cid in page]
    assert flat == ids[::-1]
    assert len(set(flat)) == 5

    # Activity moves a conversation to the front; renaming counts as activity too.
    chat(client, "wake up", ids[0])
    assert [c["id"] for c in listed(client)][0] == ids[0]
    client.patch(f"/api/conversations/{ids[2]}", json={"title": "renamed"})
    assert [c["id"] for c in listed(client)][:2] == [ids[2], ids[0]]


def test_exact_page_size_ends_with_a_null_cursor(client: FlaskClient) -> None:
    for i in range(2):
        create(client, title=f"c{i}")
    body = client.get("/api/conversations?limit=2").get_json()
    assert len(body["conversations"]) == 2
    assert body["next_cursor"] is None


def test_list_of_a_new_caller_is_empty(client: FlaskClient) -> None:
    assert client.get("/api/conversations").get_json() == {"conversations": [], "next_cursor": None}


@pytest.mark.parametrize("query", ["cursor=garbage!!", "cursor=bm90IGpzb24", "cursor=WyJhIl0",
                                   "limit=0", "limit=101", "limit=ten"],
                         ids=["not base64", "not json", "wrong arity", "limit 0", "limit 101", "limit text"])
def test_bad_list_query_is_422(client: FlaskClient, query: str) -> None:
    error = assert_error(client.get(f"/api/conversations?{query}"), 422, "validation_error")
    assert {d["field"] for d in error["details"]} & {"cursor", "limit"}


def test_cursor_with_a_bad_timestamp_is_422(client: FlaskClient) -> None:
    import base64
    import json
    forged = base64.urlsafe_b64encode(json.dumps(["not a time", str(uuid.uuid4())]).encode()).decode()
    assert_error(client.get(f"/api/conversations?cursor={forged}"), 422, "validation_error")
    forged = base64.urlsafe_b64encode(json.dumps(["2024-01-01T00:00:00+00:00", "not-a-uuid"]).encode())
    assert_error(client.get(f"/api/conversations?cursor={forged.decode()}"), 422, "validation_error")


def test_get_returns_messages_oldest_first_with_paging(client: FlaskClient) -> None:
    conv_id = chat(client, "one")["conversation_id"]
    chat(client, "two", conv_id)
    chat(client, "three", conv_id)
    body = client.get(f"/api/conversations/{conv_id}").get_json()
    assert set(body) == CONV_FIELDS | {"messages", "next_cursor"}
    assert body["message_count"] == 6
    assert body["next_cursor"] is None
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "one"), ("assistant", "Echo: one"), ("user", "two"), ("assistant", "Echo: two"),
        ("user", "three"), ("assistant", "Echo: three")]
    for msg in body["messages"]:
        assert_msg(msg)
    stamps = [when(m["created_at"]) for m in body["messages"]]
    assert stamps == sorted(stamps)
    user_msg, reply = body["messages"][0], body["messages"][1]
    assert user_msg["model"] is None and user_msg["finish_reason"] is None and user_msg["cached"] is False
    assert reply["model"] == "gpt-4o-mini" and reply["finish_reason"] == "stop"

    pages, cursor = [], None
    while True:
        query = "limit=4" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/api/conversations/{conv_id}?{query}").get_json()
        assert page["id"] == conv_id and page["message_count"] == 6
        pages.append(page["messages"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [4, 2]
    assert [m for p in pages for m in p] == body["messages"]


@pytest.mark.parametrize("query", ["cursor=garbage!!", "cursor=WyJhYmMiXQ", "cursor=WzEsIDJd",
                                   "limit=0", "limit=abc"],
                         ids=["not base64", "seq not a number", "wrong arity", "limit 0", "limit text"])
def test_bad_message_page_query_is_422(client: FlaskClient, query: str) -> None:
    conv_id = create(client)["id"]
    assert_error(client.get(f"/api/conversations/{conv_id}?{query}"), 422, "validation_error")


def test_rename(client: FlaskClient) -> None:
    conv = create(client, title="old")
    response = client.patch(f"/api/conversations/{conv['id']}", json={"title": "  New   name "})
    assert response.status_code == 200
    renamed = response.get_json()
    assert_conv(renamed)
    assert renamed["title"] == "New name"
    assert renamed["id"] == conv["id"] and renamed["created_at"] == conv["created_at"]
    assert when(renamed["updated_at"]) >= when(conv["updated_at"])
    assert client.get(f"/api/conversations/{conv['id']}").get_json()["title"] == "New name"


@pytest.mark.parametrize("body", [{"title": ""}, {"title": "   \n\t"}, {}, {"title": None},
                                  {"title": "x" * 201}],
                         ids=["empty", "blank", "missing", "null", "too long"])
def test_rename_with_a_bad_title_is_422_and_changes_nothing(client: FlaskClient, body: dict[str, Any]) -> None:
    conv = create(client, title="keep me")
    error = assert_error(client.patch(f"/api/conversations/{conv['id']}", json=body), 422,
                         "validation_error")
    assert "title" in {d["field"] for d in error["details"]}
    assert client.get(f"/api/conversations/{conv['id']}").get_json()["title"] == "keep me"


def test_delete_removes_the_conversation_and_its_messages(app: Flask) -> None:
    client = new_client(app)
    conv_id = chat(client, "soon gone")["conversation_id"]
    chat(client, "still here", conv_id)
    kept = chat(client, "I stay")["conversation_id"]
    assert stored_messages(app, conv_id) == 4

    response = client.delete(f"/api/conversations/{conv_id}")
    assert response.status_code == 204
    assert response.get_data() == b""

    assert stored_messages(app, conv_id) == 0
    assert_error(client.get(f"/api/conversations/{conv_id}"), 404, "conversation_not_found")
    assert_error(client.delete(f"/api/conversations/{conv_id}"), 404, "conversation_not_found")
    assert_error(client.patch(f"/api/conversations/{conv_id}", json={"title": "x"}), 404,
                 "conversation_not_found")
    assert_error(client.post("/api/chat", json={"message": "hello?", "conversation_id": conv_id}), 404,
                 "conversation_not_found")
    assert stored_messages(app, conv_id) == 0
    assert [c["id"] for c in listed(client)] == [kept]


def _attempts(conv_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [("GET", f"/api/conversations/{conv_id}", None),
            ("PATCH", f"/api/conversations/{conv_id}", {"title": "hijacked"}),
            ("DELETE", f"/api/conversations/{conv_id}", None),
            ("POST", "/api/chat", {"message": "continue", "conversation_id": conv_id})]


def test_another_callers_conversation_answers_like_a_missing_one(app: Flask) -> None:
    owner, other = new_client(app), new_client(app)
    conv_id = chat(owner, "mine alone")["conversation_id"]
    missing_id = str(uuid.uuid4())
    for (method, path, body), (_, missing_path, missing_body) in zip(_attempts(conv_id), _attempts(missing_id)):
        theirs = other.open(path, method=method, json=body)
        missing = other.open(missing_path, method=method, json=missing_body)
        assert theirs.status_code == missing.status_code == 404, (method, path)
        error, missing_error = theirs.get_json()["error"], missing.get_json()["error"]
        assert error["code"] == missing_error["code"] == "conversation_not_found"
        assert error["message"].replace(conv_id, "ID") == missing_error["message"].replace(missing_id, "ID")
        assert set(theirs.get_json()) == set(missing.get_json())
    assert listed(other) == []
    conv = owner.get(f"/api/conversations/{conv_id}").get_json()
    assert conv["title"] == "mine alone"
    assert conv["message_count"] == 2
    assert stored_messages(app, conv_id) == 2


def test_anonymous_callers_share_one_owner_and_client_ids_separate(app: Flask) -> None:
    anonymous_a, anonymous_b = app.test_client(), app.test_client()
    conv_id = create(anonymous_a, title="shared")["id"]
    assert anonymous_b.get(f"/api/conversations/{conv_id}").status_code == 200
    assert new_client(app).get(f"/api/conversations/{conv_id}").status_code == 404
    named = new_client(app, "client-0123456789")
    mine = create(named)["id"]
    assert new_client(app, "client-0123456789").get(f"/api/conversations/{mine}").status_code == 200
    assert anonymous_a.get(f"/api/conversations/{mine}").status_code == 404


@pytest.mark.parametrize("conv_id", ["not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g"])
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_malformed_id_is_404(client: FlaskClient, conv_id: str, method: str) -> None:
    response = client.open(f"/api/conversations/{conv_id}", method=method, json={"title": "t"})
    assert_error(response, 404, "conversation_not_found")


def test_model_of_a_new_conversation_must_be_known(client: FlaskClient) -> None:
    error = assert_error(client.post("/api/conversations", json={"model": "no-such-model"}), 422,
                         "validation_error")
    assert error["details"][0]["field"] == "model"
    assert listed(client) == []
