"""The local provider against the real SmolLM2-135M model (requirements-local.txt)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chat.errors import Overloaded
from chat.providers.base import ChatRequest
from chat.providers.local import LocalOverloadedError, LocalProvider, _FairSlots, available

AVAILABLE, REASON = available()


def test_the_model_is_installed() -> None:
    """`./start.sh test` installs requirements-local.txt: the real model must be here."""
    assert AVAILABLE, REASON

# Prompts whose greedy answers are known: one runs to any length, one ends by itself.
LONG = "Write a long essay about the history of the sea."
SHORT = "Say hello in one word."


def ask(prompt: str, max_tokens: int | None = 24, temperature: float = 0.0) -> ChatRequest:
    """Build a one-turn request."""
    return ChatRequest(messages=({"role": "user", "content": prompt},), model="smollm2-135m",
                       temperature=temperature, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    """Share one provider (the defaults: two slots, one thread each) across the module."""
    local = LocalProvider()
    assert local.threads_per_model == 1
    yield local
    local.close()


def test_available_here() -> None:
    ok, reason = available()
    assert ok, reason
    assert reason.endswith(".gguf")


def test_check_does_not_generate() -> None:
    local = LocalProvider()
    status = local.check()
    assert status["available"] is True
    assert status["model_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (status["loaded"], status["active"], status["queued"]) == (False, 0, 0)
    assert status["tokens_per_second"] is None
    assert local.models() == ["smollm2-135m"]
    assert (local.name, local.supports_async, local.blocking) == ("local", False, True)


def test_complete_answers_with_usage(provider: LocalProvider) -> None:
    completion = provider.complete(ask(SHORT, max_tokens=64))
    assert completion.text.strip()
    assert completion.model == "smollm2-135m"
    assert completion.finish_reason == "stop"
    assert completion.prompt_tokens and completion.prompt_tokens > 10  # the chat template is applied
    assert completion.completion_tokens is not None and 0 < completion.completion_tokens < 64
    assert provider.last_tokens_per_second and provider.last_tokens_per_second > 0
    assert provider.check()["tokens_per_second"] > 0
    assert provider.check()["loaded"] is True


def test_stream_arrives_token_by_token(provider: LocalProvider) -> None:
    arrivals: list[float] = []
    pieces = []
    for piece in provider.stream(ask(LONG, max_tokens=20)):
        arrivals.append(time.monotonic())
        pieces.append(piece)
    *body, last = pieces
    text = "".join(p.text for p in body)
    assert text.strip()
    assert all(p.finish_reason is None and p.text for p in body)
    assert last.finish_reason == "length"
    assert last.extra["completion_tokens"] == 20
    assert last.extra["prompt_tokens"] > 10
    # One piece per token (a multi-byte character may join two), each a separate arrival.
    assert len(body) >= 18
    assert arrivals[len(body) - 1] - arrivals[0] > 0.01


@pytest.mark.parametrize("prompt, max_tokens", [(SHORT, 64), (LONG, 10)])
def test_usage_matches_llama_cpp(provider: LocalProvider, prompt: str, max_tokens: int) -> None:
    from llama_cpp import Llama

    reference = Llama(model_path=provider.check()["model_path"], n_threads=1, verbose=False)
    try:
        direct = reference.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                                  temperature=0.0, max_tokens=max_tokens)
    finally:
        reference.close()
    completion = provider.complete(ask(prompt, max_tokens=max_tokens))
    pieces = list(provider.stream(ask(prompt, max_tokens=max_tokens)))
    # Greedy decoding: the same text and the same counts by every path.
    assert completion.text == "".join(p.text for p in pieces) == direct["choices"][0]["message"]["content"]
    assert completion.finish_reason == pieces[-1].finish_reason == direct["choices"][0]["finish_reason"]
    usage = {"prompt_tokens": direct["usage"]["prompt_tokens"],
             "completion_tokens": direct["usage"]["completion_tokens"]}
    assert pieces[-1].extra == usage
    assert (completion.prompt_tokens, completion.completion_tokens) == tuple(usage.values())


def test_max_tokens_gives_length(provider: LocalProvider) -> None:
    completion = provider.complete(ask(LONG, max_tokens=5))
    assert completion.finish_reason == "length"
    assert completion.completion_tokens is not None and 1 <= completion.completion_tokens <= 5
    pieces = list(provider.stream(ask(LONG, max_tokens=5)))
    assert pieces[-1].finish_reason == "length"
    assert len(pieces) - 1 <= 5


def test_deadline_raises_quickly_and_frees_the_slot(provider: LocalProvider) -> None:
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        provider.complete(ask(LONG, max_tokens=512), deadline=began + 0.3)
    # Stopped at the next token, not after 512 of them (several seconds).
    assert time.monotonic() - began < 1.5
    assert provider.check()["active"] == 0
    assert provider.complete(ask(SHORT, max_tokens=8)).text


def test_deadline_already_passed_raises_at_once(provider: LocalProvider) -> None:
    with pytest.raises(TimeoutError):
        provider.complete(ask(SHORT), deadline=time.monotonic() - 1)
    with pytest.raises(TimeoutError):
        next(provider.stream(ask(SHORT), deadline=time.monotonic() - 1))


def test_cancel_mid_stream_stops_it(provider: LocalProvider) -> None:
    cancel = threading.Event()
    pieces = []
    for piece in provider.stream(ask(LONG, max_tokens=400), cancel=cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert len(pieces) == 4  # three tokens, then the closing piece
    assert pieces[-1].finish_reason == "cancelled"
    assert pieces[-1].extra["completion_tokens"] <= 4
    assert provider.check()["active"] == 0


def test_cancel_complete_returns_what_was_generated(provider: LocalProvider) -> None:
    cancel = threading.Event()
    timer = threading.Timer(0.4, cancel.set)
    timer.start()
    began = time.monotonic()
    completion = provider.complete(ask(LONG, max_tokens=512), cancel=cancel)
    timer.cancel()
    assert completion.finish_reason == "cancelled"
    assert completion.completion_tokens is not None and completion.completion_tokens < 512
    assert time.monotonic() - began < 2.0
    cancel.set()
    assert provider.complete(ask(SHORT), cancel=cancel).finish_reason == "cancelled"


def test_four_threads_two_slots(provider: LocalProvider) -> None:
    spans: list[tuple[float, float]] = []
    finishes: list[str | None] = []
    errors: list[BaseException] = []
    peak = {"active": 0, "queued": 0}
    done = threading.Event()

    def generate() -> None:
        try:
            arrivals, pieces = [], []
            for piece in provider.stream(ask(LONG, max_tokens=24)):
                arrivals.append(time.monotonic())
                pieces.append(piece)
            spans.append((arrivals[0], arrivals[-1]))
            finishes.append(pieces[-1].finish_reason)
        except Exception as exc:  # noqa: BLE001 - reported below, not lost in the thread
            errors.append(exc)

    def watch() -> None:
        while not done.is_set():
            status = provider.check()
            peak["active"] = max(peak["active"], status["active"])
            peak["queued"] = max(peak["queued"], status["queued"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=generate) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    done.set()
    watcher.join()
    assert not errors
    assert finishes == ["length"] * 4
    assert peak["active"] == 2  # both slots were used, never more
    assert peak["queued"] >= 1  # the others waited their turn
    # Seen from outside: at no instant were more than two streams producing tokens.
    for began, _ in spans:
        assert sum(1 for b, e in spans if b <= began <= e) <= 2
    assert provider.check()["active"] == provider.check()["queued"] == 0


def test_slots_are_fifo_fair() -> None:
    slots = _FairSlots(1, max_queue=8)
    first = slots.acquire(None, None)
    order: list[int] = []

    def wait_turn(index: int) -> None:
        slot = slots.acquire(None, time.monotonic() + 10)
        order.append(index)
        assert slot is not None
        slots.release(slot)

    threads = []
    for index in range(5):
        thread = threading.Thread(target=wait_turn, args=(index,))
        thread.start()
        threads.append(thread)
        while slots.queued < index + 1:  # queue them in a known order
            time.sleep(0.001)
    assert first is not None
    slots.release(first)
    for thread in threads:
        thread.join(timeout=5)
    assert order == [0, 1, 2, 3, 4]
    assert (slots.active, slots.queued) == (0, 0)


def test_slots_bound_the_queue_and_leave_it_on_cancel_or_deadline() -> None:
    slots = _FairSlots(1, max_queue=1)
    held = slots.acquire(None, None)
    cancel = threading.Event()
    result: list[int | None] = []
    waiter = threading.Thread(target=lambda: result.append(slots.acquire(cancel, None)))
    waiter.start()
    while slots.queued < 1:
        time.sleep(0.001)
    with pytest.raises(LocalOverloadedError) as raised:
        slots.acquire(None, None)
    assert isinstance(raised.value, Overloaded) and raised.value.retry_after
    cancel.set()
    waiter.join(timeout=5)
    assert result == [None] and slots.queued == 0
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        slots.acquire(None, began + 0.1)
    assert time.monotonic() - began < 1.0 and slots.queued == 0
    assert held is not None
    slots.release(held)
    assert (slots.active, slots.queued) == (0, 0)


def test_provider_overload_and_close() -> None:
    local = LocalProvider(n_threads=1, max_concurrent=1, max_queue=0)
    holding = local.stream(ask(LONG, max_tokens=64))
    assert next(holding).text  # the only slot is busy
    began = time.monotonic()
    with pytest.raises(LocalOverloadedError):
        local.complete(ask(SHORT))
    assert time.monotonic() - began < 0.1  # refused at once, not queued
    holding.close()  # a consumer leaving early frees the slot
    assert local.check()["active"] == 0
    assert local.complete(ask(SHORT, max_tokens=4)).text
    local.close()
    assert local.check()["loaded"] is False
    with pytest.raises(RuntimeError, match="closed"):
        local.complete(ask(SHORT))


def test_refuses_to_block_an_asyncio_loop(provider: LocalProvider) -> None:
    async def on_loop() -> None:
        provider.complete(ask(SHORT))

    with pytest.raises(RuntimeError, match="native pool thread"):
        asyncio.run(on_loop())


def test_refuses_to_block_a_gevent_hub(provider: LocalProvider) -> None:
    import gevent
    greenlet = gevent.spawn(provider.complete, ask(SHORT))
    greenlet.join()
    assert isinstance(greenlet.exception, RuntimeError)
    assert "native pool thread" in str(greenlet.exception)


GEVENT_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import json, threading, time
import gevent
from gevent.threadpool import ThreadPoolExecutor
from chat.providers.base import ChatRequest
from chat.providers.local import LocalProvider

provider = LocalProvider()
def ask(n):
    return ChatRequest(messages=({"role": "user", "content": "Write a long essay about the sea."},),
                       model="smollm2-135m", temperature=0.0, max_tokens=n)
gaps = []
def ticker():
    last = time.monotonic()
    while True:
        gevent.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
tick = gevent.spawn(ticker)
pool = ThreadPoolExecutor(4)
cancel = threading.Event()  # gevent's, after patching: set on the hub, read on a pool thread
futures = [pool.submit(provider.complete, ask(24)) for _ in range(3)]
futures.append(pool.submit(lambda: list(provider.stream(ask(400), cancel=cancel))))
gevent.sleep(0.5)
cancel.set()
results = [f.result(timeout=60) for f in futures]
tick.kill()
print(json.dumps({"finishes": [r.finish_reason for r in results[:3]],
                  "stream_last": results[3][-1].finish_reason, "max_gap": max(gaps),
                  "active": provider.check()["active"]}))
"""


def test_under_gevent_on_native_pool_threads() -> None:
    """Run on gevent's native pool threads after patch_all; the hub keeps ticking."""
    import gevent  # noqa: F401
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT], check=False, cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["finishes"] == ["length"] * 3  # three generations, two slots, one queued
    assert report["stream_last"] == "cancelled"
    assert report["active"] == 0
    assert report["max_gap"] < 0.25  # a generation on the hub would stall it for seconds
