"""Fixtures: a real PostgreSQL, a fake OpenAI-compatible upstream, apps built with overrides."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench.fake_upstream import FakeUpstream
from chat import create_app

# g4f writes its cache and usage logs under the home folder; keep tests out of it.
os.environ.setdefault("G4F_CACHE_DIR", "/tmp/chat-tests-g4f")
os.environ.setdefault("G4F_CONFIG_DIR", "/tmp/chat-tests-g4f")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """Return a PostgreSQL URL: TEST_DATABASE_URL, or an embedded server for the session."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from chat.embedded_db import EmbeddedPostgres

    # Not under pytest's basetemp: a concurrent pytest run may prune that folder.
    folder = tempfile.mkdtemp(prefix="chat-test-pg-")
    server = EmbeddedPostgres(folder)
    yield server.start()
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    """Run the fake OpenAI-compatible upstream for the session."""
    with FakeUpstream(stream_interval=0.01, pieces=4) as fake:
        yield fake


def base_settings(database_url: str, upstream_url: str) -> dict[str, Any]:
    """Return settings that point the app at the test database and the fake upstream."""
    return {
        "database_url": database_url,
        "g4f_base_url": upstream_url,
        "llm_base_url": upstream_url,
        "llm_api_key": "test-key",
        "retry_backoff": 0.01,
        "request_timeout": 10,
        "rate_limit_chat": "10000 per minute",
        "log_level": "WARNING",
        "db_pool_min": 1,
        "db_pool_max": 10,
        "redis_url": "",
        "api_keys": "",
        "admin_key": "",
    }


@contextmanager
def app_builder(database_url: str, upstream_url: str) -> Iterator[Callable[..., Flask]]:
    """Yield a factory of test apps with setting overrides; close every app it built."""
    apps: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        settings = base_settings(database_url, upstream_url)
        settings.update(overrides)
        app = create_app(settings)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    try:
        yield factory
    finally:
        for app in apps:
            app.extensions["chat"].close()


@pytest.fixture
def make_app(database_url: str, upstream: FakeUpstream) -> Iterator[Callable[..., Flask]]:
    """Build apps with setting overrides; close them after the test."""
    with app_builder(database_url, upstream.url) as factory:
        yield factory


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


def new_client(app: Flask, client_id: str | None = None) -> FlaskClient:
    """Return a test client that speaks as its own X-Client-Id."""
    client = app.test_client()
    client.environ_base["HTTP_X_CLIENT_ID"] = client_id or f"test-{uuid.uuid4().hex}"
    return client


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return new_client(app)


@pytest.fixture(scope="module")
def live_server(database_url: str, upstream: FakeUpstream) -> Iterator[Any]:
    """Run real gunicorn (one gevent worker) against the test database and fake upstream."""
    from servers import Gunicorn

    with Gunicorn(database_url=database_url, upstream_url=upstream.url) as server:
        yield server
