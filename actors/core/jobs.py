"""Running jobs: a queue with per-operation concurrency limits, event fan-in, and cancel.

``Jobs`` knows nothing of Ray. It asks a ``Backend`` to start an operation (an async iterator
of typed events) and to stop it; the registry actor plugs in the Ray backend, tests can plug
in anything that speaks the protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from actors.core import logs
from actors.core.errors import InternalError, JobCancelled, JobNotFound, RbeeError, rbee_cause
from actors.core.events import Error, Event, Narration, Result, StreamEvent
from actors.core.logs import context
from actors.core.table import IllegalTransition, JobRecord, JobState, JobTable

log = logging.getLogger("rbee.jobs")

ACTOR = "registry"
DRAIN_S = 2.0
"""How long a stopped job's last events may take to come in before its drive is cut."""

Lease = Callable[[str], Awaitable[int]]
"""Called by a backend with the name of the actor about to run a job: that actor numbers the
job's events from the id it returns, until the job's events end."""


class Backend(Protocol):
    def start(
        self, record: JobRecord, op: Any, lease: Lease
    ) -> AsyncIterator[Event | list[StreamEvent]]:
        """Begin the work; iterate for its events: the backend's own, one at a time, and the
        numbered ones of the actor it leased the job to, in lists."""
        ...

    async def stop(self, record: JobRecord, accepted_at: float) -> dict[str, Any] | None:
        """Stop running work and wait (briefly) until it has cleaned up; None if no actor
        was running it yet.

        ``accepted_at`` (wall clock) is when the cancel was accepted: the worker reports its
        last output relative to it.
        """
        ...


