"""How the registry reaches the actors that do the work: find them, start the call, stop it.

Stopping is the actor's ``cancel``: it cancels the job's task there (the cooperative
flag stops a body between events) and returns once the job has cleaned up, or at the
deadline the registry handed down (``running.Stop``). ``ray.cancel`` of the call is the
backstop for an actor that has not answered by then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray.exceptions import (
    ActorUnavailableError,
    ActorUnschedulableError,
    NodeDiedError,
    RayActorError,
    RayError,
)

from actors.core.errors import InvalidRequest, WorkerDied
from actors.core.events import Event, Narration, Result, StreamEvent
from actors.core.jobs import Lease
from actors.core.operations import HiveList, Infer, ModelDownload, Operation
from actors.core.running import Stop
from actors.core.table import JobRecord
from actors.naming import NAMESPACE, REGISTRY, download_name, hive_id_of, hive_name
from actors.remote import alive_nodes, node_view

log = logging.getLogger("rbee.backend")

ACTOR = "registry"
_NODES_S = 2.0
_NODES_TTL_S = 5.0
_RESTART_WAIT_S = 30.0  #: how long a download waits for its restarting actor
_RETRY_S = 0.2
_ASK_S = 10.0
# The actor doing a job is gone: it died, or its node did (a hive's actors are pinned to
# their node, so they cannot be started again elsewhere).
_GONE = (RayActorError, ActorUnschedulableError, NodeDiedError)


class RayBackend:
    def __init__(self) -> None:
        self._running: dict[str, tuple[Any, Any]] = {}
        self._handles: dict[str, Any] = {}
        self._nodes: tuple[float, list[dict[str, Any]]] = (0.0, [])

    def start(
        self, record: JobRecord, op: Operation, lease: Lease
    ) -> AsyncIterator[Event | list[StreamEvent]]:
        return self._stream(record, op, lease)

    async def _stream(
        self, record: JobRecord, op: Operation, lease: Lease
    ) -> AsyncIterator[Event | list[StreamEvent]]:
        if isinstance(op, HiveList):
            yield Result({"hives": await self.hive_list()})
            return
        if isinstance(op, Infer):
            name = await self._worker_for(op)
            if name is None:
                hive_id = op.hive_id or await self._place(op.model)
                yield Narration(
                    ACTOR,
                    "worker_spawn",
                    f"no worker serves {op.model}; starting one on {hive_id}",
                    correlation_id=record.correlation_id,
                )
                try:
                    name = await self._hive(hive_id).ensure_worker.remote(op.model)
                except _GONE as exc:
                    self._handles.pop(hive_name(hive_id), None)
                    raise WorkerDied(f"hive {hive_id} is gone: {_first_line(exc)}") from exc
        elif isinstance(op, ModelDownload):
            name = download_name(op.hive_id or await self._place(op.model))
        else:
            name = hive_name(op.hive_id or _default_hive_id())
        first_id = await lease(name)
        again, back_by = isinstance(op, ModelDownload), time.monotonic() + _RESTART_WAIT_S
        try:
            while True:
                actor = self._actor(name)
                generator = actor.run.remote(record.job_id, op, record.correlation_id, first_id)
                self._running[record.job_id] = (actor, generator)
                began = False
                try:
                    async for ref in generator:
                        item = await ref
                        began = True
                        yield item
                    return
                except ActorUnavailableError as exc:
                    # Restarting (a kill -9 moments ago): a download that never began there
                    # runs on the actor Ray brings back under its name (and resumes what
                    # the killed one left); other work may have begun, and is not redone.
                    if began or not again or time.monotonic() > back_by:
                        raise WorkerDied(f"{name} is unavailable: {_first_line(exc)}") from exc
                    await asyncio.sleep(_RETRY_S)
                except _GONE as exc:
                    self._handles.pop(name, None)  # its name may come back as a new actor
                    raise WorkerDied(
                        f"{name} died while running the job: {_first_line(exc)}"
                    ) from exc
        finally:
            self._running.pop(record.job_id, None)

    async def stop(
        self, record: JobRecord, stop: Stop, actor: str | None = None
    ) -> dict[str, Any] | None:
        running = self._running.get(record.job_id)
        if running is None and actor is None:
            return None
        handle, generator = running if running is not None else (self._actor(actor or ""), None)
        try:
            result: dict[str, Any] = await handle.cancel.remote(record.job_id, stop)
        except (*_GONE, InvalidRequest):  # the actor or its node died: WORKER_DIED by itself
            return None
        except asyncio.CancelledError:  # the deadline, and no answer: Ray cancels the call
            log.warning("%s: no cancel confirmed by the deadline: cancelling the call", record.job_id)
            if generator is not None:
                ray.cancel(generator)
            raise
        return result

    async def stop_orphans(self, job_ids: list[str], bound_s: float) -> None:
        """Stop the work of jobs a registry restart ended, wherever it still runs: the calls
        a dead registry made live on in the actors doing them, writing and generating for
        jobs that are over. Every rbee actor is asked to cancel each of them (an actor that
        does not run one remembers the cancel in case its call still comes)."""
        if not job_ids:
            return
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        names = [a["name"] for a in named if a["namespace"] == NAMESPACE and a["name"] != REGISTRY]
        stop = Stop.within(bound_s)
        calls = []
        for name in names:
            try:
                actor = self._actor(name)
            except InvalidRequest:  # gone since it was listed
                continue
            calls += [actor.cancel.remote(job_id, stop) for job_id in job_ids]
        log.warning(
            "stopping %d job(s) the registry restart ended, on %d actor(s)",
            len(job_ids),
            len(names),
        )
        try:
            async with asyncio.timeout(stop.left_s()):
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
        answers = await self._ask_hives(lambda hive: hive.models.remote())
        found = [m for m in answers.values() if m is not None]
        lengths: dict[str, int | None] = {}
        for models in found:
            for model in models:
                known = [n for n in (lengths.get(model["id"]), model["max_model_len"]) if n]
                lengths[model["id"]] = max(known, default=None)
        return [{"id": m, "max_model_len": n} for m, n in sorted(lengths.items())]

    async def routes(self) -> dict[str, list[str]]:
        """The names of the ready workers of every alive hive, by model."""
        by_model: dict[str, list[str]] = {}
        answers = await self._ask_hives(lambda hive: hive.ready_workers.remote())
        for workers in answers.values():
            for model, name in workers or ():
                by_model.setdefault(model, []).append(name)
        return by_model

    async def preloads(self) -> dict[str, dict[str, Any]]:
        """How every alive hive's preloads stand, by model."""
        answers = await self._ask_hives(lambda hive: hive.preloads.remote())
        found = [p for p in answers.values() if p is not None]
        return {model: state for each in found for model, state in each.items()}

    async def _worker_for(self, op: Infer) -> str | None:
        """A ready worker for the model: on the asked hive, else on any alive hive."""
        if op.hive_id or op.worker_id:
            hive_ids = [op.hive_id] if op.hive_id else self._hive_ids()
            for hive_id in hive_ids:
                hive = self._hive(hive_id)
                name: str | None = await hive.find_worker.remote(op.model, op.worker_id)
                if name is not None:
                    return name
            if op.worker_id is not None:
                raise InvalidRequest(f"no worker {op.worker_id!r} serves {op.model!r}")
            return None
        found = await self._ask_hives(lambda hive: hive.find_worker.remote(op.model))
        return next((name for name in found.values() if name is not None), None)

    async def _place(self, model: str) -> str:
        """The hive to run ``model`` on (and so to download it to): of the hives with room
        for a worker, one that has the model, then one with a free GPU (the most free first);
        with no room anywhere, one that has it; ties go to the registry's own node. One
        alive hive: that one."""
        own = _default_hive_id()
        if len(self._hive_ids()) <= 1:
            return own
        answers = await self._ask_hives(lambda hive: hive.placement.remote(model))
        places = [p for p in answers.values() if p is not None]

        def rank(p: dict[str, Any]) -> tuple[bool, bool, int, bool]:
            return (p["room"], p["cached"], p["free_gpus"], p["hive_id"] == own)

        best = max(places, key=rank, default=None)
        return str(best["hive_id"]) if best is not None else own

    async def _ask_hives(self, ask_one: Callable[[Any], Any]) -> dict[str, Any]:
        """``ask_one(hive)`` (a call of the hive's handle) of every alive hive at once, by
        hive id; None for a hive that did not answer within ``_ASK_S`` (busy, or on a node
        that is leaving)."""
        hive_ids = self._hive_ids()

        async def ask(hive_id: str) -> Any:
            try:
                return await asyncio.wait_for(ask_one(self._hive(hive_id)), _ASK_S)
            except (RayError, InvalidRequest, TimeoutError) as exc:
                log.warning("hive %s did not answer: %r", hive_id, exc)
                return None

        answers = await asyncio.gather(*(ask(h) for h in hive_ids))
        return dict(zip(hive_ids, answers, strict=True))

    async def hive_list(self) -> list[dict[str, Any]]:
        """Every alive node's hive, as its ``hive_status`` tells it (CPUs, GPUs and their
        memory, models, workers); a hive that does not answer is listed from Ray's view of
        its node, with ``"answered": false``."""
        alive = self._alive(fresh=True)  # the hives asked are these nodes'
        statuses = await self._ask_hives(lambda hive: hive.status_now.remote())
        listed = []
        for node in alive:
            hive_id = hive_id_of(node["NodeID"])
            status = statuses.get(hive_id)
            if status is not None:
                listed.append({**status, "answered": True})
            else:
                seen = {"hive_id": hive_id, "node_id": node["NodeID"], **node_view(node)}
                listed.append({**seen, "answered": False})
        return listed

    async def answers(self, name: str) -> bool:
        """Whether the worker ``name`` is alive and answers (within ``_ASK_S``)."""
        try:
            handle = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
            await asyncio.wait_for(handle.pipe_address.remote(), _ASK_S)
        except (ValueError, RayError, TimeoutError) as exc:
            log.info("worker %s does not answer: %r", name, exc)
            return False
        return True

    def _hive_ids(self) -> list[str]:
        return [hive_id_of(n["NodeID"]) for n in self._alive()]

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

    async def follow_nodes(self, on_join: Callable[[list[str]], None]) -> None:
        """Re-read the alive nodes every ``_NODES_S`` (off the loop: ``ray.nodes`` blocks) for
        routing, and call ``on_join`` (in a thread) with the ids of nodes that joined: within
        ``_NODES_S`` a new node gets its hive, and one that left stops being routed to."""
        known: set[str] = set()
        while True:
            try:
                alive = await asyncio.to_thread(alive_nodes)
                self._nodes = (time.monotonic(), alive)
                ids = {n["NodeID"] for n in alive}
                if joined := ids - known:
                    await asyncio.to_thread(on_join, sorted(joined))
                    if known:
                        log.info("started hives on %d node(s) that joined", len(joined))
                known = ids
            except Exception as exc:  # the GCS busy or restarting: look again next round
                log.warning("could not follow the cluster's nodes: %r", exc)
            await asyncio.sleep(_NODES_S)

    def _alive(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Alive nodes as ``follow_nodes`` last read them; read here (blocking the loop) if
        that is older than ``_NODES_TTL_S`` or ``fresh`` is asked."""
        read_at, alive = self._nodes
        if fresh or time.monotonic() - read_at > _NODES_TTL_S:
            alive = alive_nodes()
            self._nodes = (time.monotonic(), alive)
        return alive


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _default_hive_id() -> str:
    return hive_id_of(ray.get_runtime_context().get_node_id())
