"""``JobRegistry``: the one named, detached actor that holds every job.

It keeps each job's record, event log and cancel flag, and the ``ObjectRefGenerator`` of the
call doing the work; the logic lives in ``actors.jobs.Jobs`` and ``actors.core.JobTable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util import metrics

from actors import logs
from actors.config import Config
from actors.core import JobRecord, JobState, JobTable
from actors.errors import InvalidRequest, JobNotFound, WorkerDied
from actors.events import Event, Narration, Result
from actors.jobs import Jobs
from actors.naming import NAMESPACE, download_name, hive_id_of, hive_name
from actors.operations import HiveList, Infer, ModelDownload, parse_operation
from actors.store import JobStore


@ray.remote(num_cpus=0, max_concurrency=10_000)
class JobRegistry:
    def __init__(self, config: Config) -> None:
        logs.configure()
        self._config = config
        self._metrics = _Metrics()
        self._background: set[asyncio.Task[None]] = set()
        self._store = JobStore(config.state_dir)
        table = JobTable(max_events=config.max_events_per_job)
        for saved, events in self._store.load():
            table.restore(saved, events)
        self._jobs = Jobs(
            table,
            RayBackend(),
            limits={"model_download": config.downloads.concurrency},
            cleanup_s=config.cancel_cleanup_s,
            on_terminal=self._terminal,
        )

    def _terminal(self, record: JobRecord) -> None:
        self._metrics.terminal(record)
        self._store.save(record, self._jobs.table.events(record.job_id))

    async def ready(self) -> bool:
        return True

    async def submit(self, request: dict[str, Any], correlation_id: str) -> dict[str, Any]:
        op = parse_operation(request)
        record = self._jobs.submit(op, request, correlation_id)
        self._metrics.submitted(record)
        self._store.save(record, [])
        return record.to_dict()

    async def job(self, job_id: str) -> dict[str, Any]:
        return self._jobs.get(job_id).to_dict()

    async def jobs(
        self, state: str | None = None, operation: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        state_ = JobState(state) if state else None
        return [
            r.to_dict()
            for r in self._jobs.table.recent(state=state_, operation=operation, limit=limit)
        ]

    async def events(
        self, job_id: str, after: int = 0, poll_s: float = 15.0
    ) -> tuple[list[tuple[int, str, dict[str, Any]]], str]:
        """Events after ``after`` (long-polls up to ``poll_s``) and the job's state."""
        self._jobs.get(job_id)
        events, state = await self._jobs.table.wait_events(job_id, after, poll_s)
        return [(e.seq, e.kind, e.data) for e in events], state.value

    async def cancel(self, job_id: str, correlation_id: str | None = None) -> bool:
        started = time.monotonic()
        ended = await self._jobs.cancel(job_id, correlation_id)
        if ended:
            self._metrics.cancel_latency.observe(time.monotonic() - started)
        return ended

    async def request_cancel(self, job_id: str, correlation_id: str | None = None) -> None:
        """Start a cancel and return at once (``POST .../cancel``); unknown ids are logged."""
        task = asyncio.create_task(self._cancel_quietly(job_id, correlation_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_quietly(self, job_id: str, correlation_id: str | None) -> None:
        try:
            await self.cancel(job_id, correlation_id)
        except JobNotFound:
            pass

    async def models(self) -> list[str]:
        """Every model some alive hive can serve (``GET /v1/models``)."""
        names = [hive_name(hive_id_of(n["NodeID"])) for n in _alive()]
        found = await asyncio.gather(*(_actor(n).models.remote() for n in names))
        return sorted({m for models in found for m in models})

    async def count(self) -> int:
        return len(self._jobs.table)


ACTOR = "registry"


class RayBackend:
    """Starts operations on the right actor and stops them: ``ray.cancel`` plus the flag."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[Any, Any]] = {}

    def start(self, record: JobRecord, op: Any) -> AsyncIterator[Event]:
        return self._stream(record, op)

    async def _stream(self, record: JobRecord, op: Any) -> AsyncIterator[Event]:
        if isinstance(op, HiveList):
            yield Result({"hives": await _hive_list()})
            return
        if isinstance(op, Infer):
            name = await _worker_for(op)
            if name is None:
                hive_id = op.hive_id or _default_hive_id()
                yield Narration(
                    ACTOR,
                    "worker_spawn",
                    f"no worker serves {op.model}; starting one on {hive_id}",
                    correlation_id=record.correlation_id,
                )
                name = await _hive(hive_id).ensure_worker.remote(op.model)
        else:
            hive_id = op.hive_id or _default_hive_id()
            name = download_name(hive_id) if isinstance(op, ModelDownload) else hive_name(hive_id)
        actor = _actor(name)
        generator = actor.run.remote(record.job_id, op, record.correlation_id)
        self._running[record.job_id] = (actor, generator)
        try:
            async for ref in generator:
                item = await ref
                for event in item if isinstance(item, list) else (item,):
                    yield event
        except RayActorError as exc:
            raise WorkerDied(f"{name} died while running the job: {_first_line(exc)}") from exc
        finally:
            self._running.pop(record.job_id, None)

    async def stop(self, record: JobRecord) -> dict[str, Any]:
        running = self._running.get(record.job_id)
        if running is None:
            return {}
        actor, generator = running
        confirmed = actor.cancel.remote(record.job_id)
        ray.cancel(generator)
        result: dict[str, Any] = await confirmed
        return result


def _actor(name: str) -> Any:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise InvalidRequest(f"no actor {name!r} (unknown hive or worker)") from None


def _hive(hive_id: str) -> Any:
    try:
        return ray.get_actor(hive_name(hive_id), namespace=NAMESPACE)
    except ValueError:
        raise InvalidRequest(f"no hive {hive_id!r}") from None


async def _worker_for(op: Infer) -> str | None:
    """A ready worker for the model: on the asked hive, else on any alive hive."""
    hive_ids = [op.hive_id] if op.hive_id else [hive_id_of(n["NodeID"]) for n in _alive()]
    for hive_id in hive_ids:
        name: str | None = await _hive(hive_id).find_worker.remote(op.model, op.worker_id)
        if name is not None:
            return name
    if op.worker_id is not None:
        raise InvalidRequest(f"no worker {op.worker_id!r} serves {op.model!r}")
    return None


def _alive() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _default_hive_id() -> str:
    here = ray.get_runtime_context().get_node_id()
    return hive_id_of(here)


async def _hive_list() -> list[dict[str, Any]]:
    out = []
    for node in ray.nodes():
        hive_id = hive_id_of(node["NodeID"])
        resources = node.get("Resources", {})
        out.append(
            {
                "hive_id": hive_id,
                "node_id": node["NodeID"],
                "address": node.get("NodeManagerAddress"),
                "alive": bool(node.get("Alive")),
                "cpus": resources.get("CPU", 0),
                "gpus": resources.get("GPU", 0),
                "memory_bytes": resources.get("memory", 0),
            }
        )
    return out


class _Metrics:
    """Shown on the Ray dashboard (SPEC §9)."""

    def __init__(self) -> None:
        self.jobs = metrics.Counter(
            "rbee_jobs_total", "Jobs by operation and state", tag_keys=("operation", "state")
        )
        self.cancel_latency = metrics.Histogram(
            "rbee_cancel_latency_s",
            "Cancel accepted to job terminal",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5],
        )

    def submitted(self, record: JobRecord) -> None:
        self.jobs.inc(tags={"operation": record.operation, "state": "submitted"})

    def terminal(self, record: JobRecord) -> None:
        self.jobs.inc(tags={"operation": record.operation, "state": record.state.value})
