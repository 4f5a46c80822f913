"""The Starlette ingress: jobs, their live event streams, and cancel (SPEC §3-5, §7)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.config import Config
from actors.core.errors import InvalidRequest, RbeeError, Unauthorized
from actors.core.table import JobState
from actors.operations import OPERATION_NAMES, check_id
from serve_app import sse
from serve_app.server.board import Board, Position
from serve_app.server.errors import EXCEPTION_HANDLERS, error_body
from serve_app.server.jobstream import (
    End,
    Idle,
    Item,
    JobStream,
    check_cancelled,
    check_listing,
    correlation_id,
    new_correlation_id,
    read,
    remote,
)
from serve_app.server.openai import OpenAi
from serve_app.server.page import page_routes

log = logging.getLogger("rbee.http")

CID_HEADER = "x-correlation-id"
# Every pattern here is used with ``fullmatch``: ``$`` would also match before a final newline.
_CID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BEARER = re.compile(r"[ \t]*bearer[ \t]+([^ \t]+)[ \t]*", re.IGNORECASE | re.ASCII)
# ASCII digits only (``str.isdigit`` passes '²' and other scripts' digits), few enough that
# ``int()`` is cheap and the value fits in 64 bits.
_COUNT = re.compile(r"[0-9]{1,18}")

Handler = Callable[[Request], Awaitable[Response]]
_HEALTH_DETAIL_S = 1.0


class Api:
    """The routes, bound to one registry handle and one config."""

    def __init__(self, config: Config, registry: Any) -> None:
        self.config = config
        self.registry = registry
        self.jobs = JobStream(config, registry)
        self.board = Board(config, registry)
        token = config.server.api_token
        self._token = token.get_secret_value().encode() if token else None

    def routes(self) -> list[BaseRoute]:
        guard = self._guard
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/jobs", guard(self.submit), methods=["POST"]),
            Route("/v1/jobs/cancel", guard(self.cancel_many), methods=["POST"]),
            Route("/v1/jobs", guard(self.list_jobs), methods=["GET"]),
            Route("/v1/jobs/watch", guard(self.watch), methods=["GET"]),
            Route("/v1/hives", guard(self.hives), methods=["GET"]),
            Route("/v1/jobs/{job_id}", guard(self.get_job), methods=["GET"]),
            Route("/v1/jobs/{job_id}", guard(self.delete_job), methods=["DELETE"]),
            Route("/v1/jobs/{job_id}/stream", guard(self.stream), methods=["GET"]),
            Route("/v1/jobs/{job_id}/cancel", guard(self.cancel_job), methods=["POST"]),
            Route("/cancel", guard(self.cancel_body), methods=["POST"]),
            *OpenAi(self.jobs).routes(guard),
            *page_routes(),  # the page holds no data: what it shows comes through the API
        ]

    def _guard(self, handler: Handler) -> Handler:
        if self._token is None:
            return handler
        expected = self._token

        async def guarded(request: Request) -> Response:
            given = _bearer_token(request.headers.get("authorization", ""))
            if given is None or not hmac.compare_digest(given, expected):
                raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")
            return await handler(request)

        return guarded

    async def health(self, request: Request) -> Response:
        """200 once jobs can be taken; how the preloads stand rides along, never holding it up
        (a preload that failed is reported here and the server keeps serving)."""
        await remote(self.registry.ready.remote())
        body: dict[str, Any] = {"status": "ok"}
        try:
            body["preload"] = await asyncio.wait_for(
                remote(self.registry.preloads.remote()), _HEALTH_DETAIL_S
            )
        except Exception as exc:  # a hive busy or gone: health stays about taking jobs
            log.info("health: preload states unavailable: %r", exc)
        return JSONResponse(body)

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
        jobs = await read(lambda: self.registry.jobs.remote(state, operation, limit))
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
        return JSONResponse({"hives": await remote(self.registry.hives.remote())})

    async def get_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        return JSONResponse(await read(lambda: self.registry.job.remote(job_id)))

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
        if not isinstance(job_id, str):
            raise InvalidRequest("'job_id' must be a non-empty string")
        await self._cancel(request, [check_id(job_id, "job_id")])
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
            check_id(job_id, "each of 'job_ids'")
        if state not in (None, JobState.QUEUED.value, JobState.RUNNING.value):
            raise InvalidRequest("'state' must be 'queued' or 'running'")
        # Not ``in OPERATION_NAMES`` first: a list or an object is unhashable.
        if operation is not None and (
            not isinstance(operation, str) or operation not in OPERATION_NAMES
        ):
            raise InvalidRequest(f"operation must be one of {sorted(OPERATION_NAMES)}")
        answer = await self._cancel(request, job_ids, state=state, operation=operation)
        return JSONResponse({"status": "cancelling", **answer}, 202)

    async def _cancel(
        self, request: Request, job_ids: list[str] | None, **how: Any
    ) -> dict[str, list[str]]:
        """Behind every cancel route: the registry's one cancel, with the request's
        correlation id."""
        cid = correlation_id(request)
        return dict(await remote(self.registry.cancel.remote(job_ids, cid, **how)))

    async def stream(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        after = _last_event_id(request)
        await read(lambda: self.registry.job.remote(job_id))
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


def _bearer_token(header: str) -> bytes | None:
    """The token of ``Authorization: Bearer <token>`` (the scheme in any case, RFC 7235), as
    the bytes sent; None for anything else."""
    found = _BEARER.fullmatch(header)
    # Starlette decodes header values as latin-1: encoding back gives the very bytes sent.
    return found.group(1).encode("latin-1") if found else None


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


class LoopbackOnly:
    """Answers only this machine's clients (403 to others): a server set to listen on
    loopback still has its ingress replica's own port open on every interface under Serve's
    HAProxy ingress, and HAProxy reaches the replica from loopback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] == "http" and client and not is_loopback(str(client[0])):
            message = "this rbee server answers only its own machine (server.host is loopback)"
            await JSONResponse(error_body("FORBIDDEN", message), 403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, ``[::1]``, or a name) is this machine's loopback only."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # another name: it may resolve to any interface
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 (not loopback to Python before 3.13)
    return address.is_loopback


def build_app(config: Config, registry: Any) -> ASGIApp:
    app: ASGIApp = Starlette(
        routes=Api(config, registry).routes(),
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app = CorrelationIds(app)
    return LoopbackOnly(app) if is_loopback(config.server.host) else app


__all__ = ["Api", "RbeeError", "build_app"]
