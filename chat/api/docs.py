"""API docs: GET /openapi.json, Swagger UI at /docs and ReDoc at /redoc.

The UIs' scripts and styles come from Python packages (flask-openapi3-swagger,
flask-openapi3-redoc) and are served from their installed folders: no CDN, so the
docs work on machines without internet access.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

from flask import Blueprint, Response, abort, jsonify, render_template_string, send_from_directory

from ..openapi import document

bp = Blueprint("docs", __name__)

# package -> folder of its assets inside the package
_ASSETS = {"swagger": ("flask_openapi3_swagger", "templates/swagger"),
           "redoc": ("flask_openapi3_redoc", "templates/redoc")}


@lru_cache(maxsize=None)
def asset_dir(ui: str) -> str | None:
    """Return the installed folder of a UI's assets, or None when the package is missing."""
    package, sub = _ASSETS[ui]
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], *sub.split("/"))
    return folder if os.path.isdir(folder) else None


_SWAGGER = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Chat backend API - Swagger UI</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="{{ url_for('docs.swagger_asset', filename='images/swagger.svg') }}">
<link rel="stylesheet" href="{{ url_for('docs.swagger_asset', filename='css/swagger-ui.css') }}">
</head><body><div id="swagger-ui"></div>
<script src="{{ url_for('docs.swagger_asset', filename='js/swagger-ui-bundle.js') }}"></script>
<script src="{{ url_for('docs.swagger_asset', filename='js/swagger-ui-standalone-preset.js') }}"></script>
<script>
window.ui = SwaggerUIBundle({url: {{ url_for('docs.openapi_json')|tojson }}, dom_id: "#swagger-ui",
  deepLinking: true, validatorUrl: null, layout: "StandaloneLayout",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset]});
</script></body></html>
"""

_REDOC = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Chat backend API - ReDoc</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="{{ url_for('docs.redoc_asset', filename='images/redoc.svg') }}">
<style>body { margin: 0; padding: 0; }</style>
</head><body><div id="redoc"></div>
<script src="{{ url_for('docs.redoc_asset', filename='js/redoc.standalone.js') }}"></script>
<script>
Redoc.init({{ url_for('docs.openapi_json')|tojson }}, {hideDownloadButton: false},
           document.getElementById("redoc"));
</script></body></html>
"""


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """Return the OpenAPI 3.1 document."""
    return jsonify(document())


def _page(template: str, ui: str) -> Response:
    if asset_dir(ui) is None:
        abort(404)
    response = Response(render_template_string(template), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/docs")
def swagger_ui() -> Response:
    """Serve Swagger UI."""
    return _page(_SWAGGER, "swagger")


@bp.get("/redoc")
def redoc() -> Response:
    """Serve ReDoc."""
    return _page(_REDOC, "redoc")


def _asset(ui: str, filename: str) -> Response:
    folder = asset_dir(ui)
    if folder is None:
        abort(404)
    return send_from_directory(folder, filename, max_age=86400)


@bp.get("/docs/assets/<path:filename>")
def swagger_asset(filename: str) -> Response:
    """Serve a Swagger UI script, style or image from its installed package."""
    return _asset("swagger", filename)


@bp.get("/redoc/assets/<path:filename>")
def redoc_asset(filename: str) -> Response:
    """Serve a ReDoc script or image from its installed package."""
    return _asset("redoc", filename)
