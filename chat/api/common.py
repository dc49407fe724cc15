"""Helpers the views share: the services, the JSON body, query parameters."""
from __future__ import annotations

import json
from typing import Any

from flask import current_app, request
from pydantic import BaseModel

from ..errors import InvalidJSON, UnsupportedMediaType
from ..schemas import validate
from ..services import Services


def services() -> Services:
    """Return this app's services."""
    return current_app.extensions["chat"]


def json_body() -> Any:
    """Return the parsed JSON body; 415 when it is not JSON, 400 when it does not parse."""
    if not request.mimetype or request.mimetype != "application/json":
        raise UnsupportedMediaType(
            f"send the body as application/json, not {request.mimetype or 'no content type'}")
    raw = request.get_data(cache=True)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"the body is not valid JSON: {exc}") from None


def body_as(model: type[BaseModel], **context: Any) -> Any:
    """Parse and validate the JSON body as model."""
    return validate(model, json_body(), **context)


def query_as(model: type[BaseModel]) -> Any:
    """Validate the query string as model."""
    return validate(model, request.args.to_dict())
