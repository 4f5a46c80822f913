"""``JobRegistry``: the one named, detached actor that holds every job.

It keeps each job's record, event log and cancel flag, and the ``ObjectRefGenerator`` of the
call doing the work; the logic lives in ``actors.core.jobs.Jobs`` and ``actors.core.table.JobTable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.util import metrics

from actors.core import logs
from actors.core.config import Config
from actors.core.errors import JobNotFound
from actors.core.events import StreamEvent
from actors.core.jobs import Adoption, Ending, Jobs
from actors.core.operations import parse_operation
from actors.core.store import JobStore
from actors.core.table import JobRecord, JobState, JobTable, Lease
from actors.ray_backend import RayBackend

_GAUGE_S = 2.0


class JobRegistry:
    def __init__(self, config: Config) -> None:
        logs.configure()
        self._config = config
        self._metrics = _Metrics()
        self._background: set[asyncio.Task[None]] = set()
        self._rounds: dict[str, asyncio.Future[Any]] = {}
        self._store = JobStore(config.state_dir, keep=config.retain_jobs)
        table = JobTable(max_events=config.max_events_per_job, retain=config.retain_jobs)
        for saved, events in self._store.load():
            table.restore(saved, events)
        self._backend = RayBackend()
        self._jobs = Jobs(
            table,
            self._backend,
            limits={"model_download": config.downloads.concurrency},
            cleanup_s=config.cancel_cleanup_s,
            on_terminal=self._terminal,
        )
        if self._store.interrupted:  # __init__ runs in the actor's event loop
            self._spawn(
                self._backend.stop_orphans(self._store.interrupted, config.cancel_cleanup_s)
            )
        self._spawn(self._report_jobs())
        self._spawn(self._backend.follow_nodes(self._start_hives))

    async def _report_jobs(self) -> None:
        """Jobs by state and the queue's depth, for the dashboard, every ``_GAUGE_S``."""
        shown: set[str] = set()  #: operations seen: their gauges go back to 0, not away
        while True:
            counts = self._jobs.table.unfinished()
            shown |= {operation for operation, _ in counts}
            for operation in shown:
                for state in (JobState.QUEUED.value, JobState.RUNNING.value):
                    n = counts.get((operation, state), 0)
                    self._metrics.jobs_now.set(n, tags={"operation": operation, "state": state})
                depth = counts.get((operation, JobState.QUEUED.value), 0)
                self._metrics.queue_depth.set(depth, tags={"operation": operation})
            await asyncio.sleep(_GAUGE_S)

    def _start_hives(self, node_ids: list[str]) -> None:
        """A hive (and download actor) on each node that joined (or was there at start)."""
        from actors.cluster import ensure_hives  # it imports this module

        ensure_hives(self._config, node_ids)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _terminal(self, record: JobRecord) -> None:
        self._metrics.terminal(record)
        self._store.save(record, self._jobs.table.events(record.job_id))

    async def ready(self) -> bool:
        return True

    async def submit(self, request: dict[str, Any], correlation_id: str) -> dict[str, Any]:
        op = parse_operation(request)
        record = self._jobs.submit(op, request, correlation_id)
        self._metrics.submitted(record.operation)
        self._store.save(record, [])
        return record.to_dict()

    async def mail(self, items: list[Adoption | Ending]) -> None:
        """What an ingress says that nothing waits for, in order, in one call: the jobs it
        gave straight to workers (``Jobs.adopt``) and their ends (``Jobs.close``)."""
        for item in items:
            if isinstance(item, Adoption):
                record = await self._jobs.adopt(item)
                if record is not None:
                    self._metrics.submitted(record.operation)
            else:
                await self.close(item)

    async def close(self, ending: Ending) -> None:
        """The end of an adopted job (from a worker whose answer stopped before its end)."""
        adoption = ending.adoption
        if adoption is not None and ending.job_id not in self._jobs.table:
            self._metrics.submitted(adoption.operation)
        await self._jobs.close(ending)

    async def actor_gone(self, actor: str) -> None:
        """A worker died (its hive saw it, or an ingress lost its answer's connection): its
        adopted jobs fail ``WORKER_DIED``; one that still answers is not gone."""
        if await self._backend.answers(actor):
            return  # (the backend logs what it saw)
        await self._jobs.actor_gone(actor)

    async def routes(self) -> dict[str, list[str]]:
        """The ready workers by model, for the ingress to answer OpenAI requests without
        the registry (asked by many at once, answered once)."""
        return dict(await self._shared("routes", self._backend.routes))

    async def job(self, job_id: str, request: bool = False) -> dict[str, Any]:
        """The job's record; with ``request``, what it was asked too."""
        record = self._jobs.get(job_id)
        return {**record.to_dict(), "request": record.request} if request else record.to_dict()

    async def forget(self, job_id: str) -> bool:
        """Forget a finished job, here and on disk (a deleted response); False if it has not
        finished."""
        self._jobs.get(job_id)  # JobNotFound for a job not known
        if not self._jobs.table.forget(job_id):
            return False
        self._store.forget(job_id)
        return True

    async def jobs(
        self, state: str | None = None, operation: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        state_ = JobState(state) if state else None
        return [
            r.to_dict()
            for r in self._jobs.table.recent(state=state_, operation=operation, limit=limit)
        ]

    async def events(
        self, job_id: str, after: int = 0, poll_s: float = 15.0, live: int = 0
    ) -> tuple[list[StreamEvent], str, Lease | None]:
        """Events after ``after`` (long-polls up to ``poll_s``), the job's state, and the
        actor whose events a watcher can take live (a lease not yet followed: see
        ``JobTable.wait_events``)."""
        self._jobs.get(job_id)
        events, state, lease = await self._jobs.table.wait_events(job_id, after, poll_s, live=live)
        return events, state.value, lease

    async def board(
        self, after: int | None, limit: int, poll_s: float, epoch: str | None = None
    ) -> dict[str, Any]:
        """The jobs board after sequence ``after`` of ``epoch`` (``JobTable.changes``),
        long-polled up to ``poll_s``: ``{"epoch", "seq", "reset", "jobs", "forgotten"}``."""
        changes = await self._jobs.table.wait_changes(after, limit, poll_s, epoch)
        return changes.to_dict()

    async def hives(self) -> list[dict[str, Any]]:
        """Every alive node's hive (``hive_list``'s result, without a job; the asks in flight
        at once share one round: each open web page asks every 5 s)."""
        return list(await self._shared("hives", self._backend.hive_list))

    async def cancel(
        self,
        job_ids: list[str] | None,
        correlation_id: str | None = None,
        *,
        state: str | None = None,
        operation: str | None = None,
        wait: bool = False,
    ) -> dict[str, list[str]]:
        """The one way in for a cancel: of the jobs named, or (``job_ids`` None) of every
        unfinished job of ``state`` and ``operation``. ``{"job_ids": known, "unknown": ...}``
        at once; with ``wait``, once each known job is terminal, with ``"ended"``: the ones
        this cancel ended (the others had ended already). An unknown id is logged."""
        table = self._jobs.table
        if job_ids is None:
            states = [JobState(state)] if state else [JobState.QUEUED, JobState.RUNNING]
            job_ids = [
                r.job_id
                for s in states
                for r in table.recent(state=s, operation=operation, limit=len(table))
            ]
        known = [j for j in job_ids if j in table]
        unknown = [j for j in job_ids if j not in table]
        for job_id in unknown:  # logged
            await self._cancel_one(job_id, correlation_id)
        answer = {"job_ids": known, "unknown": unknown}
        if not wait:
            for job_id in known:
                self._spawn(self._cancel_one(job_id, correlation_id))
            return answer
        ended = await asyncio.gather(*(self._cancel_one(j, correlation_id) for j in known))
        return {**answer, "ended": [j for j, e in zip(known, ended, strict=True) if e]}

    async def _cancel_one(self, job_id: str, correlation_id: str | None) -> bool:
        started = time.monotonic()
        try:
            ended = await self._jobs.cancel(job_id, correlation_id)
        except JobNotFound:  # unknown, or forgotten meanwhile (retention)
            return False
        if ended:
            self._metrics.cancel_latency.observe(time.monotonic() - started)
        return ended

    async def preloads(self) -> dict[str, dict[str, Any]]:
        """How the preloads stand (``/health``): loading, ready, failed or cancelled."""
        return await self._backend.preloads()

    async def models(self) -> list[dict[str, Any]]:
        """Every model some alive hive can serve, with its context (``GET /v1/models``; the
        asks in flight at once share one round: each open web page asks every 10 s)."""
        return list(await self._shared("models", self._backend.models))

    async def _shared(self, name: str, ask: Callable[[], Awaitable[Any]]) -> Any:
        """``ask()`` once for all who want its answer while it is on its way."""
        round_ = self._rounds.get(name)
        if round_ is None or round_.done():
            round_ = self._rounds[name] = asyncio.ensure_future(ask())
        return await asyncio.shield(round_)

    async def count(self) -> int:
        return len(self._jobs.table)


class _Metrics:
    """Shown on the Ray dashboard (SPEC §9)."""

    def __init__(self) -> None:
        self.jobs = metrics.Counter(
            "rbee_jobs_total", "Jobs by operation and state", tag_keys=("operation", "state")
        )
        self.jobs_now = metrics.Gauge(
            "rbee_jobs_current", "Jobs queued or running now", tag_keys=("operation", "state")
        )
        self.queue_depth = metrics.Gauge(
            "rbee_queue_depth", "Jobs waiting for a slot", tag_keys=("operation",)
        )
        self.cancel_latency = metrics.Histogram(
            "rbee_cancel_latency_s",
            "Cancel accepted to job terminal",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5],
        )

    def submitted(self, operation: str) -> None:
        self.jobs.inc(tags={"operation": operation, "state": "submitted"})

    def terminal(self, record: JobRecord) -> None:
        self.jobs.inc(tags={"operation": record.operation, "state": record.state.value})
