"""Errors become HTTP here, and only here (SPEC §7): one status table, and the shapes an
error is written in: rbee's (``{"error": {"code", "message"}}``); on the OpenAI routes,
vLLM's (``{"error": {"message", "type", "param", "code"}}``, ``code`` the HTTP status); on
Anthropic's, Anthropic's (``{"type": "error", "error": {"type", "message"}}``). In a stream
that has begun, an error is the stream's last event, in the stream's shape."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Literal

from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.core import errors
from serve_app import sse

#: The shape an error is written in: rbee's, OpenAI's (vLLM's), Anthropic's.
Shape = Literal["rbee", "openai", "anthropic"]

STATUS: dict[type[errors.RbeeError], int] = {
    errors.MalformedBody: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.BodyTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.InvalidRequest: 422,
    errors.RequestError: 400,
    errors.JobCancelled: 409,  # a request waiting for its job's result, and the job was cancelled
    errors.WorkerDied: 503,  # the server's side failed; the same request may succeed again
    errors.InsufficientVram: 503,
    errors.ModelLoadFailed: 503,
    errors.Unavailable: 503,
    errors.RbeeError: 500,
}

_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


def status_of(exc: errors.RbeeError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def openai_status(exc: errors.RbeeError) -> int:
    """As on rbee's other routes, but a request refused is a 400, as on vLLM's server."""
    return 400 if isinstance(exc, errors.InvalidRequest) else status_of(exc)


def openai_body(exc: errors.RbeeError) -> dict[str, Any]:
    """The error object of vLLM's server: ``message``, ``type``, ``param`` and ``code``, the
    HTTP status (rbee's own code is the job's, in its record and its ``error`` event)."""
    status = openai_status(exc)
    return {
        "error": {
            "message": exc.message,
            "type": _type_of(status),
            "param": exc.param,
            "code": status,
        }
    }


def _type_of(code: int) -> str:
    name = HTTPStatus(code).phrase.replace(" ", "").replace("-", "")
    return name if name.endswith("Error") else name + "Error"


#: Anthropic's error types by status (its API's own list; a status not in it is an
#: ``api_error``). vLLM's server names them by its own OpenAI types instead; Anthropic's
#: clients and their users read these.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_body(exc: errors.RbeeError) -> dict[str, Any]:
    """The error object of Anthropic's API, of the status vLLM's server answers with."""
    kind = _ANTHROPIC_TYPES.get(openai_status(exc), "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def stream_error(exc: errors.RbeeError, shape: Shape) -> str:
    """``exc`` as the last event of a stream of ``shape``: OpenAI's, a chunk of its error
    object and ``[DONE]``; Anthropic's, its ``error`` event."""
    if shape == "anthropic":
        data = json.dumps(anthropic_body(exc), separators=(",", ":"))
        return f"event: error\ndata: {data}\n\n"
    return sse.data_json(openai_body(exc)) + sse.DATA_DONE


def response_for(
    exc: errors.RbeeError, shape: Shape = "rbee", *, challenge: str = "Bearer"
) -> JSONResponse:
    """``exc`` as an HTTP answer in ``shape``; a 401 names the credentials it wants
    (``challenge``: the page's files ask the browser for Basic). A request whose job was
    cancelled is not to be sent again: OpenAI's and Anthropic's clients retry a 409 unless
    told (``x-should-retry``), and a retry would run the work the cancel stopped."""
    status = status_of(exc) if shape == "rbee" else openai_status(exc)
    if shape == "openai":
        body = openai_body(exc)
    elif shape == "anthropic":
        body = anthropic_body(exc)
    else:
        body = error_body(exc.code, exc.message)
    headers = {"WWW-Authenticate": challenge} if status == 401 else {}
    if isinstance(exc, errors.JobCancelled):
        headers["x-should-retry"] = "false"
    return JSONResponse(body, status, headers=headers or None)


async def rbee_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.RbeeError)
    return response_for(exc)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
    return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)


def actor_gone_error(exc: RayActorError) -> errors.Unavailable:
    """An actor rbee needs died or is restarting (Ray restarts them): 503, try again."""
    return errors.Unavailable(f"an rbee actor is restarting: {type(exc).__name__}; try again")


async def actor_gone(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RayActorError)
    return response_for(actor_gone_error(exc))


EXCEPTION_HANDLERS = {
    errors.RbeeError: rbee_error,
    HTTPException: http_error,
    RayActorError: actor_gone,
}
