"""Admin endpoints: POST /api/clear-cache."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..auth import require_admin
from .common import services

bp = Blueprint("admin", __name__)


@bp.post("/api/clear-cache")
def clear_cache() -> Response:
    """Empty the response cache of every worker."""
    require_admin()
    cleared = services().cache.clear()
    return jsonify({"success": True, "cleared": cleared})
