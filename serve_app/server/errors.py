"""Errors become HTTP here, and only here (SPEC §7)."""

from __future__ import annotations

from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.core import errors

STATUS: dict[type[errors.RbeeError], int] = {
    errors.MalformedBody: 400,
    errors.Unauthorized: 401,
    errors.NotFound: 404,
    errors.BodyTooLarge: 413,
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


async def rbee_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.RbeeError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthorized) else None
    return JSONResponse(error_body(exc.code, exc.message), status_of(exc), headers=headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
    return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)


async def actor_gone(request: Request, exc: Exception) -> JSONResponse:
    """An actor rbee needs died or is restarting (Ray restarts them): 503, try again."""
    message = f"an rbee actor is restarting: {type(exc).__name__}; try again"
    return JSONResponse(error_body(errors.Unavailable.code, message), 503)


EXCEPTION_HANDLERS = {
    errors.RbeeError: rbee_error,
    HTTPException: http_error,
    RayActorError: actor_gone,
}
