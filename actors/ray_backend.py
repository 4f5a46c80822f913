"""How the registry reaches the actors that do the work: find them, start the call, stop it.

Stopping is the actor's ``cancel``: it cancels the job's task there (the cooperative
flag stops a body between events) and returns once the job has cleaned up. ``ray.cancel``
of the call is the backstop for an actor that does not answer that in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.core.errors import InvalidRequest, WorkerDied
from actors.core.events import Event, Narration, Result, StreamEvent
from actors.core.jobs import Lease
from actors.core.table import JobRecord
from actors.naming import NAMESPACE, REGISTRY, download_name, hive_id_of, hive_name
from actors.operations import HiveList, Infer, ModelDownload
from actors.remote import alive_nodes, nodes

log = logging.getLogger("rbee.backend")

ACTOR = "registry"
_NODES_TTL_S = 5.0
_ORPHANS_BOUND_S = 60.0
_CONFIRM_S = 1.0


class RayBackend:
    def __init__(self) -> None:
        self._running: dict[str, tuple[Any, Any]] = {}
        self._handles: dict[str, Any] = {}
        self._nodes: tuple[float, list[dict[str, Any]]] = (0.0, [])

    def start(
        self, record: JobRecord, op: Any, lease: Lease
    ) -> AsyncIterator[Event | list[StreamEvent]]:
        return self._stream(record, op, lease)

    async def _stream(
        self, record: JobRecord, op: Any, lease: Lease
    ) -> AsyncIterator[Event | list[StreamEvent]]:
        if isinstance(op, HiveList):
            yield Result({"hives": _hive_list()})
            return
        if isinstance(op, Infer):
            name = await self._worker_for(op)
            if name is None:
                hive_id = op.hive_id or _default_hive_id()
                yield Narration(
                    ACTOR,
                    "worker_spawn",
                    f"no worker serves {op.model}; starting one on {hive_id}",
                    correlation_id=record.correlation_id,
                )
                name = await self._hive(hive_id).ensure_worker.remote(op.model)
        else:
            hive_id = op.hive_id or _default_hive_id()
            name = download_name(hive_id) if isinstance(op, ModelDownload) else hive_name(hive_id)
        actor = self._actor(name)
        first_id = await lease(name)
        generator = actor.run.remote(record.job_id, op, record.correlation_id, first_id)
        self._running[record.job_id] = (actor, generator)
        try:
            async for ref in generator:
                yield await ref
        except RayActorError as exc:
            self._handles.pop(name, None)  # its name may come back as a new actor
            raise WorkerDied(f"{name} died while running the job: {_first_line(exc)}") from exc
        finally:
            self._running.pop(record.job_id, None)

    async def stop(self, record: JobRecord, accepted_at: float) -> dict[str, Any] | None:
        running = self._running.get(record.job_id)
        if running is None:
            return None
        actor, generator = running
        confirmed = asyncio.ensure_future(actor.cancel.remote(record.job_id, accepted_at))
        try:
            result: dict[str, Any] = await asyncio.wait_for(asyncio.shield(confirmed), _CONFIRM_S)
        except TimeoutError:
            log.warning("%s: no cancel confirmed in %gs: cancelling the call", record.job_id, _CONFIRM_S)
            ray.cancel(generator)
            result = await confirmed
        return result

    async def stop_orphans(self, job_ids: list[str]) -> None:
        """Stop the work of jobs a registry restart ended, wherever it still runs: the calls
        a dead registry made live on in the actors doing them, writing and generating for
        jobs that are over. Every rbee actor is asked to cancel each of them (an actor that
        does not run one remembers the cancel in case its call still comes)."""
        if not job_ids:
            return
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        names = [a["name"] for a in named if a["namespace"] == NAMESPACE and a["name"] != REGISTRY]
        now = time.time()
        calls = []
        for name in names:
            try:
                actor = self._actor(name)
            except InvalidRequest:  # gone since it was listed
                continue
            calls += [actor.cancel.remote(job_id, now) for job_id in job_ids]
        log.warning(
            "stopping %d job(s) the registry restart ended, on %d actor(s)",
            len(job_ids),
            len(names),
        )
        try:
            async with asyncio.timeout(_ORPHANS_BOUND_S):
                done = await asyncio.gather(*calls, return_exceptions=True)
        except TimeoutError:
            log.error("the orphaned jobs %s were not all stopped in time", job_ids)
            return
        failed = [r for r in done if isinstance(r, BaseException)]
        if failed:
            log.warning("%d orphan cancel(s) failed; the first: %r", len(failed), failed[0])

    async def models(self) -> list[dict[str, Any]]:
        """Each model some alive hive can serve, once, with the context it is served at
        (the longest where hives differ; None where no hive knows it)."""
        hives = [self._hive(hive_id_of(n["NodeID"])) for n in self._alive()]
        found = await asyncio.gather(*(h.models.remote() for h in hives))
        lengths: dict[str, int | None] = {}
        for models in found:
            for model in models:
                known = [n for n in (lengths.get(model["id"]), model["max_model_len"]) if n]
                lengths[model["id"]] = max(known, default=None)
        return [{"id": m, "max_model_len": n} for m, n in sorted(lengths.items())]

    async def preloads(self) -> dict[str, dict[str, Any]]:
        """How every alive hive's preloads stand, by model."""
        hives = [self._hive(hive_id_of(n["NodeID"])) for n in self._alive()]
        found = await asyncio.gather(*(h.preloads.remote() for h in hives))
        return {model: state for each in found for model, state in each.items()}

    async def _worker_for(self, op: Infer) -> str | None:
        """A ready worker for the model: on the asked hive, else on any alive hive."""
        hive_ids = [op.hive_id] if op.hive_id else [hive_id_of(n["NodeID"]) for n in self._alive()]
        for hive_id in hive_ids:
            name: str | None = await self._hive(hive_id).find_worker.remote(op.model, op.worker_id)
            if name is not None:
                return name
        if op.worker_id is not None:
            raise InvalidRequest(f"no worker {op.worker_id!r} serves {op.model!r}")
        return None

    def _actor(self, name: str) -> Any:
        """A handle by name, looked up once (the lookup blocks the event loop)."""
        if (handle := self._handles.get(name)) is not None:
            return handle
        try:
            handle = self._handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            raise InvalidRequest(f"no actor {name!r} (unknown hive or worker)") from None
        return handle

    def _hive(self, hive_id: str) -> Any:
        return self._actor(hive_name(hive_id))

    def _alive(self) -> list[dict[str, Any]]:
        """Alive nodes, re-read at most every few seconds (``ray.nodes`` blocks the loop)."""
        read_at, alive = self._nodes
        if time.monotonic() - read_at > _NODES_TTL_S:
            alive = alive_nodes()
            self._nodes = (time.monotonic(), alive)
        return alive


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _default_hive_id() -> str:
    return hive_id_of(ray.get_runtime_context().get_node_id())


def _hive_list() -> list[dict[str, Any]]:
    out = []
    for node in nodes():
        resources = node.get("Resources", {})
        out.append(
            {
                "hive_id": hive_id_of(node["NodeID"]),
                "node_id": node["NodeID"],
                "address": node.get("NodeManagerAddress"),
                "alive": bool(node.get("Alive")),
                "cpus": resources.get("CPU", 0),
                "gpus": resources.get("GPU", 0),
                "memory_bytes": resources.get("memory", 0),
            }
        )
    return out
