"""The web chat page: a static single page served at ``GET /``.

The app factory registers it with ``app.register_blueprint(chat.web.bp)``.
The page (``static/index.html``, ``app.js``, ``style.css``) is plain HTML/CSS/JS
with no build step; it talks to the JSON API described in API.md.
"""

import os

from flask import Blueprint, send_from_directory

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

bp = Blueprint("web", __name__, static_folder="static", static_url_path="/static")


@bp.record_once
def _share_static_route(setup_state):
    """``Flask(__name__)`` adds its own ``/static/<filename>`` rule, registered before
    ours and so matched first. When the app has no static folder of its own, point
    that rule at this page's assets so ``/static/app.js`` is served either way."""
    app = setup_state.app
    if (app.has_static_folder and app.static_url_path == bp.static_url_path
            and not os.path.isdir(app.static_folder)):
        app.static_folder = STATIC_DIR


@bp.get("/")
def index():
    """Serve the chat page; never cached so a deploy shows up on reload."""
    response = send_from_directory(STATIC_DIR, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response
