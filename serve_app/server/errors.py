"""Errors become HTTP here, and only here (SPEC §7): one status table, and the two shapes an
error is written in, rbee's (``{"error": {"code", "message"}}``) and, on the OpenAI routes,
vLLM's (``{"error": {"message", "type", "param", "code"}}``, ``code`` the HTTP status)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.core import errors

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


def response_for(
    exc: errors.RbeeError, *, openai: bool = False, challenge: str = "Bearer"
) -> JSONResponse:
    """``exc`` as an HTTP answer, in OpenAI's shape on its routes; a 401 names the
    credentials it wants (``challenge``: the page's files ask the browser for Basic)."""
    status = openai_status(exc) if openai else status_of(exc)
    body = openai_body(exc) if openai else error_body(exc.code, exc.message)
    headers = {"WWW-Authenticate": challenge} if status == 401 else None
    return JSONResponse(body, status, headers=headers)


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
