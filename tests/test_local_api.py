"""The `local` provider through the HTTP API (Flask test client, real SmolLM2-135M model).

Covers /api/chat (plain and streamed), /v1/chat/completions (plain and streamed), /v1/models,
the request deadline (504, slot and pool thread freed), the local queue bound (503), a client
leaving mid-stream (partial reply stored as cancelled), metrics, and the server without the
optional extra (422 and /api/health explain why; LLM_PROVIDER=local refuses to start).
"""
from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from chat.providers.base import ChatRequest
from chat.providers.local import available
from chat.settings import SettingsError
from conftest import app_builder, new_client
from servers import wait_until

AVAILABLE, REASON = available()


def needs_model(test: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a test that runs the real model: `./start.sh test` installs it, so it must be there."""
    return test

MODEL = "smollm2-135m"
SHORT = "Say hello in one word."  # greedy answer ends by itself after a few tokens
LONG = "Write a long essay about the history of the sea."  # runs to any max_tokens


def unique(prompt: str) -> str:
    """Return the prompt with a tag, so the response cache never answers it."""
    return f"{prompt} (#{uuid.uuid4().hex[:6]})"




def sse_events(body: bytes | str) -> list[tuple[str | None, Any]]:
    """Parse a server-sent events body into (event name, data) pairs."""
    text = body.decode() if isinstance(body, bytes) else body
    events = []
    for block in text.split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        if data is not None:
            events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


def stored_messages(client: FlaskClient, conversation_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/conversations/{conversation_id}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["messages"]


@pytest.fixture(scope="module")
def build(database_url: str, upstream: Any) -> Iterator[Callable[..., Flask]]:
    """Build apps shared by the module (each app loads its own model on first use)."""
    with app_builder(database_url, upstream.url) as factory:
        yield factory


@pytest.fixture(scope="module")
def local_app(build: Callable[..., Flask]) -> Flask:
    """LLM_PROVIDER=local: the local model answers by default."""
    assert AVAILABLE, REASON
    return build(llm_provider="local")


@pytest.fixture(scope="module")
def g4f_app(build: Callable[..., Flask]) -> Flask:
    """The default g4f provider (the fake upstream); local chosen per request."""
    return build()


def local_provider(app: Flask) -> Any:
    return app.extensions["chat"].providers.get("local")


# -- answers from the real model ---------------------------------------------------------


@needs_model
@pytest.mark.parametrize("use_async", [True, False])
def test_default_local_answers_on_the_thread_path(local_app: Flask, use_async: bool) -> None:
    client = new_client(local_app)
    response = client.post("/api/chat", json={"message": unique(SHORT), "use_async": use_async,
                                              "max_tokens": 48, "temperature": 0})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["message"].strip()
    assert (body["provider"], body["model"]) == ("local", MODEL)
    # The provider is sync-only: the thread pool serves it even when async was asked for.
    assert body["processing_method"] == "thread"
    assert body["cached"] is False
    *_, reply = stored_messages(client, body["conversation_id"])
    assert reply["content"] == body["message"]
    assert reply["model"] == MODEL and reply["finish_reason"] == body["finish_reason"]


@needs_model
def test_provider_local_per_request_with_g4f_default(g4f_app: Flask) -> None:
    client = new_client(g4f_app)
    response = client.post("/api/chat", json={"message": unique(SHORT), "provider": "local",
                                              "max_tokens": 48, "temperature": 0})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["provider"], body["model"], body["processing_method"]) == ("local", MODEL, "thread")
    assert body["message"].strip() and not body["message"].startswith("Echo:")
    # The default provider still answers requests that do not ask for local.
    echo = client.post("/api/chat", json={"message": "plain"}).get_json()
    assert echo["provider"] == "g4f" and echo["message"].startswith("Echo:")


@needs_model
def test_streamed_chat_arrives_token_by_token_and_is_stored(g4f_app: Flask) -> None:
    client = new_client(g4f_app)
    response = client.post("/api/chat", json={"message": unique(LONG), "provider": "local",
                                              "stream": True, "max_tokens": 24, "temperature": 0})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(response.get_data())
    assert all(name is None for name, _ in events), events
    start, *middle, done = [data for _, data in events]
    assert (start["provider"], start["model"]) == ("local", MODEL)
    deltas = [e["delta"] for e in middle if "delta" in e]
    assert len(deltas) >= 15  # one event per token (a multi-byte character may join two)
    assert done["done"] is True and done["finish_reason"] == "length"
    assert done["processing_method"] == "thread"
    *_, reply = stored_messages(client, start["conversation_id"])
    assert reply["content"] == "".join(deltas)
    assert reply["finish_reason"] == "length"


@needs_model
def test_openai_completion_reports_the_models_own_token_counts(g4f_app: Flask) -> None:
    client = new_client(g4f_app)
    prompt = unique(SHORT)
    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 48, "temperature": 0})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert response.headers["X-Processing-Method"] == "thread"
    text = body["choices"][0]["message"]["content"]
    assert text.strip()
    # The same greedy request straight to the provider: the API passes its counts through,
    # not the len/4 estimate it uses for providers without usage.
    # (Greedy decoding can still differ between two model instances, so the texts are not
    # compared; the prompt's token count is the tokenizer's and must match exactly.)
    direct = local_provider(g4f_app).complete(ChatRequest(
        messages=({"role": "user", "content": prompt},), model=MODEL, temperature=0.0, max_tokens=48))
    usage = body["usage"]
    assert usage["prompt_tokens"] == direct.prompt_tokens
    assert 1 <= usage["completion_tokens"] <= 48
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > len(prompt) // 4  # the chat template's tokens are counted
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


@needs_model
def test_openai_stream_and_max_tokens_give_length(g4f_app: Flask) -> None:
    client = new_client(g4f_app)
    plain = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": unique(LONG)}],
        "max_tokens": 5, "temperature": 0}).get_json()
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 5
    assert plain["choices"][0]["message"]["content"].strip()

    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": unique(LONG)}],
        "max_tokens": 5, "temperature": 0, "stream": True})
    assert response.status_code == 200
    events = [data for _, data in sse_events(response.get_data())]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert 1 <= len(pieces) <= 5 and "".join(pieces).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # max_tokens=5 on /api/chat too.
    chat = client.post("/api/chat", json={"message": unique(LONG), "provider": "local",
                                          "max_tokens": 5, "temperature": 0}).get_json()
    assert chat["finish_reason"] == "length" and chat["message"].strip()


@needs_model
def test_temperature_and_max_tokens_reach_llama_cpp(g4f_app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = local_provider(g4f_app)
    seen: list[dict[str, Any]] = []
    original = provider._params

    def spy(request: ChatRequest, run: Any) -> dict[str, Any]:
        params = original(request, run)
        seen.append({k: params[k] for k in ("temperature", "max_tokens", "messages")})
        return params

    monkeypatch.setattr(provider, "_params", spy)
    client = new_client(g4f_app)
    prompt = unique(LONG)
    first = client.post("/api/chat", json={"message": prompt, "provider": "local", "temperature": 1.3,
                                           "max_tokens": 12, "system_prompt": "Be brief."})
    second = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
        "max_tokens": 7})
    assert first.status_code == second.status_code == 200
    assert [(s["temperature"], s["max_tokens"]) for s in seen] == [(1.3, 12), (0.0, 7)]
    # The transcript goes to create_chat_completion, which applies the model's chat template.
    assert seen[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": prompt}]
    # Greedy decoding is repeatable (cache off, so the model really runs twice).
    again = [client.post("/api/chat", json={"message": prompt, "provider": "local", "temperature": 0,
                                            "max_tokens": 10, "cache": False}).get_json()
             for _ in range(2)]
    assert again[0]["message"] == again[1]["message"] and not again[1]["cached"]


@needs_model
def test_models_list_and_health_show_local(g4f_app: Flask) -> None:
    client = new_client(g4f_app)
    models = client.get("/v1/models").get_json()["data"]
    assert {"id": MODEL, "owned_by": "local"}.items() <= next(m for m in models if m["id"] == MODEL).items()
    health = client.get("/api/health").get_json()["components"]["provider"]
    local = health["configured"]["local"]
    assert local["available"] is True and local["model_path"].endswith(".gguf")
    assert "local" not in health["unavailable"]


@needs_model
def test_metrics_show_local_tokens_per_second(g4f_app: Flask) -> None:
    client = new_client(g4f_app)

    def prometheus() -> dict[str, float]:
        text = client.get("/metrics").get_data(as_text=True)
        return {name: float(value) for name, value in
                re.findall(r"^(chat_local_tokens_total|chat_local_tokens_per_second) (\S+)$", text, re.M)}

    before = prometheus()
    body = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": unique(LONG)}],
        "max_tokens": 16, "temperature": 0}).get_json()
    after = prometheus()
    assert after["chat_local_tokens_total"] - before.get("chat_local_tokens_total", 0) \
        >= body["usage"]["completion_tokens"] == 16
    assert after["chat_local_tokens_per_second"] > 0
    summary = client.get("/api/metrics").get_json()
    assert summary["local"]["tokens"] >= 16
    assert summary["local"]["tokens_per_second"] > 0
    # The gauge is the provider's last generation, as /api/health reports it.
    assert after["chat_local_tokens_per_second"] == pytest.approx(
        local_provider(g4f_app).last_tokens_per_second)


# -- deadline, queue bound, client leaving ------------------------------------------------


@needs_model
def test_deadline_shorter_than_the_generation_gives_504_and_frees_the_thread(
        build: Callable[..., Flask]) -> None:
    app = build(llm_provider="local", request_timeout=2.0)
    client = new_client(app)
    svc = app.extensions["chat"]
    provider = local_provider(app)
    # Load the model first, so the deadline below cuts a generation rather than a load.
    assert client.post("/api/chat", json={"message": unique(SHORT), "max_tokens": 4}).status_code == 200
    began = time.monotonic()
    response = client.post("/api/chat", json={"message": unique(LONG), "max_tokens": 400, "temperature": 0})
    took = time.monotonic() - began
    assert response.status_code == 504, response.get_json()
    assert response.get_json()["error"]["code"] == "upstream_timeout"
    assert took < 2.0 + 1.5  # 400 tokens take 8 s or more here
    # The generation stops at its next token: the slot and the pool thread are free again.
    assert wait_until(lambda: provider.check()["active"] == 0
                      and svc.dispatcher.status()["thread_pool"]["busy"] == 0, timeout=1.0)
    after = client.post("/api/chat", json={"message": unique(SHORT), "max_tokens": 8})
    assert after.status_code == 200 and after.get_json()["message"].strip()

    # Streamed: the deltas sent so far, then an error event; the partial reply is stored.
    response = client.post("/api/chat", json={"message": unique(LONG), "max_tokens": 400,
                                              "temperature": 0, "stream": True})
    events = sse_events(response.get_data())
    assert events[-1][0] == "error" and events[-1][1]["code"] == "upstream_timeout", events[-3:]
    deltas = [data["delta"] for _, data in events if "delta" in data]
    assert deltas
    *_, reply = stored_messages(client, events[0][1]["conversation_id"])
    assert reply["finish_reason"] == "error" and reply["content"] == "".join(deltas)
    assert wait_until(lambda: provider.check()["active"] == 0, timeout=1.0)


@needs_model
def test_queue_bound_sheds_and_a_client_leaving_cancels(build: Callable[..., Flask]) -> None:
    # One thread: two llama.cpp threads spinning on a busy 2-core machine crawl (bench/local_bench.py).
    app = build(llm_provider="local", local_max_concurrent=1, local_max_queue=0, local_threads=1)
    provider = local_provider(app)
    assert provider.check()["queued"] == 0 and provider.max_concurrent == 1
    client = new_client(app)
    held = client.post("/api/chat", json={"message": unique(LONG), "max_tokens": 1000, "stream": True},
                       buffered=False)
    chunks = iter(held.response)
    received = ""
    while received.count('"delta"') < 3:
        chunk = next(chunks)
        received += chunk.decode() if isinstance(chunk, bytes) else chunk
    conversation_id = json.loads(received.split("\n")[0][6:])["conversation_id"]
    assert provider.check()["active"] == 1
    # The only slot is busy and the queue holds nobody: refused at once.
    began = time.monotonic()
    refused = new_client(app).post("/api/chat", json={"message": unique(SHORT)})
    assert refused.status_code == 503, refused.get_json()
    assert refused.get_json()["error"]["code"] == "overloaded" and refused.headers["Retry-After"]
    assert time.monotonic() - began < 1.0
    # The client goes away: generation stops between tokens, the partial reply is kept.
    closed = time.monotonic()
    held.close()
    assert wait_until(lambda: provider.check()["active"] == 0, timeout=2.0)
    cancel_latency = time.monotonic() - closed
    print(f"\nlocal generation stopped {cancel_latency * 1000:.0f} ms after the client left")
    *_, reply = stored_messages(client, conversation_id)
    sent = "".join(data["delta"] for _, data in sse_events(received) if "delta" in data)
    assert reply["finish_reason"] == "cancelled"
    assert reply["content"].startswith(sent) and len(reply["content"]) < 4000
    after = new_client(app).post("/api/chat", json={"message": unique(SHORT), "max_tokens": 4})
    assert after.status_code == 200


# -- without the optional extra -----------------------------------------------------------


def test_missing_model_file_answers_422_and_health_says_why(build: Callable[..., Flask]) -> None:
    app = build(local_model_path="/nonexistent.gguf")
    client = new_client(app)
    response = client.post("/api/chat", json={"message": "hi", "provider": "local"})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert "local" in error["message"] and "unavailable" in error["message"]
    assert "/nonexistent.gguf" in error["message"] and "LOCAL_MODEL_PATH" in error["message"]
    assert error["details"][0]["field"] == "provider"
    health = client.get("/api/health")
    assert health.status_code == 200
    provider = health.get_json()["components"]["provider"]
    assert "local" not in provider["configured"]
    assert "model file not found: /nonexistent.gguf" in provider["unavailable"]["local"]
    assert MODEL not in [m["id"] for m in client.get("/v1/models").get_json()["data"]]
    # The rest of the server works.
    assert client.post("/api/chat", json={"message": "hi"}).status_code == 200


def test_without_llama_cpp_the_server_starts_and_explains(
        build: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    app = build()
    client = new_client(app)
    reason = client.get("/api/health").get_json()["components"]["provider"]["unavailable"]["local"]
    assert "llama-cpp-python is not installed" in reason and "requirements-local.txt" in reason
    response = client.post("/api/chat", json={"message": "hi", "provider": "local", "stream": True})
    assert response.status_code == 422
    assert "requirements-local.txt" in response.get_json()["error"]["message"]


def test_llm_provider_local_without_the_model_refuses_to_start(build: Callable[..., Flask]) -> None:
    with pytest.raises(SettingsError) as raised:
        build(llm_provider="local", local_model_path="/nonexistent.gguf")
    message = str(raised.value)
    assert "LLM_PROVIDER='local'" in message and "LOCAL_MODEL_PATH" in message
    assert "/nonexistent.gguf" in message
    with pytest.raises(SettingsError, match="LOCAL_MAX_CONCURRENT"):
        build(llm_provider="local", local_max_concurrent=0)
