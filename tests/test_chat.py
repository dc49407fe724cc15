"""POST /api/chat through both providers and both paths, with history and the cache."""
from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench.fake_upstream import FakeUpstream
from conftest import new_client


def chat(client: FlaskClient, **body: Any) -> Any:
    return client.post("/api/chat", json=body)


@pytest.mark.parametrize("provider", ["g4f", "openai"])
@pytest.mark.parametrize("use_async,method", [(True, "async"), (False, "thread")])
def test_chat_answers_through_each_provider_and_path(client: FlaskClient, upstream: FakeUpstream,
                                                     provider: str, use_async: bool, method: str) -> None:
    response = chat(client, message=f"hello via {provider} {method}", provider=provider,
                    use_async=use_async)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["success"] is True
    assert body["message"] == f"Echo: hello via {provider} {method}"
    assert body["provider"] == provider
    assert body["model"] == "gpt-4o-mini"
    assert body["processing_method"] == method
    assert body["cached"] is False
    assert body["processing_time"] > 0
    stored = client.get(f"/api/conversations/{body['conversation_id']}").get_json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["content"] == body["message"]
    assert stored["messages"][1]["id"] == body["message_id"]


def test_camel_case_use_async_alias(client: FlaskClient) -> None:
    body = chat(client, message="camel", useAsync=False).get_json()
    assert body["processing_method"] == "thread"


def test_continuing_a_conversation_sends_its_history(client: FlaskClient, upstream: FakeUpstream) -> None:
    first = chat(client, message="my name is Ada", system_prompt="Be brief.").get_json()
    second = chat(client, message="what is my name?", conversation_id=first["conversation_id"]).get_json()
    assert second["conversation_id"] == first["conversation_id"]
    sent = upstream.stats()["last_request"]["messages"]
    assert sent == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "Echo: my name is Ada"},
        {"role": "user", "content": "what is my name?"},
    ]
    conv = client.get(f"/api/conversations/{first['conversation_id']}").get_json()
    assert conv["message_count"] == 4
    assert conv["title"] == "my name is Ada"
    assert conv["system_prompt"] == "Be brief."


def test_client_held_transcript_is_stored_with_the_reply(client: FlaskClient, upstream: FakeUpstream) -> None:
    transcript = [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "one"},
                  {"role": "assistant", "content": "two"},
                  {"role": "user", "content": "three"}]
    body = chat(client, messages=transcript).get_json()
    assert body["message"] == "Echo: three"
    assert upstream.stats()["last_request"]["messages"] == transcript
    conv = client.get(f"/api/conversations/{body['conversation_id']}").get_json()
    assert [m["content"] for m in conv["messages"]] == ["You are terse.", "one", "two", "three", "Echo: three"]


def test_parameters_reach_the_upstream(client: FlaskClient, upstream: FakeUpstream) -> None:
    body = chat(client, message="alpha beta gamma delta", temperature=0.3, max_tokens=2,
                provider="openai").get_json()
    sent = upstream.stats()["last_request"]
    assert sent["temperature"] == 0.3
    assert sent["max_tokens"] == 2
    assert body["finish_reason"] == "length"
    assert body["message"] == "Echo: alpha"


def test_repeated_question_is_served_from_the_cache(client: FlaskClient, upstream: FakeUpstream) -> None:
    first = chat(client, message="cache me please").get_json()
    before = upstream.stats()["requests"]
    second = chat(client, message="cache me please").get_json()
    assert upstream.stats()["requests"] == before
    assert second["cached"] is True
    assert second["processing_method"] == "cache"
    assert second["message"] == first["message"]
    assert second["conversation_id"] != first["conversation_id"]  # still stored as its own exchange
    stored = client.get(f"/api/conversations/{second['conversation_id']}").get_json()
    assert stored["messages"][1]["cached"] is True


def test_cache_false_skips_the_lookup_but_stores(client: FlaskClient, upstream: FakeUpstream) -> None:
    chat(client, message="fresh please")
    before = upstream.stats()["requests"]
    body = chat(client, message="fresh please", cache=False).get_json()
    assert upstream.stats()["requests"] == before + 1
    assert body["cached"] is False
    assert client.get(f"/api/conversations/{body['conversation_id']}").status_code == 200


def test_cache_key_includes_the_parameters(client: FlaskClient, upstream: FakeUpstream) -> None:
    chat(client, message="same words")
    before = upstream.stats()["requests"]
    body = chat(client, message="same words", temperature=1.5).get_json()
    assert body["cached"] is False
    assert upstream.stats()["requests"] == before + 1


def test_identical_concurrent_misses_make_one_upstream_call(app: Flask, upstream: FakeUpstream) -> None:
    upstream.reset()
    results: list[dict[str, Any]] = []

    def ask() -> None:
        results.append(new_client(app).post("/api/chat", json={"message": "single flight #delay=0.5"}).get_json())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["success"] for r in results)
    assert upstream.stats()["requests"] == 1
    assert sorted(r["cached"] for r in results) == [False] + [True] * 7


def test_clear_cache_makes_the_next_answer_fresh(client: FlaskClient, upstream: FakeUpstream) -> None:
    chat(client, message="clear me")
    cleared = client.post("/api/clear-cache")
    assert cleared.status_code == 200
    assert cleared.get_json() == {"success": True, "cleared": 1}
    before = upstream.stats()["requests"]
    assert chat(client, message="clear me").get_json()["cached"] is False
    assert upstream.stats()["requests"] == before + 1


def test_request_id_is_echoed_or_generated(client: FlaskClient) -> None:
    echoed = client.get("/api/health/live", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    generated = client.get("/api/health/live", headers={"X-Request-ID": "bad id <script>"})
    assert generated.headers["X-Request-ID"] not in ("", "bad id <script>")
    assert float(generated.headers["X-Process-Time"]) >= 0
