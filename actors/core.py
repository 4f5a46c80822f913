"""Jobs as plain data: states, the transitions between them, records and event logs.

Nothing here knows about Ray; the registry actor owns one ``JobTable`` and drives it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from actors.events import Error, Event, Progress, Result, payload


class JobState(StrEnum):
    QUEUED = "queued"  #: accepted, waiting for a slot; cancelling it means it never starts
    RUNNING = "running"  #: an actor is doing the work
    COMPLETED = "completed"  #: finished and produced its result
    FAILED = "failed"  #: stopped on an error event
    CANCELLED = "cancelled"  #: stopped because somebody asked

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, job_id: str, old: JobState, new: JobState) -> None:
        super().__init__(f"{job_id}: {old.value} -> {new.value} is not allowed")
        self.job_id, self.old, self.new = job_id, old, new

    def __reduce__(self) -> tuple[Any, ...]:
        return (IllegalTransition, (self.job_id, self.old, self.new))


def new_job_id() -> str:
    return f"job-{uuid.uuid4()}"


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """An event with its per-job sequence id (the SSE ``id:``)."""

    seq: int
    kind: str
    data: dict[str, Any]


@dataclass
class JobRecord:
    job_id: str
    operation: str
    request: dict[str, Any]
    correlation_id: str
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The body of ``GET /v1/jobs/{id}``."""
        return {
            "job_id": self.job_id,
            "operation": self.operation,
            "state": self.state.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "correlation_id": self.correlation_id,
        }


class EventLog:
    """A bounded buffer of one job's events with sequence ids starting at 1.

    When full, the oldest events are dropped; sequence ids keep counting so a watcher
    resuming with ``Last-Event-ID`` never sees an id twice.
    """

    def __init__(self, maxlen: int) -> None:
        self._events: deque[LoggedEvent] = deque(maxlen=maxlen)
        self.last_seq = 0

    def append(self, event: Event) -> LoggedEvent:
        self.last_seq += 1
        logged = LoggedEvent(self.last_seq, event.kind, payload(event))
        self._events.append(logged)
        return logged

    def restore(self, event: LoggedEvent) -> None:
        self._events.append(event)
        self.last_seq = event.seq

    def after(self, seq: int, limit: int | None = None) -> list[LoggedEvent]:
        out = [e for e in self._events if e.seq > seq]
        return out if limit is None else out[:limit]


@dataclass
class _Entry:
    record: JobRecord
    log: EventLog
    changed: asyncio.Condition


class JobTable:
    """Every job the hive knows, its record, its event log and who waits on it."""

    def __init__(
        self,
        *,
        max_events: int = 10_000,
        retain: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs: dict[str, _Entry] = {}
        self._max_events = max_events
        self._retain = retain  #: finished jobs kept; the oldest go first
        self._clock = clock

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def create(self, operation: str, request: dict[str, Any], correlation_id: str) -> JobRecord:
        record = JobRecord(
            job_id=new_job_id(),
            operation=operation,
            request=request,
            correlation_id=correlation_id,
            created_at=self._clock(),
        )
        self._jobs[record.job_id] = _Entry(record, EventLog(self._max_events), asyncio.Condition())
        self._forget_oldest()
        return record

    def _forget_oldest(self) -> None:
        excess = len(self._jobs) - self._retain
        if excess <= 0:
            return
        old = [i for i, e in self._jobs.items() if e.record.state.terminal][:excess]
        for job_id in old:
            del self._jobs[job_id]

    def restore(self, saved: dict[str, Any], events: list[LoggedEvent]) -> JobRecord:
        """Put back a job remembered on disk (see ``actors.store``)."""
        record = JobRecord(
            job_id=saved["job_id"],
            operation=saved["operation"],
            request=saved.get("request") or {},
            correlation_id=saved["correlation_id"],
            state=JobState(saved["state"]),
            created_at=saved["created_at"],
            started_at=saved["started_at"],
            finished_at=saved["finished_at"],
            progress=saved["progress"],
            result=saved["result"],
            error=saved["error"],
        )
        log = EventLog(self._max_events)
        for event in events[-self._max_events :]:
            log.restore(event)
        self._jobs[record.job_id] = _Entry(record, log, asyncio.Condition())
        return record

    def events(self, job_id: str) -> list[LoggedEvent]:
        return self._jobs[job_id].log.after(0)

    def get(self, job_id: str) -> JobRecord | None:
        entry = self._jobs.get(job_id)
        return entry.record if entry else None

    def recent(
        self, *, state: JobState | None = None, operation: str | None = None, limit: int = 100
    ) -> list[JobRecord]:
        """Newest first."""
        records: Iterable[JobRecord] = (e.record for e in reversed(self._jobs.values()))
        out = []
        for record in records:
            if state is not None and record.state is not state:
                continue
            if operation is not None and record.operation != operation:
                continue
            out.append(record)
            if len(out) >= limit:
                break
        return out

    async def emit(self, job_id: str, event: Event) -> LoggedEvent | None:
        """Append an event; events for a terminal job are dropped (it has said its last word)."""
        entry = self._jobs[job_id]
        if entry.record.state.terminal:
            return None
        logged = entry.log.append(event)
        if isinstance(event, Progress):
            entry.record.progress = logged.data
        elif isinstance(event, Error):
            entry.record.error = logged.data
        elif isinstance(event, Result):
            entry.record.result = logged.data
        await self._notify(entry)
        return logged

    async def transition(self, job_id: str, new: JobState) -> JobRecord:
        entry = self._jobs[job_id]
        record = entry.record
        if new not in ALLOWED[record.state]:
            raise IllegalTransition(job_id, record.state, new)
        record.state = new
        now = self._clock()
        if new is JobState.RUNNING:
            record.started_at = now
        if new.terminal:
            record.finished_at = now
        await self._notify(entry)
        return record

    async def wait_events(
        self, job_id: str, after: int, poll_s: float, limit: int = 1000
    ) -> tuple[list[LoggedEvent], JobState]:
        """Events after ``after``; a long poll: waits up to ``poll_s`` when there are none yet."""
        entry = self._jobs[job_id]
        async with entry.changed:
            if entry.log.last_seq <= after and not entry.record.state.terminal:
                try:
                    await asyncio.wait_for(entry.changed.wait(), poll_s)
                except TimeoutError:
                    pass
        return entry.log.after(after, limit), entry.record.state

    async def _notify(self, entry: _Entry) -> None:
        async with entry.changed:
            entry.changed.notify_all()
