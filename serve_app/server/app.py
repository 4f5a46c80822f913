"""The Starlette ingress: jobs, their live event streams, and cancel (SPEC §3-5, §7)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.core.config import Config
from actors.core.errors import InvalidRequest, JobNotFound, RbeeError
from actors.core.operations import OPERATION_NAMES
from actors.core.table import JOB_ID, JobState, is_job_id
from actors.registry_client import CancelAnswer, Registry
from serve_app import sse
from serve_app.server import openapi
from serve_app.server.board import Board, Position
from serve_app.server.errors import EXCEPTION_HANDLERS
from serve_app.server.guards import guarded
from serve_app.server.jobstream import (
    End,
    Idle,
    Item,
    JobStream,
    check_cancelled,
    check_listing,
    correlation_id,
    new_correlation_id,
)
from serve_app.server.openai import OpenAi
from serve_app.server.openai import shapes as openai_shapes
from serve_app.server.page import page_routes

log = logging.getLogger("rbee.http")

CID_HEADER = "x-correlation-id"
# Every pattern here is used with ``fullmatch``: ``$`` would also match before a final newline.
_CID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# ASCII digits only (``str.isdigit`` passes '²' and other scripts' digits), few enough that
# ``int()`` is cheap and the value fits in 64 bits.
_COUNT = re.compile(r"[0-9]{1,18}")

_HEALTH_DETAIL_S = 1.0


class Api:
    """The routes, bound to one registry and one config."""

    def __init__(self, config: Config, jobs: JobStream) -> None:
        self.config = config
        self.registry = jobs.registry
        self.jobs = jobs
        self.board = Board(config, jobs.registry)
        self.openai = OpenAi(self.jobs).routes()
        self.shapes = openai_shapes()
        self._openapi: asyncio.Future[bytes] | None = None

    def routes(self) -> list[BaseRoute]:
        """Every route; who may call them is decided before (``serve_app.server.guards``).
        A job id in a path has the job-id form (``{job_id:job}``), else no route is found."""
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/v1/jobs", self.submit, methods=["POST"]),
            Route("/v1/jobs/cancel", self.cancel_many, methods=["POST"]),
            Route("/v1/jobs", self.list_jobs, methods=["GET"]),
            Route("/v1/jobs/watch", self.watch, methods=["GET"]),
            Route("/v1/hives", self.hives, methods=["GET"]),
            Route("/v1/jobs/{job_id:job}", self.get_job, methods=["GET"]),
            Route("/v1/jobs/{job_id:job}", self.delete_job, methods=["DELETE"]),
            Route("/v1/jobs/{job_id:job}/stream", self.stream, methods=["GET"]),
            Route("/v1/jobs/{job_id:job}/cancel", self.cancel_job, methods=["POST"]),
            # Any other id under /v1/jobs/ names no job: 404 before anything is asked.
            Route("/v1/jobs/{job_id:rest}", self.no_such_job, methods=["GET", "POST", "DELETE"]),
            Route("/cancel", self.cancel_body, methods=["POST"]),
            *self.openai,
            *page_routes(),  # the page holds no data: what it shows comes through the API
        ]

    async def health(self, request: Request) -> Response:
        """200 once jobs can be taken; how the preloads stand rides along, never holding it up
        (a preload that failed is reported here and the server keeps serving)."""
        await self.registry.ready()
        body: dict[str, Any] = {"status": "ok"}
        try:
            body["preload"] = await asyncio.wait_for(self.registry.preloads(), _HEALTH_DETAIL_S)
        except Exception as exc:  # a hive busy or gone: health stays about taking jobs
            log.info("health: preload states unavailable: %r", exc)
        return JSONResponse(body)

    async def openapi(self, request: Request) -> Response:
        """This document: every route, made from the routes and the models that read them
        (``serve_app.server.openapi``)."""
        if self._openapi is None:  # once, in a thread: vLLM's models take seconds to import
            self._openapi = asyncio.ensure_future(asyncio.to_thread(self._openapi_json))
        body = await asyncio.shield(self._openapi)
        return Response(body, media_type="application/json")

    def _openapi_json(self) -> bytes:
        """The document, written once (it is large: vLLM's request models spelled out)."""
        document = openapi.document(self.routes(), self.shapes)
        return json.dumps(document, separators=(",", ":")).encode()

    async def submit(self, request: Request) -> Response:
        job_id = await self.jobs.submit(request, await self.jobs.read_json(request))
        return JSONResponse(
            {"job_id": job_id, "sse_url": f"/v1/jobs/{job_id}/stream"},
            201,
            headers={"Location": f"/v1/jobs/{job_id}"},
        )

    async def list_jobs(self, request: Request) -> Response:
        state, operation = _query(request, "state"), _query(request, "operation")
        limit = _count(_query(request, "limit") or "100", "limit")
        check_listing(state, operation, limit)
        jobs = await self.registry.jobs(state=state, operation=operation, limit=limit)
        return JSONResponse({"jobs": jobs})

    async def watch(self, request: Request) -> Response:
        """The jobs board, live (``serve_app.server.board``): an ``event: jobs`` frame with
        the whole board, then one with the rows that changed, as they change."""
        limit = _count(_query(request, "limit") or "500", "limit")
        check_listing(None, None, limit)
        raw = request.headers.get("last-event-id") or _query(request, "last_event_id")
        return _event_stream(self._board_frames(Position.parse(raw), limit))

    async def _board_frames(self, start: Position, limit: int) -> AsyncIterator[str]:
        async for news in self.board.follow(start, limit):
            yield sse.KEEPALIVE if news is None else sse.frame(str(news[0]), "jobs", news[1])

    async def hives(self, request: Request) -> Response:
        """Every alive node's hive: what ``hive_list`` gives, without making a job of it."""
        return JSONResponse({"hives": await self.registry.hives()})

    async def get_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        return JSONResponse(await self.registry.job(job_id))

    async def delete_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        check_cancelled(job_id, await self._cancel(request, [job_id], wait=True))
        return JSONResponse({"job_id": job_id, "status": "cancelled"})

    async def cancel_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        await self._cancel(request, [job_id])
        return JSONResponse({"job_id": job_id, "status": "cancelling"}, 202)

    async def cancel_body(self, request: Request) -> Response:
        body = await self.jobs.read_json(request)
        job_id = body.get("job_id") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise InvalidRequest("'job_id' must be a non-empty string")
        await self._cancel(request, [check_job_id(job_id)])
        return JSONResponse({"job_id": job_id, "status": "cancelling"}, 202)

    async def cancel_many(self, request: Request) -> Response:
        """Cancel many jobs with one request: ``{"job_ids": [...]}`` or filters
        ``{"state": "queued"|"running", "operation": ...}`` (no filter: every unfinished job)."""
        body = await self.jobs.read_json(request)
        if not isinstance(body, dict) or set(body) - {"job_ids", "state", "operation"}:
            raise InvalidRequest("give 'job_ids', or 'state' and/or 'operation'")
        job_ids, state, operation = body.get("job_ids"), body.get("state"), body.get("operation")
        if job_ids is not None and (
            not isinstance(job_ids, list)
            or not all(isinstance(j, str) for j in job_ids)
            or len(job_ids) > 100_000
            or state is not None
            or operation is not None
        ):
            raise InvalidRequest("'job_ids' must be a list of job ids, alone")
        for job_id in job_ids or ():
            check_job_id(job_id)
        if state not in (None, JobState.QUEUED.value, JobState.RUNNING.value):
            raise InvalidRequest("'state' must be 'queued' or 'running'")
        # Not ``in OPERATION_NAMES`` first: a list or an object is unhashable.
        if operation is not None and (
            not isinstance(operation, str) or operation not in OPERATION_NAMES
        ):
            raise InvalidRequest(f"operation must be one of {sorted(OPERATION_NAMES)}")
        answer = await self._cancel(request, job_ids, state=state, operation=operation)
        return JSONResponse({"status": "cancelling", **answer.to_dict()}, 202)

    async def _cancel(
        self, request: Request, job_ids: list[str] | None, **how: Any
    ) -> CancelAnswer:
        """Behind every cancel route: the registry's one cancel, with the request's
        correlation id."""
        return await self.registry.cancel(job_ids, correlation_id=correlation_id(request), **how)

    async def no_such_job(self, request: Request) -> Response:
        raise _no_job(request.path_params["job_id"])

    async def stream(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        after = _last_event_id(request)
        await self.registry.job(job_id)
        return _event_stream(self._events(job_id, after))

    async def _events(self, job_id: str, after: int) -> AsyncIterator[str]:
        async for batch in self.jobs.follow(job_id, after):
            yield "".join(_wire(item) for item in batch)


def _event_stream(frames: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        frames,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _wire(item: Item) -> str:
    if isinstance(item, Idle):
        return sse.KEEPALIVE
    if isinstance(item, End):
        return sse.sentinel(item.state, item.error)
    return sse.event(item)


def _last_event_id(request: Request) -> int:
    """``Last-Event-ID`` (or ``?last_event_id=``, for clients that cannot set headers); 0 if
    neither is given."""
    raw = request.headers.get("last-event-id") or _query(request, "last_event_id")
    return 0 if raw is None else _count(raw, "Last-Event-ID")


def check_job_id(value: str) -> str:
    """``value`` if it has the job-id form; else no job has it (``JobNotFound``, a 404)."""
    if not is_job_id(value):
        raise _no_job(value)
    return value


def _no_job(value: str) -> JobNotFound:
    return JobNotFound(f"no job {value[:80]!r}: job ids look like 'job-<uuid>'")


def _count(raw: str, what: str) -> int:
    if not _COUNT.fullmatch(raw):
        raise InvalidRequest(f"{what} must be a non-negative integer of 1 to 18 ASCII digits")
    return int(raw)


def _query(request: Request, name: str) -> str | None:
    """The query parameter ``name``; None if absent or empty (a form's "any"); given more
    than once is a 422."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidRequest(f"give the query parameter {name!r} at most once")
    return values[0] or None if values else None


class CorrelationIds:
    """Takes ``X-Correlation-Id`` from the request (or makes one) and echoes it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(CID_HEADER.encode(), b"").decode("latin-1")
        cid = given if _CID_OK.fullmatch(given) else new_correlation_id()
        scope.setdefault("state", {})["correlation_id"] = cid

        async def send_with_cid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (CID_HEADER.encode(), cid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cid)


class JobIdConvertor(Convertor[str]):
    """``{job_id:job}`` in a route's path: only the job-id form matches."""

    regex = JOB_ID.pattern

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class RestConvertor(JobIdConvertor):
    """``{name:rest}``: the rest of the path, whatever it holds (a newline too)."""

    regex = r"[\s\S]*"


register_url_convertor("job", JobIdConvertor())
register_url_convertor("rest", RestConvertor())


def build_app(config: Config, registry: Any, jobs: JobStream | None = None) -> ASGIApp:
    """The ingress's ASGI app on ``registry`` (an actor handle), answering through ``jobs``
    when given (the Serve handles' own: one queue of words to the registry)."""
    api = Api(config, jobs or JobStream(config, Registry(registry)))
    starlette = Starlette(routes=api.routes(), exception_handlers=EXCEPTION_HANDLERS)
    starlette.router.redirect_slashes = False  # a redirect would be built from the Host header
    return CorrelationIds(guarded(starlette, config.server, api.shapes))


__all__ = ["Api", "RbeeError", "build_app"]
