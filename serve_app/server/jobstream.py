"""The ingress side of the registry: submit jobs and follow their events (long polls)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError
from starlette.requests import Request

from actors.core.config import Config
from actors.core.errors import (
    BodyTooLarge,
    InvalidRequest,
    JobCancelled,
    JobFinished,
    JobNotFound,
    MalformedBody,
    RbeeError,
    WorkerDied,
    error_from,
)
from actors.core.events import Result, StreamEvent
from actors.core.operations import OPERATION_NAMES
from actors.core.table import JobState, Lease
from actors.naming import NAMESPACE
from actors.registry_client import RETRY_S, CancelAnswer, Registry

log = logging.getLogger("rbee.jobstream")

TERMINAL = frozenset(s.value for s in JobState if s.terminal)
_PAGE = 1000
REGISTRY_BACK_S = 60.0
"""How long a follower waits for a registry that died to come back (Ray restarts it)."""

MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects a body may have (SPEC §7)."""
MAX_NUMBER_CHARS = 100
"""The longest number a body may spell: ``int()`` of a long one is slow, and fails past 4300
digits; no field of ours needs more than 20."""
_DIGITS = re.compile(r"[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class End:
    """The end of a job's stream: its final state and, if it failed, its error."""

    state: str
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing new within the keep-alive period."""


IDLE = Idle()
Item = StreamEvent | End | Idle


class JobStream:
    def __init__(self, config: Config, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self._handles: dict[str, Any] = {}

    async def read_json(self, request: Request) -> Any:
        """The body as strict JSON (``parse_json``), refusing bodies over the limit before
        reading them."""
        limit = self.config.server.max_body_bytes
        # Only ASCII digits (``isdigit`` passes '²'); a length of many digits is over any limit.
        declared = request.headers.get("content-length", "").lstrip("0")
        if _DIGITS.fullmatch(declared) and (len(declared) > 18 or int(declared) > limit):
            raise BodyTooLarge(f"the body is over the {limit}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body is over the {limit}-byte limit")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    async def submit(self, request: Request, body: Any) -> str:
        record = await self.registry.submit(body, correlation_id=correlation_id(request))
        return str(record["job_id"])

    async def follow(self, job_id: str, after: int = 0) -> AsyncGenerator[list[Item], None]:
        """The job's events after ``after``, live, in lists, then its ``End``.

        Events come from the registry, except while an actor runs the job: they are then
        taken from that actor as they are made (``watch``), and the registry, which gets
        them in bulk, is asked again once the actor's part is over (or if it cannot serve
        them). An ``Idle`` marks each keep-alive period without news.

        A registry that dies mid-stream is waited for (keep-alives go on meanwhile): it comes
        back with the job ended (a job it was running fails ``WORKER_DIED``), and the stream
        ends with that. One that does not come back within ``REGISTRY_BACK_S`` ends it
        ``[ERROR]`` too: a stream never just breaks off.
        """
        poll_s = self.config.server.keepalive_s
        lost_at: float | None = None
        live = 0  #: the first id of the lease last followed live
        while True:
            try:
                page = await self.registry.events(job_id, after=after, poll_s=poll_s, live=live)
                events, state, lease = page.events, page.state, page.lease
                if state in TERMINAL and len(events) < _PAGE:
                    record = await self.registry.job_now(job_id)
            except RayActorError as exc:
                now = asyncio.get_running_loop().time()
                lost_at = now if lost_at is None else lost_at
                if now - lost_at > REGISTRY_BACK_S:
                    log.error("the registry did not come back for %s: %r", job_id, exc)
                    yield [_lost("the job registry died and did not come back")]
                    return
                await asyncio.sleep(RETRY_S)
                yield [IDLE]
                continue
            except JobNotFound:
                if lost_at is None:
                    raise
                yield [_lost("the job registry restarted without this job")]
                return
            lost_at = None
            batch: list[Item] = list(events)
            if events:
                after = events[-1].id
            if state in TERMINAL and len(events) < _PAGE:
                batch.append(End(state, record["error"]))
                yield batch
                return
            if lease is not None and lease.first_id > live and after >= lease.first_id - 1:
                live = lease.first_id
                if batch:
                    yield batch
                async for taken in self._watch(lease, job_id, after, poll_s):
                    if taken:
                        after = taken[-1].id
                        yield list(taken)
                    else:
                        yield [IDLE]
                continue
            yield batch or [IDLE]

    async def _watch(
        self, lease: Lease, job_id: str, after: int, idle_s: float
    ) -> AsyncIterator[list[StreamEvent]]:
        """The job's events from the actor running it, live, until its part is over; an
        empty list for each ``idle_s`` without any. Ends quietly if the actor cannot give
        them (it is gone, or the watcher is too far behind): the registry has them all."""
        try:
            actor = await self._actor(lease.actor)
        except ValueError:
            return
        stream = actor.watch.remote(job_id, after)
        queue: asyncio.Queue[list[StreamEvent] | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for ref in stream:
                    queue.put_nowait(await ref)
            except RayError as exc:
                log.info("live events of %s from %s ended: %r", job_id, lease.actor, exc)
                self._handles.pop(lease.actor, None)
            finally:
                queue.put_nowait(None)

        pumping = asyncio.get_running_loop().create_task(pump())
        try:
            while True:
                try:
                    taken = await asyncio.wait_for(queue.get(), idle_s)
                except TimeoutError:
                    yield []
                    continue
                if taken is None:
                    return
                yield taken
        finally:
            if not pumping.done():
                pumping.cancel()
                ray.cancel(stream)

    async def _actor(self, name: str) -> Any:
        """An actor's handle by name, looked up once (the lookup blocks: off the loop)."""
        handle = self._handles.get(name)
        if handle is None:
            handle = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
            self._handles[name] = handle
        return handle

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[StreamEvent]:
        """The job's events after ``after``, live, until it ends: returns if it completed,
        raises its error if it failed and ``JobCancelled`` if it was cancelled (as the HTTP
        client's ``stream`` does on the sentinel)."""
        async for batch in self.follow(job_id, after):
            for item in batch:
                if isinstance(item, StreamEvent):
                    yield item
                elif isinstance(item, End):
                    raise_end(job_id, item)

    async def result(self, job_id: str) -> dict[str, Any]:
        """Wait for the job; its result, or its error raised as ours."""
        result: dict[str, Any] = {}
        async for item in self.events(job_id):
            if isinstance(item.event, Result):
                result = item.event.value
        return result

    async def models(self) -> list[dict[str, Any]]:
        return await self.registry.models()


