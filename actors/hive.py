"""``Hive``: one per Ray node (node-affinity scheduled). It owns the node's model catalog and
its inference workers, and answers the catalog, worker and status operations as jobs.

``hive_status`` (and ``preloads``, for ``/health``) tells how each ``preload`` model stands on
this hive: ``loading``, ``ready``, ``failed`` or ``cancelled`` (with the error and the job)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from ray.util import metrics

from actors.adapters.cache import Catalog
from actors.adapters.embedded import LOCAL_ID, gguf_path
from actors.adapters.engine import model_context_len
from actors.core import logs
from actors.core.config import Config
from actors.core.errors import RbeeError
from actors.core.events import Event, Narration, Result, StreamEvent
from actors.core.operations import (
    HiveStatus,
    ModelDelete,
    ModelGet,
    ModelList,
    WorkerList,
    WorkerSpawn,
    WorkerStop,
)
from actors.core.running import FLUSH_S, Runs, Stop, batched
from actors.remote import node_view, nodes
from actors.workers import WorkerPool

ACTOR = "hive"
_GAUGE_S = 2.0

log = logging.getLogger("rbee.hive")


class Hive:
    def __init__(self, config: Config, hive_id: str, node_id: str) -> None:
        logs.configure()
        config = config.on_this_node()
        self._config = config
        self._catalog = Catalog(config.cache_dir)
        self._hive_id = hive_id
        self._node_id = node_id
        gpus = int(self._node().get("Resources", {}).get("GPU", 0))
        self._workers = WorkerPool(config, self._catalog, node_id, gpus)
        self._runs = Runs()
        self._gauge = metrics.Gauge(
            "rbee_workers", "Inference workers by state", tag_keys=("hive_id", "state")
        )
        self._gauging = asyncio.create_task(self._report_workers())

    async def _report_workers(self) -> None:
        """Workers by state, for the dashboard, every ``_GAUGE_S``."""
        while True:
            states = [w["state"] for w in self._workers.list()]
            for state in ("loading", "ready"):
                self._gauge.set(states.count(state), tags={"hive_id": self._hive_id, "state": state})
            await asyncio.sleep(_GAUGE_S)

    async def run(
        self, job_id: str, op: Any, correlation_id: str | None = None, first_id: int = 1
    ) -> AsyncIterator[list[StreamEvent]]:
        """The job's events, numbered from ``first_id``, in bulk (the registry's copy)."""
        events = self._runs.run(
            job_id, lambda run: self._answer(job_id, op, correlation_id), first_id, correlation_id
        )
        async for batch in batched(events, linger_s=FLUSH_S):
            yield batch

    async def watch(self, job_id: str, after: int) -> AsyncIterator[list[StreamEvent]]:
        """The job's events after ``after``, live, while it runs here."""
        async for batch in self._runs.watch(job_id, after):
            yield batch

    async def cancel(self, job_id: str, stop: Stop) -> dict[str, Any]:
        await self._runs.cancel(job_id, stop)
        return {}

    async def find_worker(self, model: str, worker_id: str | None = None) -> str | None:
        """A ready worker for ``model``; a worker named by ``worker_id`` that is still
        loading is waited for."""
        await self._workers.settled()
        if worker_id is not None:
            return await self._workers.find_waiting(model, worker_id)
        return self._workers.find(model)

    async def ready_workers(self) -> list[tuple[str, str]]:
        """(model, actor name) of this hive's ready workers: the ingress's routes."""
        await self._workers.settled()
        return self._workers.ready()

    async def ensure_worker(self, model: str) -> str:
        """A ready worker for ``model``: waits for one that is loading, else starts one."""
        await self._workers.settled()
        return await self._workers.ensure(model)

    async def placement(self, model: str) -> dict[str, Any]:
        """What routing needs to pick a hive for ``model``: whether this hive has it in its
        cache, whether it has room for a worker, and how many GPUs it has free."""
        await self._workers.settled()
        return {
            "hive_id": self._hive_id,
            "cached": await asyncio.to_thread(self._has, model),
            "room": self._workers.has_room(),
            "free_gpus": self._workers.free_gpus(),
        }

    def _has(self, model: str) -> bool:
        if model == LOCAL_ID:
            return self._config.embedded and gguf_path() is not None
        try:
            self._catalog.local_path(model)
        except RbeeError:
            return False
        return True

    async def status_now(self) -> dict[str, Any]:
        """``status`` (``hive_list`` asks each hive for it)."""
        await self._workers.settled()
        return await asyncio.to_thread(self.status)

    async def preloads(self) -> dict[str, dict[str, Any]]:
        """How each ``preload`` model this hive was asked to start stands (``/health``)."""
        return self._preloads()

    async def models(self) -> list[dict[str, Any]]:
        """Models this hive can serve: those its workers run, those in its cache, and the
        embedded one (converted when first asked for) when it is installed; each with the
        context it is served at (a worker's), or else the one its ``config.json`` declares."""
        await self._workers.settled()
        lengths = await asyncio.to_thread(self._declared_lengths)
        for worker in self._workers.list():
            lengths[worker["model"]] = worker.get("max_model_len") or lengths.get(worker["model"])
        if self._config.embedded and gguf_path() is not None:
            lengths.setdefault(LOCAL_ID, None)
        return [{"id": m, "max_model_len": n} for m, n in sorted(lengths.items())]

    def _declared_lengths(self) -> dict[str, int | None]:
        lengths: dict[str, int | None] = {}
        for entry in self._catalog.list():
            try:
                path = self._catalog.local_path(entry["model"])
            except RbeeError:
                path = None
            lengths[entry["model"]] = model_context_len(path) if path else None
        return lengths

    async def stop_workers(self) -> None:
        await self._workers.settled()
        await self._workers.stop_all()

    async def _answer(
        self, job_id: str, op: Any, correlation_id: str | None
    ) -> AsyncGenerator[Event, None]:
        await self._workers.settled()
        if isinstance(op, WorkerSpawn):
            async for event in self._workers.spawn(
                op.model, op.device, op.worker_id, correlation_id, job_id, reuse=op.reuse
            ):
                yield event
            return
        yield Narration(
            ACTOR,
            op.operation,
            f"{op.operation} on hive {self._hive_id}",
            correlation_id=correlation_id,
        )
        match op:
            case WorkerList():
                yield Result({"hive_id": self._hive_id, "workers": self._workers.list()})
            case WorkerStop():
                yield Result({"hive_id": self._hive_id, **await self._workers.stop(op.worker_id)})
            case _:
                yield Result(await asyncio.to_thread(self._catalog_answer, op))

    def _catalog_answer(self, op: Any) -> dict[str, Any]:
        match op:
            case ModelList():
                return {"hive_id": self._hive_id, "models": self._catalog.list()}
            case ModelGet():
                return {"hive_id": self._hive_id, **self._catalog.get(op.model)}
            case ModelDelete():
                return {"hive_id": self._hive_id, **self._catalog.delete(op.model)}
            case HiveStatus():
                return self.status()
        raise TypeError(f"the hive does not run {op.operation}")

    def _node(self) -> dict[str, Any]:
        return next((n for n in nodes() if n["NodeID"] == self._node_id), {})

    def status(self) -> dict[str, Any]:
        return {
            "hive_id": self._hive_id,
            "node_id": self._node_id,
            "host": socket.gethostname(),
            **node_view(self._node()),
            "gpu_memory": gpu_memory(),
            "free_gpus": self._workers.free_gpus(),
            "cache_dir": str(self._catalog.cache_dir),
            "models": [m["model"] for m in self._catalog.list()],
            "workers": self._workers.list(),
            "preload": self._preloads(),
        }

    def _preloads(self) -> dict[str, dict[str, Any]]:
        outcomes = {model: self._workers.outcome(model) for model in self._config.preload}
        return {model: outcome for model, outcome in outcomes.items() if outcome is not None}


def gpu_memory() -> list[dict[str, int]] | None:
    """Each GPU's memory as the driver reports it (``pynvml``); None where there is no NVIDIA
    driver or ``pynvml`` (a CPU node)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver on this node
        log.debug("no GPU memory to report: %r", exc)
        return None
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            found.append({"index": index, "total_bytes": int(info.total), "used_bytes": int(info.used)})
        return found
    finally:
        pynvml.nvmlShutdown()
