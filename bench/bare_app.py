"""The benchmark's ceiling: a bare Flask JSON endpoint, nothing of the product around it.

Served by the same gunicorn.conf.py as the product (gevent workers, same settings):

    DATABASE_URL=unused gunicorn -c gunicorn.conf.py bench.bare_app:app

``DATABASE_URL`` only keeps gunicorn.conf.py's start hook from starting the embedded
database this app never uses. ``POST /echo`` reads a JSON body and answers JSON, the
least a chat request costs; ``GET /ping`` answers a constant.
"""
from __future__ import annotations

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.post("/echo")
def echo() -> Response:
    """Parse the JSON body and answer it back."""
    body = request.get_json(force=True, silent=True) or {}
    return jsonify({"success": True, "message": body.get("message", "")})


@app.get("/ping")
def ping() -> Response:
    """Answer a constant JSON object."""
    return jsonify({"ok": True})
