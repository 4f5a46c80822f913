"""Running jobs: a queue with per-operation concurrency limits, event fan-in, and cancel.

``Jobs`` knows nothing of Ray. It asks a ``Backend`` to start an operation (an async iterator
of typed events) and to stop it; the registry actor plugs in the Ray backend, tests can plug
in anything that speaks the protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from actors.core import logs
from actors.core.errors import (
    InternalError,
    JobCancelled,
    JobNotFound,
    RbeeError,
    WorkerDied,
    rbee_cause,
)
from actors.core.events import Error, Event, Narration, Packed, Result, StreamEvent, unpack
from actors.core.logs import context
from actors.core.operations import Operation
from actors.core.running import Stop
from actors.core.table import IllegalTransition, JobRecord, JobState, JobTable

log = logging.getLogger("rbee.jobs")

ACTOR = "registry"

EARLY_ENDS = 1000
"""The most ends kept for jobs whose adoption has not come yet."""

Lease = Callable[[str], Awaitable[int]]
"""Called by a backend with the name of the actor about to run a job: that actor numbers the
job's events from the id it returns, until the job's events end."""


@dataclass(frozen=True, slots=True)
class Adoption:
    """A job the ingress gave straight to ``actor`` (an OpenAI request to a worker)."""

    job_id: str
    request: dict[str, Any]
    correlation_id: str
    actor: str
    created_at: float

    @property
    def operation(self) -> str:
        return str(self.request["operation"])  # (the ingress parsed the request)


@dataclass(frozen=True, slots=True)
class Ending:
    """The end of an adopted job: its events (packed: ``events.pack``) and state; with its
    ``adoption`` when the ingress sends it, so a registry that restarted meanwhile (and
    never heard of the job) records it all the same."""

    job_id: str
    events: Packed
    state: JobState
    adoption: Adoption | None = None


class Backend(Protocol):
    def start(
        self, record: JobRecord, op: Operation, lease: Lease
    ) -> AsyncIterator[Event | list[StreamEvent]]:
        """Begin the work; iterate for its events: the backend's own, one at a time, and the
        numbered ones of the actor it leased the job to, in lists."""
        ...

    async def stop(
        self, record: JobRecord, stop: Stop, actor: str | None = None
    ) -> dict[str, Any] | None:
        """Stop running work and wait until it has cleaned up; None if no actor was running
        it yet. ``actor``: the one an adopted job runs on (``Jobs.adopt``); its answer's
        ``events`` are the job's events it numbered.

        ``stop`` goes to the actor: it reports its last output relative to
        ``stop.accepted_at``, and waits for the job's cleanup until ``stop.deadline``. The
        call is cancelled at that deadline if it has not returned by then.
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
        """``cleanup_s``: the one bound of a cancel, from its acceptance to the job's end
        (the actor's cleanup and the last events' way here included)."""
        self.table = table
        self._backend = backend
        self._slots = {op: asyncio.Semaphore(n) for op, n in (limits or {}).items()}
        self._cleanup_s = cleanup_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Task[bool]] = {}
        self._on_terminal = on_terminal
        self._adopted: dict[str, str] = {}  #: job -> the actor it runs on, till it ends
        #: ends that came before their job's adoption (a worker's and an ingress's calls
        #: are not ordered): the adoption closes the job at once
        self._early: OrderedDict[str, Ending] = OrderedDict()

    def submit(self, op: Operation, request: dict[str, Any], correlation_id: str) -> JobRecord:
        """Create the job and start driving it; returns at once."""
        record = self.table.create(op.operation, request, correlation_id)
        self._tasks[record.job_id] = asyncio.create_task(self._drive(record, op))
        return record

    async def adopt(self, adoption: Adoption) -> JobRecord | None:
        """A job already running on its actor: nothing here drives it. Its record is
        running, its events leased to that actor from the first id, and its end comes with
        ``close``; None if its end came first (it is recorded then)."""
        if adoption.job_id in self.table:
            return None
        record = self.table.create(
            adoption.operation, adoption.request, adoption.correlation_id, adoption.job_id,
            created_at=adoption.created_at,
        )  # fmt: skip
        await self.table.transition(adoption.job_id, JobState.RUNNING)
        await self.table.lease(adoption.job_id, adoption.actor)
        self._adopted[adoption.job_id] = adoption.actor
        early = self._early.pop(adoption.job_id, None)
        if early is not None:
            await self.close(early)
        return record

    async def close(self, ending: Ending) -> None:
        """The end of an adopted job, as the ingress (or the worker, when the answer
        stopped before its end) saw it. A job that ended here already keeps its end; one
        never adopted here (a restart in between) is recorded from ``ending.adoption``."""
        job_id = ending.job_id
        if job_id not in self.table:
            if ending.adoption is None:  # its adoption is on its way
                self._early[job_id] = ending
                while len(self._early) > EARLY_ENDS:
                    self._early.popitem(last=False)
                return
            await self.adopt(ending.adoption)
        record = self.get(job_id)
        if record.state.terminal or job_id in self._cancels:
            return
        self._adopted.pop(job_id, None)
        await self.table.record_events(job_id, unpack(ending.events))
        await self.table.release(job_id)
        if ending.state is JobState.CANCELLED:
            self.table.cancel_requested(job_id)
            cid = record.correlation_id
            gone = Narration(ACTOR, "cancel", "the client went away", correlation_id=cid)
            await self.table.emit(job_id, gone)
            await self._end_cancelled(record, cid, "stopped as the client went away")
            return
        await self._finish(record, ending.state)

    async def actor_gone(self, actor: str) -> None:
        """Fail every adopted job of an actor that died (``WORKER_DIED``, retriable)."""
        error = WorkerDied(f"{actor} died while running the job")
        for job_id in [j for j, a in self._adopted.items() if a == actor]:
            record = self.table.get(job_id)
            if record is None or record.state.terminal:
                self._adopted.pop(job_id, None)
                continue
            await self.table.release(job_id)
            await self.table.emit(job_id, Error(**error.to_dict()))
            self._adopted.pop(job_id, None)
            await self._finish(record, JobState.FAILED)

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
        accepted, stop = time.monotonic(), Stop.within(self._cleanup_s)
        self.table.cancel_requested(record.job_id)
        was, drive = record.state, self._tasks.get(record.job_id)
        if was is JobState.QUEUED and drive is not None:
            drive.cancel()  # at once: a job waiting for its slot never starts
        await self.table.emit(
            record.job_id,
            Narration(ACTOR, "cancel", f"cancel requested while {was.value}", correlation_id=cid),
        )
        detail, stopped = "", None
        if was is JobState.RUNNING:
            adopted = self._adopted.pop(record.job_id, None)
            try:
                async with asyncio.timeout(stop.left_s()):
                    stopped = await self._backend.stop(record, stop, adopted)
                detail = _describe_stop(stopped or {})
                if stopped and stopped.get("events"):  # packed (``events.pack``)
                    await self.table.record_events(record.job_id, unpack(stopped["events"]))
            except TimeoutError:
                detail = f"; cleanup did not confirm within {self._cleanup_s:g}s"
            except Exception as exc:  # the worker may have died; the job still ends
                detail = f"; stop failed: {exc!r}"
        if drive is not None and not drive.done():
            if stopped is not None:  # the actor stopped: its last events are on their way
                await asyncio.wait({drive}, timeout=stop.left_s())
            if not drive.done():
                drive.cancel()
            await asyncio.gather(drive, return_exceptions=True)
        if record.state.terminal:
            return False
        await self.table.release(record.job_id)
        took_ms = (time.monotonic() - accepted) * 1000
        log.info("cancelled in %.0f ms", took_ms, extra={"rbee_job": context(record.job_id, cid)})
        await self._end_cancelled(record, cid, f"cancelled in {took_ms:.0f} ms{detail}")
        return True

    async def _end_cancelled(self, record: JobRecord, cid: str | None, said: str) -> None:
        await self.table.emit(
            record.job_id, Narration(ACTOR, "cancel_complete", said, correlation_id=cid)
        )
        error = JobCancelled("cancelled on request")
        await self.table.emit(record.job_id, Error(**error.to_dict()))
        await self._finish(record, JobState.CANCELLED)

    async def _drive(self, record: JobRecord, op: Operation) -> None:
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

    async def _run(self, record: JobRecord, op: Operation) -> None:
        if record.state.terminal:
            return
        job_id = record.job_id
        await self.table.transition(job_id, JobState.RUNNING)
        failed: dict[str, Any] | None = None
        raised: Exception | None = None
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
        except Exception as exc:  # the job's failure (a cancel, BaseException, unwinds)
            raised = exc
        # The cancel flag, read here only: a job its cancel stopped (by whatever error) is
        # ended by the cancel's path.
        if record.cancel_requested and (raised or failed or not result):
            return
        if raised is not None:
            failed = raised.to_dict() if isinstance(raised, RbeeError) else _unexpected(raised)
            await self.table.emit(job_id, Error(**failed))
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
    said = ""
    for key, what in (
        ("last_write_after_cancel_s", "byte written"),
        ("last_token_after_cancel_s", "token"),
    ):
        if (last := stats.get(key)) is not None:
            said = f"; last {what} {last * 1000:.0f} ms after the cancel"
            break
    if stats.get("cleaned_up") is False:
        said += "; its cleanup had not ended by the deadline"
    return said
