"""GET /openapi.json is valid OpenAPI 3.1 made from the validating models; /docs and /redoc work offline."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from chat.api.openai_api import CompletionRequest
from chat.schemas import ChatBody, ConversationCreate, ConversationRename, PageQuery

REF = "#/components/schemas/{model}"


@pytest.fixture(scope="module")
def docs_app(database_url: str, upstream: Any) -> Any:
    from chat import create_app
    from conftest import base_settings

    app = create_app(base_settings(database_url, upstream.url))
    app.config["TESTING"] = True
    yield app
    app.extensions["chat"].close()


@pytest.fixture(scope="module")
def spec(docs_app: Flask) -> dict[str, Any]:
    response = docs_app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def test_document_is_valid_openapi_31(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises on any violation of the OpenAPI 3.1 schema


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_every_route_is_documented(docs_app: Flask, spec: dict[str, Any]) -> None:
    missing = []
    for rule in docs_app.url_map.iter_rules():
        if rule.endpoint.endswith("static") or rule.endpoint.endswith("_asset"):
            continue
        path = _openapi_path(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if method.lower() not in spec["paths"].get(path, {}):
                missing.append(f"{method} {path}")
    assert not missing, f"routes missing from /openapi.json: {missing}"
    for required in ("/api/chat", "/api/conversations", "/api/conversations/{conversation_id}",
                     "/api/health", "/api/health/live", "/api/health/ready", "/api/metrics",
                     "/metrics", "/api/clear-cache", "/v1/chat/completions", "/v1/models"):
        assert required in spec["paths"], required


def _resolve(schema: Any, components: dict[str, Any]) -> Any:
    """Inline every $ref so schemas compare by content, whatever the ref template."""
    if isinstance(schema, dict):
        if set(schema) == {"$ref"}:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return _resolve(components[name], components)
        return {k: _resolve(v, components) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_resolve(v, components) for v in schema]
    return schema


@pytest.mark.parametrize("model", [ChatBody, ConversationCreate, ConversationRename, CompletionRequest])
def test_request_schemas_are_the_validating_models(spec: dict[str, Any], model: Any) -> None:
    components = spec["components"]["schemas"]
    # Exactly what pydantic generates, only with $refs pointing into components.
    expected = model.model_json_schema(ref_template=REF)
    expected.pop("$defs", None)
    assert components[model.__name__] == expected
    # And the same schema as model_json_schema() once references are resolved.
    plain = model.model_json_schema()
    assert _resolve(components[model.__name__], components) == _resolve(plain, plain.get("$defs", {}))


def test_chat_operation_documents_the_contract(spec: dict[str, Any]) -> None:
    op = spec["paths"]["/api/chat"]["post"]
    body = op["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatBody"}
    assert body["examples"]
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatReply"}
    assert "text/event-stream" in ok
    for status in (400, 401, 404, 413, 415, 422, 429, 500, 502, 503, 504):
        answer = op["responses"][str(status)]["content"]["application/json"]
        assert answer["schema"] == {"$ref": "#/components/schemas/ErrorReply"}, status
        assert answer["example"]["success"] is False
    # API.md's whole error table is in components/responses, each answer an ErrorReply.
    table = {400, 401, 403, 404, 405, 413, 415, 422, 429, 500, 502, 503, 504}
    reusable = spec["components"]["responses"]
    assert {int(name.removeprefix("Error")) for name in reusable} == table
    assert all(r["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorReply")
               for r in reusable.values())
    conv = spec["paths"]["/api/conversations/{conversation_id}"]
    assert set(conv) >= {"get", "patch", "delete", "parameters"}
    assert conv["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ConversationWithMessages")
    limit = next(p for p in conv["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == PageQuery.model_fields["limit"].metadata[1].le
    assert "201" in spec["paths"]["/api/conversations"]["post"]["responses"]
    assert "204" in conv["delete"]["responses"]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    stream = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(stream) == {"application/json", "text/event-stream"}


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.scripts.append(found["src"] or "")
            self.urls.append(found["src"] or "")
        if tag == "link" and found.get("href"):
            self.urls.append(found["href"] or "")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_ui_pages_use_only_local_assets(docs_app: Flask, page: str) -> None:
    client: FlaskClient = docs_app.test_client()
    response = client.get(page)
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "/openapi.json" in html
    assert not re.search(r"https?://", html), "the page must not load anything from the internet"
    parser = _Assets()
    parser.feed(html)
    assert parser.scripts, "the page must load its UI script"
    for url in parser.urls:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.data) > 1000 or url.endswith(".svg"), url
        asset.close()
    js = [u for u in parser.scripts if u.endswith(".js")]
    assert any(("swagger-ui-bundle" if page == "/docs" else "redoc.standalone") in u for u in js)


def test_unknown_asset_is_404(docs_app: Flask) -> None:
    client = docs_app.test_client()
    assert client.get("/docs/assets/js/nope.js").status_code == 404
    assert client.get("/docs/assets/../../__init__.py").status_code == 404


def _examples(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any], Any]]:
    """Every JSON example of the document with the schema it illustrates."""
    found = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                found += [(f"{method} {path} request {name}", body["schema"], ex["value"])
                          for name, ex in body.get("examples", {}).items()]
            for status, answer in op["responses"].items():
                media = answer.get("content", {}).get("application/json", {})
                if "example" in media:
                    found.append((f"{method} {path} {status}", media["schema"], media["example"]))
    return found


def test_examples_match_their_schemas(spec: dict[str, Any]) -> None:
    from jsonschema import Draft202012Validator

    examples = _examples(spec)
    assert len(examples) > 40
    for where, schema, example in examples:
        validator = Draft202012Validator({**schema, "components": spec["components"]})
        errors = [e.message for e in validator.iter_errors(example)]
        assert not errors, f"{where}: {errors}"


def test_docs_are_public_when_auth_is_on(make_app: Any) -> None:
    client = make_app(api_keys="docs-test-key-123").test_client()
    assert client.get("/api/conversations").status_code == 401
    assert client.get("/openapi.json").status_code == 200
    for page in ("/docs", "/redoc"):
        parser = _Assets()
        parser.feed(client.get(page).get_data(as_text=True))
        for url in parser.scripts:
            response = client.get(url)
            assert response.status_code == 200, url
            response.close()
