"""The server's OpenAPI description as its answers are: every error is OpenAI's error body with the status the
routes and guards give it, and no FastAPI default that this server never sends (its 422: validation errors are
answered as OpenAI's 400). Clients generated from `/openapi.json`, and schema fuzzers, then expect what comes."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    """What was wrong, naming the field or limit."""
    type: str
    """invalid_request_error, authentication_error, rate_limit_error or server_error (OpenAI's kinds)."""
    param: str | None = None
    """The request field at fault, when one is."""
    code: str | None = None
    """A machine-readable reason (e.g. queue_full, model_not_found, request_too_large)."""


class ErrorBody(BaseModel):
    """OpenAI's error envelope."""

    error: ErrorDetail


_WHY = {
    400: "The request is invalid: a field's type or bound, an unknown tool, a prompt or max_tokens over the limits.",
    401: "The server has an API key and the request's `Authorization: Bearer` header does not give it.",
    404: "`model` names neither the served model nor one of its adapters.",
    413: "The body is larger than --max-body-bytes.",
    429: "The queue is full (--max-queue); retry after the `Retry-After` seconds.",
    500: "Generation failed for this request (others in its batch go on); the message gives its request id.",
}


def error_responses(*statuses: int) -> dict[int, dict]:
    """`responses=` for a route that answers these error statuses."""
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}


def use_own_errors(app: FastAPI) -> None:
    """Describe `app` without FastAPI's 422 responses and their schemas."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
