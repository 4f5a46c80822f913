"""Jobs as plain data: states, the transitions between them, records and event logs.

Nothing here knows about Ray; the registry actor owns one ``JobTable`` and drives it.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from actors.core.events import Error, Event, Progress, Result, StreamEvent, Token, payload


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


_FORGOTTEN_KEPT = 10_000
"""How many forgotten jobs the board remembers: a watcher further behind gets the whole board."""


JOB_ID = re.compile(r"job-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""The form of every job id (``new_job_id``), matched with ``fullmatch``: anything else names
no job, and is refused where it comes in (SPEC §7)."""


def new_job_id() -> str:
    return f"job-{uuid.uuid4()}"


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Lease:
    """A job's events are being numbered by the actor running it, from ``first_id`` on.

    Watchers take them live from ``actor``; the registry gets them in bulk, and events of
    its own for the job wait until the lease ends, so ids stay one sequence.
    """

    actor: str
    first_id: int


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

    def row(self, tokens: int = 0) -> dict[str, Any]:
        """The job as a line of the jobs board (``GET /v1/jobs/watch``): the record without
        its result, with what a list shows of the request, and ``tokens`` made so far."""
        row = self.to_dict()
        del row["result"]
        return {
            **row,
            "model": _text(self.request.get("model")),
            "hive_id": _text(self.request.get("hive_id")),
            "tokens": tokens,
            "max_tokens": _max_tokens(self.request),
            "cancel_requested": self.cancel_requested,
        }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _max_tokens(request: dict[str, Any]) -> int | None:
    """The most tokens an ``infer`` may make: its own, or its OpenAI request's."""
    openai = request.get("openai")
    body = openai.get("request") if isinstance(openai, dict) else None
    asked = [request.get("max_tokens")]
    if isinstance(body, dict):
        asked += [body.get("max_completion_tokens"), body.get("max_tokens")]
    return next((n for n in asked if type(n) is int), None)


class EventLog:
    """A bounded buffer of one job's events with sequence ids starting at 1.

    When full, the oldest events are dropped; sequence ids keep counting so a watcher
    resuming with ``Last-Event-ID`` never sees an id twice.
    """

    def __init__(self, maxlen: int) -> None:
        self._events: deque[StreamEvent] = deque(maxlen=maxlen)
        self.last_seq = 0

    def append(self, event: Event) -> StreamEvent:
        self.last_seq += 1
        logged = StreamEvent(self.last_seq, event)
        self._events.append(logged)
        return logged

    def restore(self, event: StreamEvent) -> None:
        """Append an event numbered elsewhere (on disk, or by the actor holding a lease)."""
        self._events.append(event)
        self.last_seq = event.id

    def after(self, seq: int, limit: int | None = None) -> list[StreamEvent]:
        if not self._events or self._events[-1].id <= seq:
            return []
        start = max(0, seq + 1 - self._events[0].id)  # ids are consecutive within the log
        end = len(self._events) if limit is None else min(len(self._events), start + limit)
        return [self._events[i] for i in range(start, end)]


