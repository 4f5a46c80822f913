"""A hive's inference workers: spawn (pinned to a GPU or on CPU), list, stop, find."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.cache import Catalog
from actors.config import Config
from actors.errors import InsufficientVram, InvalidRequest, ModelLoadFailed, NotFound, rbee_cause
from actors.events import Event, Narration, Result
from actors.inference_actor import InferenceActor
from actors.naming import NAMESPACE, worker_name

log = logging.getLogger("rbee.workers")

ACTOR = "hive"
_STOP_BOUND_S = 30.0


class WorkerNotFound(NotFound):
    code = "WORKER_NOT_FOUND"


@dataclass
class Worker:
    worker_id: str
    model: str
    device: str
    actor: Any
    ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            **self.info,
            "worker_id": self.worker_id,
            "model": self.model,
            "device": self.device,
            "state": "ready" if self.ready else "loading",
        }


class WorkerPool:
    def __init__(self, config: Config, catalog: Catalog, node_id: str, gpus: int) -> None:
        self._config = config
        self._catalog = catalog
        self._node_id = node_id
        self._gpus = gpus
        self._workers: dict[str, Worker] = {}
        self._spawning: dict[str, asyncio.Task[Worker]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def list(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self._workers.values()]

    def find(self, model: str, worker_id: str | None = None) -> str | None:
        """The actor name of a ready worker for ``model`` (or of ``worker_id``)."""
        for worker in self._workers.values():
            if worker.ready and worker.model == model:
                if worker_id is None or worker.worker_id == worker_id:
                    return worker_name(worker.worker_id)
        return None

    async def ensure(self, model: str) -> str:
        """A ready worker for ``model``, spawning one if there is none (one spawn per model)."""
        if (name := self.find(model)) is not None:
            return name
        if not self._config.engine.spawn_on_demand:
            raise NotFound(f"no worker serves {model!r}; spawn one with worker_spawn")
        task = self._spawning.get(model)
        if task is None:
            task = asyncio.create_task(self._start(model, None, None))
            self._spawning[model] = task
            task.add_done_callback(lambda _: self._spawning.pop(model, None))
        worker = await asyncio.shield(task)
        return worker_name(worker.worker_id)

    async def spawn(
        self, model: str, device: str | None, worker_id: str | None, correlation_id: str | None
    ) -> AsyncGenerator[Event, None]:
        yield Narration(ACTOR, "worker_spawn", f"loading {model}", correlation_id=correlation_id)
        worker = await self._start(model, device, worker_id)
        yield Narration(
            ACTOR,
            "worker_ready",
            f"worker {worker.worker_id} serves {model} on {worker.device}",
            correlation_id=correlation_id,
        )
        yield Result(worker.describe())

    async def _start(self, model: str, device: str | None, worker_id: str | None) -> Worker:
        path = self._catalog.local_path(model)
        device = self._device(device)
        worker_id = worker_id or f"w-{uuid.uuid4().hex[:8]}"
        if worker_id in self._workers:
            raise InvalidRequest(f"worker {worker_id!r} exists already")
        actor = InferenceActor.options(  # type: ignore[attr-defined]
            name=worker_name(worker_id),
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            num_gpus=1 if device == "gpu" else 0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self._node_id, soft=False),
        ).remote(worker_id, model, device)
        worker = self._workers[worker_id] = Worker(worker_id, model, device, actor)
        load = actor.load.remote(str(path), self._config.engine)
        try:
            worker.info = await asyncio.wait_for(load, self._config.engine.load_timeout_s)
        except BaseException as exc:
            self._workers.pop(worker_id, None)
            ray.cancel(load)
            self._retire(actor)  # abandon the load: the actor stops what it started, then goes
            if isinstance(exc, asyncio.CancelledError):
                raise
            cause = rbee_cause(exc)
            if cause is not None:
                raise cause from None
            raise ModelLoadFailed(f"{model}: {type(exc).__name__}: {exc}") from exc
        worker.ready = True
        return worker

    async def stop(self, worker_id: str) -> dict[str, Any]:
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            raise WorkerNotFound(f"no worker {worker_id!r} on this hive")
        await self._close(worker.actor)
        return {"worker_id": worker_id, "model": worker.model, "stopped": True}

    async def stop_all(self) -> None:
        for worker_id in list(self._workers):
            await self.stop(worker_id)

    def _device(self, asked: str | None) -> str:
        asked = asked or self._config.engine.device
        busy = sum(1 for w in self._workers.values() if w.device == "gpu")
        if asked == "cpu" or (asked == "auto" and self._gpus == 0):
            return "cpu"
        if busy >= self._gpus:
            raise InsufficientVram(f"all {self._gpus} GPUs of this hive are taken by workers")
        return "gpu"

    def _retire(self, actor: Any) -> None:
        task = asyncio.create_task(self._close(actor))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close(self, actor: Any) -> None:
        try:
            await asyncio.wait_for(actor.shutdown.remote(), _STOP_BOUND_S)
        except Exception as exc:  # dead or stuck: it goes either way
            log.warning("worker shutdown failed: %r", exc)
        ray.kill(actor)