class Jobs:
    def __init__(
        self,
        table: JobTable,
        backend: Backend,
        *,
        limits: Mapping[str, int] | None = None,
        cleanup_s: float = 3.0,
        on_terminal: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self.table = table
        self._backend = backend
        self._slots = {op: asyncio.Semaphore(n) for op, n in (limits or {}).items()}
        self._cleanup_s = cleanup_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Task[bool]] = {}
        self._on_terminal = on_terminal

    def submit(self, op: Any, request: dict[str, Any], correlation_id: str) -> JobRecord:
        """Create the job and start driving it; returns at once."""
        record = self.table.create(op.operation, request, correlation_id)
        self._tasks[record.job_id] = asyncio.create_task(self._drive(record, op))
        return record

    def get(self, job_id: str) -> JobRecord:
        record = self.table.get(job_id)
        if record is None:
            raise JobNotFound(f"no job {job_id!r}")
        return record

    async def cancel(self, job_id: str, correlation_id: str | None = None) -> bool:
        """Cancel a queued or running job and wait until it is terminal.

        True when this cancel ended the job; False when it was already terminal (or
        finished on its own first). Concurrent cancels of one job share the same work.
        """
        record = self.table.get(job_id)
        if record is None:
            log.warning("cancel of unknown job", extra={"rbee_job": context(job_id, correlation_id)})
            raise JobNotFound(f"no job {job_id!r}")
        if record.state.terminal:
            return False
        if job_id not in self._cancels:
            self._cancels[job_id] = asyncio.create_task(self._cancel(record, correlation_id))
        return await asyncio.shield(self._cancels[job_id])

    async def _cancel(self, record: JobRecord, correlation_id: str | None) -> bool:
        cid = correlation_id or record.correlation_id
        accepted, accepted_at = time.monotonic(), time.time()
        self.table.cancel_requested(record.job_id)
        was = record.state
        await self.table.emit(
            record.job_id,
            Narration(ACTOR, "cancel", f"cancel requested while {was.value}", correlation_id=cid),
        )
        detail, stopped = "", None
        if was is JobState.RUNNING:
            try:
                stopped = await asyncio.wait_for(
                    self._backend.stop(record, accepted_at), self._cleanup_s
                )
                detail = _describe_stop(stopped or {})
            except TimeoutError:
                detail = f"; cleanup did not confirm within {self._cleanup_s:g}s"
            except Exception as exc:  # the worker may have died; the job still ends
                detail = f"; stop failed: {exc!r}"
        task = self._tasks.get(record.job_id)
        if task is not None and not task.done():
            if stopped is not None:  # the actor stopped: its last events are on their way
                await asyncio.wait({task}, timeout=DRAIN_S)
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if record.state.terminal:
            return False
        await self.table.release(record.job_id)
        took_ms = (time.monotonic() - accepted) * 1000
        log.info("cancelled in %.0f ms", took_ms, extra={"rbee_job": context(record.job_id, cid)})
        await self.table.emit(
            record.job_id,
            Narration(
                ACTOR,
                "cancel_complete",
                f"cancelled in {took_ms:.0f} ms{detail}",
                correlation_id=cid,
            ),
        )
        error = JobCancelled("cancelled on request")
        await self.table.emit(record.job_id, Error(**error.to_dict()))
        await self._finish(record, JobState.CANCELLED)
        return True

    async def _drive(self, record: JobRecord, op: Any) -> None:
        logs.bind(record.job_id, record.correlation_id)  # this task is the job's own
        slot = self._slots.get(record.operation)
        try:
            if slot is not None:
                async with slot:
                    await self._run(record, op)
            else:
                await self._run(record, op)
        finally:  # a cancel ends this task cancelled; ``_cancel`` waits for it
            self._tasks.pop(record.job_id, None)

    async def _run(self, record: JobRecord, op: Any) -> None:
        if record.cancel_requested or record.state.terminal:
            return
        job_id = record.job_id
        await self.table.transition(job_id, JobState.RUNNING)
        failed: dict[str, Any] | None = None
        result = False

        async def lease(actor: str) -> int:
            return await self.table.lease(job_id, actor)

        try:
            try:
                async for item in self._backend.start(record, op, lease):
                    for event in (e.event for e in item) if isinstance(item, list) else (item,):
                        if isinstance(event, Error):
                            failed = {"code": event.code}
                        result = result or isinstance(event, Result)
                    if isinstance(item, list):
                        await self.table.record_events(job_id, item)
                    else:
                        await self.table.emit(job_id, item)
            finally:
                await asyncio.shield(self.table.release(job_id))
        except asyncio.CancelledError:
            raise
        except RbeeError as exc:
            if record.cancel_requested:
                return
            failed = exc.to_dict()
            await self.table.emit(job_id, Error(**failed))
        except Exception as exc:
            if record.cancel_requested:
                return
            failed = _unexpected(exc)
            await self.table.emit(job_id, Error(**failed))
        if record.cancel_requested and (failed or not result):
            return  # stopped by the cancel, whose path speaks for the job from here
        await self._finish(record, JobState.FAILED if failed else JobState.COMPLETED)

    async def _finish(self, record: JobRecord, state: JobState) -> None:
        try:
            await self.table.transition(record.job_id, state)
        except IllegalTransition:
            return
        self._cancels.pop(record.job_id, None)
        if self._on_terminal is not None:
            self._on_terminal(record)


def _unexpected(exc: Exception) -> dict[str, Any]:
    cause = rbee_cause(exc)
    if cause is not None:
        return cause.to_dict()
    log.error("job failed unexpectedly", exc_info=exc)
    inner = getattr(exc, "cause", None) or exc
    first_line = (str(inner).strip().splitlines() or [""])[0][:500]
    return InternalError(f"{type(inner).__name__}: {first_line}").to_dict()


def _describe_stop(stats: dict[str, Any]) -> str:
    for key, what in (
        ("last_write_after_cancel_s", "byte written"),
        ("last_token_after_cancel_s", "token"),
    ):
        if (last := stats.get(key)) is not None:
            return f"; last {what} {last * 1000:.0f} ms after the cancel"
    return ""