def check_listing(state: Any, operation: Any, limit: Any) -> None:
    """The filters of a job listing, or ``InvalidRequest`` naming the one that is wrong."""
    if state is not None and state not in {s.value for s in JobState}:
        raise InvalidRequest(f"state must be one of {[s.value for s in JobState]}")
    if operation is not None and operation not in OPERATION_NAMES:
        raise InvalidRequest(f"operation must be one of {sorted(OPERATION_NAMES)}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise InvalidRequest("limit must be between 1 and 10000")


def check_cancelled(job_id: str, answer: CancelAnswer) -> None:
    """The registry's answer to the cancel of one job it waited for: ``JobNotFound`` if it
    does not know the job, ``JobFinished`` if the job had ended before the cancel."""
    if answer.unknown:
        raise JobNotFound(f"no job {job_id!r}")
    if not answer.ended:
        raise JobFinished(f"job {job_id!r} had already finished")


def raise_end(job_id: str, end: End) -> None:
    """Return if the job completed; else raise its error (``JobCancelled`` if cancelled)."""
    error = end.error or {}
    if end.state == JobState.CANCELLED.value:
        raise JobCancelled(error.get("message") or f"job {job_id} was cancelled")
    if end.state != JobState.COMPLETED.value:
        message = error.get("message") or f"job {job_id} failed"
        raise error_from(
            str(error.get("code", RbeeError.code)),
            message,
            retriable=error.get("retriable"),
            param=error.get("param"),
        )


def _lost(message: str) -> End:
    error = {"code": WorkerDied.code, "message": message, "retriable": True}
    return End(JobState.FAILED.value, error)


def parse_json(raw: bytes) -> Any:
    """Strict JSON, or ``MalformedBody``: no NaN or Infinity, no number longer than
    ``MAX_NUMBER_CHARS``, no nesting deeper than ``MAX_JSON_DEPTH``, no lone surrogate."""
    try:
        value = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:  # json's own C parser recurses: far deeper than our limit
        raise MalformedBody(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None
    _check_tree(value)
    return value


def _int(text: str) -> int:
    _check_length(text)
    return int(text)


def _float(text: str) -> float:
    _check_length(text)
    number = float(text)
    if not math.isfinite(number):
        raise MalformedBody(f"the number {text} is out of range")
    return number


def _constant(text: str) -> float:
    raise MalformedBody(f"{text} is not a JSON number")


def _check_length(text: str) -> None:
    if len(text) > MAX_NUMBER_CHARS:
        raise MalformedBody(f"a number in the body is longer than {MAX_NUMBER_CHARS} characters")


def _check_tree(value: Any) -> None:
    """Walk the parsed body without recursion: nesting depth and text."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            # A lone surrogate is no character: it cannot be encoded, stored or echoed.
            if _SURROGATE.search(item):
                raise MalformedBody("the body holds a lone surrogate (\\ud800-\\udfff)")
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise MalformedBody(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
            children = [*item, *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def correlation_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("correlation_id") or new_correlation_id())


def new_correlation_id() -> str:
    return f"cid-{uuid.uuid4().hex[:16]}"
