"""OpenAI's Responses API read back from the job records (SPEC §6): a response is a job (its
id the job's), and what the Responses API shows of it is what the job's record holds.

``POST /v1/responses`` is one of the worker routes (``serve_app.server.openai``); here are
the routes that read a response back: ``GET /v1/responses/{id}`` (with ``stream=true``, a
background response's events after ``starting_after``, then live to its end), its
``/input_items``,
``POST /v1/responses/{id}/cancel``, a cancel of its job, and ``DELETE`` (the job is
forgotten, here and on disk). The records outlive a restart of the server, and so do the
responses; they are kept and forgotten as jobs are (``retain_jobs``). A response made with
``store: false`` is not read back, as on OpenAI's; a job of another API is no response.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from actors.core.errors import InvalidRequest, NotFound, RbeeError, error_from
from actors.core.events import Error, Result, StreamEvent, Token
from actors.core.table import JOB_ID
from serve_app import sse
from serve_app.server.jobstream import IDLE, JobStream, correlation_id

#: A job's state as a response's status.
_STATUS = {
    "queued": "queued",
    "running": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


class StoredResponses:
    """The routes that read a response from its job's record."""

    def __init__(self, jobs: JobStream) -> None:
        self._jobs = jobs
        self._registry = jobs.registry

    def queued(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """A background response as it is answered at once: queued, its job submitted."""
        return {
            "id": job_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": body.get("model"),
            "status": "queued",
            "background": True,
            "output": [],
            "usage": None,
            "error": None,
        }

    def events(self, job_id: str, after: int = -1) -> StreamingResponse:
        """A background response's events whose sequence number is after ``after``, then
        live to its end (a client that goes away leaves it running)."""
        return StreamingResponse(
            self._replay(job_id, after),
            media_type="text/event-stream",
            headers={"X-Job-Id": job_id, "Cache-Control": "no-cache"},
        )

    async def _replay(self, job_id: str, after: int) -> AsyncIterator[str]:
        last = after
        async with contextlib.aclosing(self._jobs.follow(job_id)) as events:
            async for batch in events:
                out: list[str] = []
                for item in batch:
                    if item is IDLE:
                        out.append(sse.KEEPALIVE)
                    event = item.event if isinstance(item, StreamEvent) else None
                    if isinstance(event, Token) and event.wire is not None:
                        text = event.wire
                    elif isinstance(event, Result):
                        text = str(event.value.get("tail") or "")
                    elif isinstance(event, Error):
                        text = _error_frame(event, last + 1)
                    else:
                        continue
                    for number, frame in _frames(text):
                        if number is None or number > last:
                            out.append(frame)
                            last = number if number is not None else last
                if out:
                    yield "".join(out)

    async def stored(self, response_id: str, param: str = "response_id") -> dict[str, Any]:
        """What a later request needs of a stored response that completed: the response and
        the messages that led to it (``previous_response_id``)."""
        record = await self._record(response_id, param)
        kept = _kept(record)
        if kept is None or kept.get("response") is None:
            raise _not_found(response_id, param)
        return {"response": kept["response"], "messages": kept.get("messages")}

    async def retrieve(self, request: Request) -> Response:
        """A response as it stands: the whole of it once its job completed; its status (and
        error) while it runs or after it failed or was cancelled."""
        response_id = request.path_params["response_id"]
        record = await self._record(response_id)
        if request.query_params.get("stream", "false").lower() != "true":
            return JSONResponse(_as_response(record))
        if not record.get("background"):
            message = "only a background response's events are kept to be streamed again"
            raise InvalidRequest(message, param="stream")
        after = request.query_params.get("starting_after", "-1")
        try:
            starting_after = int(after)
        except ValueError:
            raise InvalidRequest(
                f"starting_after: not an integer: {after!r}", param="starting_after"
            ) from None
        return self.events(response_id, starting_after)

    async def input_items(self, request: Request) -> Response:
        """The input a response was given, as OpenAI lists it."""
        response_id = request.path_params["response_id"]
        kept = _kept(await self._record(response_id))
        if kept is None:
            raise _not_found(response_id)
        items = _items(kept.get("input"), response_id)
        if request.query_params.get("order", "desc") == "desc":
            items.reverse()
        data = {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
        return JSONResponse(data)

    async def delete(self, request: Request) -> Response:
        """Forget a response (its job: record, events, line on disk); one still running is
        cancelled first."""
        response_id = request.path_params["response_id"]
        record = await self._record(response_id)
        if record["state"] in ("queued", "running"):
            cid = correlation_id(request)
            await self._registry.cancel([response_id], correlation_id=cid, wait=True)
        if not await self._registry.forget(response_id):
            raise InvalidRequest(f"response {response_id} has not ended", param="response_id")
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def cancel(self, request: Request) -> Response:
        """The cancel of the response's job, with the guarantees of any cancel; the response
        as it then stands (``cancelled``). One that had already completed cannot be
        (vLLM's words)."""
        response_id = request.path_params["response_id"]
        record = await self._record(response_id)
        if record["state"] == "completed":
            raise InvalidRequest("Cannot cancel a synchronous response.", param="response_id")
        if record["state"] in ("queued", "running"):
            cid = correlation_id(request)
            await self._registry.cancel([response_id], correlation_id=cid, wait=True)
            record = await self._record(response_id)
        return JSONResponse(_as_response(record))

    async def _record(self, response_id: str, param: str = "response_id") -> dict[str, Any]:
        if not JOB_ID.fullmatch(response_id):
            raise _not_found(response_id, param)
        try:
            record = await self._registry.job(response_id, request=True)
        except NotFound:
            raise _not_found(response_id, param) from None
        call = (record.pop("request", None) or {}).get("openai") or {}
        if record.get("operation") != "infer" or call.get("api") != "responses":
            raise _not_found(response_id, param)  # a job, but of another API
        record["model"] = call.get("request", {}).get("model")
        record["background"] = call.get("request", {}).get("background") is True
        result = record.get("result")
        if isinstance(result, dict) and result.get("stored") is False:
            raise _not_found(response_id, param)  # ``store: false``: not kept to be read
        return record


def _kept(record: dict[str, Any]) -> dict[str, Any] | None:
    """What a completed response's job keeps of it (None: not a response, or not over)."""
    result = record.get("result")
    if not isinstance(result, dict) or "stored" not in result:
        return None
    response = result.get("response") or result.get("answer")
    return {**result, "response": response}


def _as_response(record: dict[str, Any]) -> dict[str, Any]:
    kept = _kept(record)
    if kept is not None and kept.get("response") is not None:
        return dict(kept["response"])
    if record["state"] == "completed":  # (a record from before responses were kept)
        raise _not_found(record["job_id"])
    error = record.get("error")
    return {
        "id": record["job_id"],
        "object": "response",
        "created_at": int(record["created_at"]),
        "model": record.get("model"),
        "status": _STATUS.get(record["state"], record["state"]),
        "output": [],
        "usage": None,
        "error": {"code": error.get("code"), "message": error.get("message")} if error else None,
    }


def _items(given: Any, response_id: str) -> list[dict[str, Any]]:
    """A request's ``input`` as items: a string is one message of the user's."""
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    items = []
    for n, item in enumerate(given if isinstance(given, list) else []):
        item = dict(item) if isinstance(item, dict) else {"value": item}
        if isinstance(item.get("content"), str):
            item["content"] = [{"type": "input_text", "text": item["content"]}]
        item.setdefault("type", "message")
        item.setdefault("id", f"msg_{response_id}_{n}")
        items.append(item)
    return items


def _frames(text: str) -> list[tuple[int | None, str]]:
    """The SSE frames of ``text`` (read as every SSE is here, ``serve_app.sse``), each with
    its sequence number (None for one without)."""
    parser = sse.Parser()
    out: list[tuple[int | None, str]] = []
    for line in text.split("\n"):
        frame = parser.feed(line)
        if frame is None:
            continue
        try:
            number = json.loads(frame.data).get("sequence_number")
        except (ValueError, AttributeError):
            number = None
        written = (
            f"event: {frame.kind}\ndata: {frame.data}\n\n" if frame.kind else sse.data(frame.data)
        )
        out.append((number if isinstance(number, int) else None, written))
    return out


def _error_frame(event: Error, number: int) -> str:
    """How a response's stream ends when its job did not complete: OpenAI's ``error`` event."""
    exc = error_from(event.code, event.message, retriable=event.retriable, param=event.param)
    data: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
    data.update(param=exc.param, sequence_number=number)
    return f"event: error\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _not_found(response_id: str, param: str = "response_id") -> RbeeError:
    return NotFound(f"Response with id '{response_id}' not found.", param=param)
