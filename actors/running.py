"""Jobs running inside one actor: their asyncio tasks, and a cancel that waits for cleanup.

A cancel may arrive before the job's call does (Ray does not order calls from different
callers), or for a job this actor never runs (a restarted registry stops its orphans
everywhere); the job then stops as soon as it starts. Such early cancels are remembered
apart, and only the latest ``remember`` of them.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from actors.events import Event


@dataclass
class Run:
    task: asyncio.Task[object] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled_at: float | None = None
    last_output: float | None = None  #: when the job last wrote a byte or made a token

    def output_after_cancel_s(self) -> float | None:
        """When the last output came, relative to the cancel (negative: before it)."""
        if self.last_output is None or self.cancelled_at is None:
            return None
        return self.last_output - self.cancelled_at


class Runs:
    def __init__(self, *, clock: Callable[[], float] = time.time, remember: int = 1000) -> None:
        self._clock = clock
        self._remember = remember
        self._running: dict[str, Run] = {}
        self._finished: OrderedDict[str, Run] = OrderedDict()
        self._early: OrderedDict[str, Run] = OrderedDict()  #: cancelled before they came

    def __len__(self) -> int:
        return len(self._running)

    async def run(
        self, job_id: str, body: Callable[[Run], AsyncGenerator[Event, None]]
    ) -> AsyncGenerator[Event, None]:
        """Iterate ``body(run)`` as job ``job_id``, so ``cancel(job_id)`` can stop it."""
        early = self._early.pop(job_id) if job_id in self._early else Run()
        run = self._running.setdefault(job_id, early)
        run.task = asyncio.current_task()
        events = body(run)
        try:
            if run.cancelled_at is not None:
                raise asyncio.CancelledError
            async for event in events:
                if run.cancelled_at is not None:  # the cooperative flag, checked per event
                    raise asyncio.CancelledError
                yield event
        finally:
            await events.aclose()  # runs the body's cleanup now, not at garbage collection
            run.done.set()
            self._finished[job_id] = self._running.pop(job_id, run)
            while len(self._finished) > self._remember:
                self._finished.popitem(last=False)

    def touch(self, run: Run) -> None:
        run.last_output = self._clock()

    async def cancel(self, job_id: str, accepted_at: float | None = None) -> Run:
        """Cancel the job's task and wait until its cleanup ran.

        ``accepted_at`` is when the cancel was accepted upstream (else now).
        """
        run = self._running.get(job_id) or self._finished.get(job_id)
        if run is None:
            run = self._early.setdefault(job_id, Run())
            while len(self._early) > self._remember:
                self._early.popitem(last=False)
        if run.cancelled_at is None:
            run.cancelled_at = accepted_at or self._clock()
        if run.task is not None:
            run.task.cancel()
            await run.done.wait()
        return run


_END = object()


async def batched(
    events: AsyncGenerator[Event, None], *, linger_s: float = 0.0, max_items: int = 512
) -> AsyncGenerator[list[Event], None]:
    """The same events, in lists: whatever piled up, gathered for ``linger_s`` after the first.

    Each item a Ray streaming call yields costs an object, a report to its owner and, down
    the line, a long poll and an HTTP write; on a machine whose cores the engine keeps busy
    that per-item cost comes out of decoding. Gathering trades a few ms of latency for it.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)
            raise
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            batch: list[Event] = []
            item = await queue.get()
            if linger_s > 0 and item is not _END and not isinstance(item, BaseException):
                await asyncio.sleep(linger_s)
            while True:
                if item is _END:
                    if batch:
                        yield batch
                    return
                if isinstance(item, BaseException):
                    raise item
                batch.append(item)  # type: ignore[arg-type]
                if queue.empty() or len(batch) >= max_items:
                    break
                item = queue.get_nowait()
            yield batch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
