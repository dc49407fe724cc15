"""Fuzz the live server (gunicorn, gevent worker) from its own /openapi.json with schemathesis.

For every documented operation, schema-valid and schema-violating requests (bounded and
derandomized, so each run sends the same ones) must get an answer that is documented:
its status code, its content type, its headers and its body schema. No 5xx except the
502/503/504 that API.md allows.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_headers_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from chat.openapi import document

set_hypothesis_home_dir("/tmp/chat-tests-hypothesis")  # its caches stay out of the work tree
pytestmark = pytest.mark.slow  # real gunicorn
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))  # more for a deeper run
ALLOWED_5XX = {502, 503, 504}
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
_PATHS = document()["paths"]
OPERATIONS = [(method.upper(), path) for path, item in _PATHS.items()
              for method in item if method != "parameters"]
# Schema-violating requests need something to violate: parameters or a body.
CASES = [(method, path, mode) for method, path in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode == GenerationMode.POSITIVE or _PATHS[path].get("parameters")
         or _PATHS[path][method.lower()].get("parameters")
         or _PATHS[path][method.lower()].get("requestBody")]


@pytest.fixture(scope="module")
def server(database_url: str, upstream: Any) -> Iterator[Any]:
    from servers import Gunicorn

    with Gunicorn(database_url=database_url, upstream_url=upstream.url, workers=1,
                  rate_limit_chat="1000000 per minute", request_timeout=10) as live:
        yield live


@pytest.fixture(scope="module")
def schema(server: Any) -> Any:
    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json")
    loaded.config.update(base_url=server.url)
    return loaded


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # loopback never goes through a proxy from the environment
        yield s


def _describe(case: Any, response: Any, problem: str) -> str:
    body = response.text[:300] if response is not None else ""
    status = response.status_code if response is not None else "-"
    return f"{case.method} {case.formatted_path} -> {status}: {problem}\n  {case.as_curl_command()}\n  {body}"


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g}" for m, p, g in CASES])
def test_operation_answers_as_documented(schema: Any, server: Any, session: requests.Session,
                                         method: str, path: str, mode: GenerationMode) -> None:
    operation = schema[path][method]
    failures: list[str] = []

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        try:
            response = case.call(base_url=server.url, session=session, timeout=30)
        except requests.RequestException as exc:
            failures.append(f"{case.method} {case.formatted_path}: transport error {exc!r}\n"
                            f"  {case.as_curl_command()}")
            return
        if response.status_code >= 500 and response.status_code not in ALLOWED_5XX:
            failures.append(_describe(case, response, "server error"))
            return
        try:
            case.validate_response(response, checks=CHECKS)
        except AssertionError as exc:  # schemathesis' failure groups are AssertionErrors
            failures.append(_describe(case, response, str(exc).strip()[:1500]))

    run()
    # Deduplicate: one line per distinct problem is enough to act on.
    unique = list(dict.fromkeys(failures))
    assert not unique, f"{len(unique)} undocumented answers:\n" + "\n".join(unique[:8])