@dataclass
class _Entry:
    record: JobRecord
    log: EventLog
    changed: asyncio.Condition
    lease: Lease | None = None
    deferred: list[Event] = field(default_factory=list)  #: the registry's, during a lease
    tokens: int = 0  #: the most tokens a choice has made so far


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed on the jobs board after a watcher's ``seq`` (``JobTable.changes``)."""

    epoch: str  #: this table's: a sequence number of another (before a restart) means nothing
    seq: int  #: the board's sequence now: the watcher's next ``after``
    reset: bool  #: ``rows`` is the whole board (newest first), not only what changed
    rows: list[dict[str, Any]]
    forgotten: list[str]  #: jobs dropped by retention since ``after``

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "seq": self.seq,
            "reset": self.reset,
            "jobs": self.rows,
            "forgotten": self.forgotten,
        }


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
        # The jobs board: each change of a record (its state, progress, error, tokens, a
        # cancel asked) takes the next sequence number, so a watcher asks for what changed
        # after the last number it saw and gets each changed job once.
        self.epoch = uuid.uuid4().hex[:12]
        self._seq = 0
        self._changed: OrderedDict[str, int] = (
            OrderedDict()
        )  #: job -> its last change, oldest first
        self._forgotten: deque[tuple[int, str]] = deque(maxlen=_FORGOTTEN_KEPT)
        self._tick = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def create(
        self,
        operation: str,
        request: dict[str, Any],
        correlation_id: str,
        job_id: str | None = None,
        *,
        created_at: float | None = None,
    ) -> JobRecord:
        """A new queued job (``job_id``: one its caller made, else a new one)."""
        record = JobRecord(
            job_id=job_id or new_job_id(),
            operation=operation,
            request=request,
            correlation_id=correlation_id,
            created_at=created_at if created_at is not None else self._clock(),
        )
        self._jobs[record.job_id] = _Entry(record, EventLog(self._max_events), asyncio.Condition())
        self._forget_oldest()
        self._touch(record.job_id)
        return record

    def _forget_oldest(self) -> None:
        excess = len(self._jobs) - self._retain
        if excess <= 0:
            return
        old = [i for i, e in self._jobs.items() if e.record.state.terminal][:excess]
        for job_id in old:
            del self._jobs[job_id]
            self._changed.pop(job_id, None)
            self._seq += 1
            self._forgotten.append((self._seq, job_id))

    def restore(self, saved: dict[str, Any], events: list[StreamEvent]) -> JobRecord:
        """Put back a job remembered on disk (see ``actors.core.store``)."""
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
        self._touch(record.job_id)
        return record

    def events(self, job_id: str) -> list[StreamEvent]:
        return self._jobs[job_id].log.after(0)

    def get(self, job_id: str) -> JobRecord | None:
        entry = self._jobs.get(job_id)
        return entry.record if entry else None

    def unfinished(self) -> dict[tuple[str, str], int]:
        """How many jobs are queued or running, by (operation, state)."""
        counts: dict[tuple[str, str], int] = {}
        for entry in self._jobs.values():
            record = entry.record
            if not record.state.terminal:
                key = (record.operation, record.state.value)
                counts[key] = counts.get(key, 0) + 1
        return counts

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

    async def emit(self, job_id: str, event: Event) -> None:
        """Append an event of the registry's own; events for a terminal job are dropped (it
        has said its last word). During a lease it waits for the lease's end."""
        entry = self._jobs[job_id]
        if entry.record.state.terminal:
            return
        if entry.lease is not None:
            entry.deferred.append(event)
            return
        if self._note(entry, entry.log.append(event)):
            self._touch(job_id)
        await self._notify(entry)

    async def record_events(self, job_id: str, events: list[StreamEvent]) -> None:
        """Append events the leasing actor numbered (ids already logged are skipped)."""
        entry = self._jobs[job_id]
        if entry.record.state.terminal:
            return
        changed = False
        for logged in events:
            if logged.id > entry.log.last_seq:
                entry.log.restore(logged)
                changed = self._note(entry, logged) or changed
        if changed:  # once for the whole list (a worker sends many tokens in one)
            self._touch(job_id)
        await self._notify(entry)

    async def lease(self, job_id: str, actor: str) -> int:
        """Let ``actor`` number the job's next events; the first id it is to use."""
        entry = self._jobs[job_id]
        entry.lease = Lease(actor, entry.log.last_seq + 1)
        await self._notify(entry)
        return entry.lease.first_id

    async def release(self, job_id: str) -> None:
        """End the lease: the registry's events held meanwhile follow the actor's."""
        entry = self._jobs.get(job_id)
        if entry is None or entry.lease is None:
            return
        entry.lease = None
        deferred, entry.deferred = entry.deferred, []
        for event in deferred:
            if not entry.record.state.terminal and self._note(entry, entry.log.append(event)):
                self._touch(job_id)
        await self._notify(entry)

    @staticmethod
    def _note(entry: _Entry, logged: StreamEvent) -> bool:
        """What an event changes in the job's record; whether the board shows a change."""
        event = logged.event
        if isinstance(event, Progress):
            entry.record.progress = payload(event)
        elif isinstance(event, Error):
            entry.record.error = payload(event)
        elif isinstance(event, Result):
            entry.record.result = payload(event)
        elif isinstance(event, Token) and event.index > entry.tokens:
            entry.tokens = event.index
        else:
            return False
        return True

    def forget(self, job_id: str) -> bool:
        """Drop a finished job, as retention drops the oldest (its record, its events, its
        line of the board); False if it is not finished."""
        entry = self._jobs.get(job_id)
        if entry is None or not entry.record.state.terminal:
            return False
        del self._jobs[job_id]
        self._changed.pop(job_id, None)
        self._seq += 1
        self._forgotten.append((self._seq, job_id))
        return True

    def cancel_requested(self, job_id: str) -> None:
        """Mark the job as being cancelled (its record, and the board)."""
        self._jobs[job_id].record.cancel_requested = True
        self._touch(job_id)

    def _touch(self, job_id: str) -> None:
        self._seq += 1
        self._changed[job_id] = self._seq
        self._changed.move_to_end(job_id)
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    def changes(self, after: int | None, limit: int, epoch: str | None = None) -> Changes:
        """The board after sequence ``after`` of ``epoch`` (None: this table's): the rows of
        the jobs that changed since, and the jobs forgotten since; or the whole board
        (``limit`` newest) when ``after`` is None (a new watcher) or cannot be answered
        (another table's, or older than what is remembered of forgotten jobs)."""
        forgotten_since = self._forgotten[0][0] if len(self._forgotten) == _FORGOTTEN_KEPT else 0
        if (
            after is None
            or after > self._seq
            or after < forgotten_since
            or epoch not in (None, self.epoch)
        ):
            rows = [self.row(r.job_id) for r in self.recent(limit=limit)]
            return Changes(self.epoch, self._seq, True, rows, [])
        changed = []
        for job_id, seq in reversed(self._changed.items()):
            if seq <= after:
                break
            changed.append(job_id)
        forgotten = []
        for seq, job_id in reversed(self._forgotten):
            if seq <= after:
                break
            forgotten.append(job_id)
        rows = [self.row(j) for j in reversed(changed)]
        return Changes(self.epoch, self._seq, False, rows, forgotten)

    async def wait_changes(
        self, after: int | None, limit: int, poll_s: float, epoch: str | None = None
    ) -> Changes:
        """``changes``; a long poll: waits up to ``poll_s`` while nothing has changed."""
        if after == self._seq and epoch in (None, self.epoch):
            try:
                await asyncio.wait_for(self._tick.wait(), poll_s)
            except TimeoutError:
                pass
        return self.changes(after, limit, epoch)

    def row(self, job_id: str) -> dict[str, Any]:
        entry = self._jobs[job_id]
        return entry.record.row(entry.tokens)

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
        self._touch(job_id)
        await self._notify(entry)
        return record

    async def wait_events(
        self, job_id: str, after: int, poll_s: float, limit: int = 1000, *, live: int = 0
    ) -> tuple[list[StreamEvent], JobState, Lease | None]:
        """Events after ``after``, the job's state and its lease; a long poll: waits up to
        ``poll_s`` while there is nothing new. A lease newer than ``live`` (the first id of
        the last lease the watcher followed live, or 0) is news too."""
        entry = self._jobs[job_id]

        def news() -> bool:
            lease = entry.lease
            return (
                entry.log.last_seq > after
                or entry.record.state.terminal
                or (lease is not None and lease.first_id > live)
            )

        async with entry.changed:
            if not news():
                try:
                    await asyncio.wait_for(entry.changed.wait_for(news), poll_s)
                except TimeoutError:
                    pass
        return entry.log.after(after, limit), entry.record.state, entry.lease

    async def _notify(self, entry: _Entry) -> None:
        async with entry.changed:
            entry.changed.notify_all()
