"""Jobs running inside one actor: their asyncio tasks, their live events, and a cancel that
waits for cleanup.

Each run numbers its events from the id the registry gave it and keeps them in a feed that
watchers read live (``watch``: the short road from the actor to an HTTP response); the
registry takes the same events in bulk for replay.

A cancel may arrive before the job's call does (Ray does not order calls from different
callers), or for a job this actor never runs (a restarted registry stops its orphans
everywhere); the job then stops as soon as it starts. Such early cancels are remembered
apart, and only the latest ``remember`` of them.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Any

from actors.core import logs
from actors.core.events import Error, Event, Packed, Result, StreamEvent, Token, pack
from actors.core.table import JobState

FEED_EVENTS = 10_000
"""The most events a run keeps for watchers; one who falls further behind reads the registry."""
FEED_KEPT_S = 5.0
"""How long a finished run's feed stays for watchers still reading its tail."""
FLUSH_S = 0.25
"""How long an actor gathers a job's events before sending them to the registry: live
watchers read the actor, so this only bounds how far behind the registry's copy may be
(each list sent costs both processes CPU that the engine would have used)."""
ARRIVAL_WAIT_S = 10.0
"""How long a watcher waits for a run whose call has not reached the actor yet."""


@dataclass(frozen=True, slots=True)
class Stop:
    """A cancel as the registry hands it down to the actor doing the job: when it was
    accepted, and by when the job must have cleaned up (wall clock, the same in every
    process). Every wait of a cancel, in the registry and in the actor, ends at
    ``deadline``: the one bound of a cancel (``cancel_cleanup_s``)."""

    accepted_at: float
    deadline: float

    @classmethod
    def within(cls, bound_s: float, *, clock: Callable[[], float] = time.time) -> Stop:
        now = clock()
        return cls(now, now + bound_s)

    def left_s(self, *, clock: Callable[[], float] = time.time) -> float:
        """The time left until the deadline (0 once it passed)."""
        return max(0.0, self.deadline - clock())


@dataclass
class Run:
    task: asyncio.Task[object] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled_at: float | None = None
    last_output: float | None = None  #: when the job last wrote a byte or made a token
    first_id: int = 1
    last_id: int = 0  #: the id of its latest event (``first_id - 1`` before any)
    feed: deque[StreamEvent] = field(default_factory=lambda: deque(maxlen=FEED_EVENTS))
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    direct: bool = False  #: answered straight to the ingress: the registry has none of its events

    @property
    def settled(self) -> bool:
        """Whether nothing of the job runs here (it ended, or never began)."""
        return self.task is None or self.done.is_set()

    def output_after_cancel_s(self) -> float | None:
        """When the last output came, relative to the cancel (negative: before it)."""
        if self.last_output is None or self.cancelled_at is None:
            return None
        return self.last_output - self.cancelled_at

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def after(self, seq: int) -> list[StreamEvent] | None:
        """The feed's events after ``seq``; None if some of them were dropped already."""
        feed = self.feed
        if seq >= self.last_id:
            return []
        if not feed or feed[0].id > seq + 1:
            return None
        start = seq + 1 - feed[0].id
        return [feed[i] for i in range(start, len(feed))]


@dataclass
class Ended:
    """How a directly answered job ended: its events, its state, and what is left to
    write (``tail``) or the answer to render instead (``answer``).

    It travels with its events packed (``events.pack``): the ingress only hands them on to
    the registry (``packed``; ``events`` is the worker's own list)."""

    events: list[StreamEvent] = field(default_factory=list)
    state: JobState = JobState.FAILED
    tail: bytes = b""
    answer: Result | Error | None = None
    handed: bool = False  #: the ingress has it (and tells the registry); else the worker does
    packed: Packed | None = None

    def packed_events(self) -> Packed:
        return self.packed if self.packed is not None else pack(self.events)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ended, (self.packed_events(), self.state, self.tail, self.answer))


def _ended(packed: Packed, state: JobState, tail: bytes, answer: Result | Error | None) -> Ended:
    return Ended(state=state, tail=tail, answer=answer, packed=packed)


