"""The ingress side of the registry: submit jobs and follow their events (long polls)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from actors.config import Config
from actors.core import JobState
from actors.errors import BodyTooLarge, MalformedBody, RbeeError, error_class, rbee_cause

TERMINAL = frozenset(s.value for s in JobState if s.terminal)
_PAGE = 1000


async def remote(ref: Any) -> Any:
    """Await a Ray call; our errors raised inside an actor come back as themselves."""
    try:
        return await ref
    except Exception as exc:
        cause = rbee_cause(exc)
        if cause is not None and cause is not exc:
            raise cause from None
        raise


@dataclass(frozen=True, slots=True)
class Item:
    """One event of a job, or (``kind == "end"``) its end: ``data`` has state and error."""

    seq: int
    kind: str
    data: dict[str, Any]


class JobStream:
    def __init__(self, config: Config, registry: Any) -> None:
        self.config = config
        self.registry = registry

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refusing bodies over the limit before reading them."""
        limit = self.config.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the body is over the {limit}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body is over the {limit}-byte limit")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedBody(f"the body is not valid JSON: {exc}") from None

    async def submit(self, request: Request, body: Any) -> str:
        record = await remote(self.registry.submit.remote(body, correlation_id(request)))
        return str(record["job_id"])

    async def follow(self, job_id: str, after: int = 0) -> AsyncIterator[list[Item]]:
        """The job's events after ``after``, live, in batches, then one ``end`` item.

        A poll that finds nothing within the keep-alive period yields an ``idle`` item.
        """
        poll_s = self.config.server.keepalive_s
        while True:
            events, state = await remote(self.registry.events.remote(job_id, after, poll_s))
            batch = [Item(seq, kind, data) for seq, kind, data in events]
            if batch:
                after = batch[-1].seq
            elif state not in TERMINAL:
                batch.append(Item(after, "idle", {}))
            if state in TERMINAL and len(events) < _PAGE:
                record = await remote(self.registry.job.remote(job_id))
                batch.append(Item(after, "end", {"state": state, "error": record["error"]}))
                yield batch
                return
            yield batch

    async def result(self, job_id: str) -> dict[str, Any]:
        """Wait for the job; its result, or its error raised as ours."""
        result: dict[str, Any] = {}
        async for batch in self.follow(job_id):
            for item in batch:
                if item.kind == "result":
                    result = item.data
                elif item.kind == "end":
                    error = item.data["error"]
                    if item.data["state"] != JobState.COMPLETED.value and error:
                        cls = error_class(error["code"]) or RbeeError
                        raise cls(error["message"])
        return result

    def cancel_soon(self, job_id: str, cid: str | None = None) -> None:
        """Ask for a cancel without waiting (safe inside cleanup of a cancelled task)."""
        self.registry.request_cancel.remote(job_id, cid)

    async def models(self) -> list[str]:
        return list(await remote(self.registry.models.remote()))


def correlation_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("correlation_id") or new_correlation_id())


def new_correlation_id() -> str:
    return f"cid-{uuid.uuid4().hex[:16]}"
