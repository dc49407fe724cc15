"""Run the development server (`python app.py`)."""
from __future__ import annotations

from flask import Flask


def main(app: Flask) -> None:
    """Serve app with Flask's threaded development server."""
    settings = app.extensions["chat"].settings
    print(f"chat backend (dev) on http://{settings.host}:{settings.port}  "
          f"provider={settings.llm_provider} model={settings.llm_model}", flush=True)
    app.run(host=settings.host, port=settings.port, threaded=True, use_reloader=False)
