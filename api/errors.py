"""The error answers every route documents: each is JSON, {"detail": ...}."""

from __future__ import annotations

from schemas.api import ErrorView

# Every answer but success carries {"detail": ...}: a message, field errors or a report.
ERRORS = {
    400: {"model": ErrorView, "description": "The body could not be parsed (e.g. not UTF-8)"},
    401: {"model": ErrorView, "description": "No valid bearer token (auth on)"},
    403: {"model": ErrorView, "description": "Your role in the project is too low; the message names the one needed"},
    404: {"model": ErrorView, "description": "Not found, or in a project you have no role in"},
    409: {"model": ErrorView, "description": "Conflicts with the object's state"},
    422: {"model": ErrorView, "description": "Invalid request: which field, where, and what to do"},
    503: {"model": ErrorView, "description": "Temporal, the database or the identity provider is unreachable"},
}


def errors_as_json() -> dict[int, dict]:
    """ERRORS with their JSON content spelled out, for a route whose response class is not
    JSON (an EventSourceResponse stream): FastAPI documents a `model` answer under the route's
    media type, but errors are JSON on every route."""
    schema = {"$ref": f"#/components/schemas/{ErrorView.__name__}"}  # registered by every other route
    return {
        code: {"description": answer["description"], "content": {"application/json": {"schema": schema}}}
        for code, answer in ERRORS.items()
    }