class Runs:
    def __init__(self, *, clock: Callable[[], float] = time.time, remember: int = 1000) -> None:
        self._clock = clock
        self._remember = remember
        self._running: dict[str, Run] = {}
        self._finished: OrderedDict[str, Run] = OrderedDict()
        self._early: OrderedDict[str, Run] = OrderedDict()  #: cancelled before they came
        self._arrivals: dict[str, asyncio.Future[Run]] = {}  #: watched before they came

    def __len__(self) -> int:
        return len(self._running)

    async def run(
        self,
        job_id: str,
        body: Callable[[Run], AsyncGenerator[Event, None]],
        first_id: int = 1,
        correlation_id: str | None = None,
        *,
        direct: bool = False,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Iterate ``body(run)`` as job ``job_id``, its events numbered from ``first_id``,
        so ``cancel(job_id)`` can stop it and ``watch(job_id)`` can follow it. What the task
        iterating it logs names the job. ``direct``: the job is answered straight to the
        ingress (its cancel hands its events over)."""
        logs.bind(job_id, correlation_id)
        early = self._early.pop(job_id) if job_id in self._early else Run()
        run = self._running.setdefault(job_id, early)
        run.task = asyncio.current_task()
        run.direct = direct
        run.first_id, run.last_id = first_id, first_id - 1
        arrival = self._arrivals.pop(job_id, None)
        if arrival is not None and not arrival.done():
            arrival.set_result(run)
        events = body(run)
        seq, event = first_id - 1, None
        try:
            while True:
                # The cooperative flag, read here only: before the body starts, and for each
                # event it made before it is sent (a body that makes events without waiting
                # never meets the task's cancel at an ``await``).
                if run.cancelled_at is not None:
                    raise asyncio.CancelledError
                if event is not None:
                    seq += 1
                    numbered = StreamEvent(seq, event)
                    run.feed.append(numbered)
                    run.last_id = seq
                    if run.waiters:
                        run.wake()
                    yield numbered
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    break
        finally:
            await events.aclose()  # runs the body's cleanup now, not at garbage collection
            run.done.set()
            run.wake()
            self._finished[job_id] = self._running.pop(job_id, run)
            while len(self._finished) > self._remember:
                self._finished.popitem(last=False)
            asyncio.get_running_loop().call_later(FEED_KEPT_S, run.feed.clear)

    async def watch(
        self, job_id: str, after: int, linger_s: float = 0.0
    ) -> AsyncGenerator[list[StreamEvent], None]:
        """The job's events after ``after`` as they come, in lists of what piled up, until
        its run ends here. Tokens go at most one list per ``linger_s`` (as ``batched``), the
        first at once; other events are not held back (a narration before the first token
        does not delay it).

        Ends early, without error, when this actor cannot give them all (the run never
        came, or ``after`` is older than its feed): the watcher reads the registry then.
        """
        run = self._running.get(job_id) or self._finished.get(job_id)
        if run is None:
            if job_id in self._early:
                return
            arrival = self._arrivals.setdefault(job_id, asyncio.get_running_loop().create_future())
            try:
                run = await asyncio.wait_for(asyncio.shield(arrival), ARRIVAL_WAIT_S)
            except TimeoutError:
                self._arrivals.pop(job_id, None)
                return
        clock = asyncio.get_running_loop().time
        cursor, last = after, -linger_s
        while True:
            events = run.after(cursor)
            if events is None:
                return
            if events:
                wait_s = last + linger_s - clock()
                if wait_s > 0 and not run.done.is_set():
                    await _until(run.done, wait_s)
                    events = run.after(cursor) or events
                cursor = events[-1].id
                if any(isinstance(e.event, Token) for e in events):
                    last = clock()
                yield events
                continue
            if run.done.is_set():
                return
            waiter = asyncio.get_running_loop().create_future()
            run.waiters.append(waiter)
            await waiter

    def touch(self, run: Run) -> None:
        run.last_output = self._clock()

    async def cancel(self, job_id: str, stop: Stop) -> Run:
        """Cancel the job's task and wait until its cleanup ran, or until the stop's
        deadline (``run.done`` tells which)."""
        run = self._running.get(job_id) or self._finished.get(job_id)
        if run is None:
            run = self._early.setdefault(job_id, Run())
            while len(self._early) > self._remember:
                self._early.popitem(last=False)
            arrival = self._arrivals.pop(job_id, None)
            if arrival is not None and not arrival.done():
                arrival.cancel()
        if run.cancelled_at is None:  # the flag: set here only
            run.cancelled_at = stop.accepted_at
        if run.task is not None:
            run.task.cancel()
            await _until(run.done, stop.left_s(clock=self._clock))
        return run


async def _until(event: asyncio.Event, timeout_s: float) -> None:
    """Wait for ``event``, at most ``timeout_s``."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass


_END = object()


async def batched(
    events: AsyncIterable[StreamEvent], *, linger_s: float = 0.0, max_items: int = 4096
) -> AsyncGenerator[list[StreamEvent], None]:
    """The same events, in lists, at most one list of tokens per ``linger_s``: an event
    after a quiet spell goes at once (a first token is not held back, nor by the narration
    before it), one that follows a list of tokens closely waits for the rest of the period
    with whatever piles up (the end of the events cuts the wait short).

    Each item a Ray streaming call yields costs an object and a report to its owner; the
    registry takes a job's events this way, in bulk, off the path of its tokens. Events
    gathered when the iteration fails are yielded before the failure is raised.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()
    ended = asyncio.Event()

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)
            raise
        finally:
            queue.put_nowait(_END)
            ended.set()

    task = asyncio.create_task(pump())
    clock = asyncio.get_running_loop().time
    last = -linger_s
    try:
        while True:
            batch: list[StreamEvent] = []
            item = await queue.get()
            wait_s = last + linger_s - clock()
            if wait_s > 0 and item is not _END and not isinstance(item, BaseException):
                await _until(ended, wait_s)
            while True:
                if item is _END:
                    if batch:
                        yield batch
                    return
                if isinstance(item, BaseException):
                    if batch:
                        yield batch
                    raise item
                batch.append(item)  # type: ignore[arg-type]
                if queue.empty() or len(batch) >= max_items:
                    break
                item = queue.get_nowait()
            if any(isinstance(e.event, Token) for e in batch):  # a narration holds no token back
                last = clock()
            yield batch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
