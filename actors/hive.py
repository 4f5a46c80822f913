"""``Hive``: one per Ray node (node-affinity scheduled). It owns the node's model catalog
and answers the catalog and status operations as short jobs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors import logs
from actors.cache import Catalog
from actors.config import Config
from actors.events import Event, Narration, Result
from actors.operations import HiveStatus, ModelDelete, ModelGet, ModelList

ACTOR = "hive"


@ray.remote(num_cpus=0, max_concurrency=100)
class Hive:
    def __init__(self, config: Config, hive_id: str, node_id: str) -> None:
        logs.configure()
        self._catalog = Catalog(config.cache_dir)
        self._hive_id = hive_id
        self._node_id = node_id

    async def run(
        self, job_id: str, op: Any, correlation_id: str | None = None
    ) -> AsyncIterator[Event]:
        yield Narration(
            ACTOR,
            op.operation,
            f"{op.operation} on hive {self._hive_id}",
            correlation_id=correlation_id,
        )
        yield Result(await asyncio.to_thread(self._answer, op))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return {}

    def _answer(self, op: Any) -> dict[str, Any]:
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

    def status(self) -> dict[str, Any]:
        node = next((n for n in ray.nodes() if n["NodeID"] == self._node_id), {})
        resources = node.get("Resources", {})
        models = self._catalog.list()
        return {
            "hive_id": self._hive_id,
            "node_id": self._node_id,
            "host": socket.gethostname(),
            "address": node.get("NodeManagerAddress"),
            "alive": bool(node.get("Alive", True)),
            "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0),
            "memory_bytes": resources.get("memory", 0),
            "cache_dir": str(self._catalog.cache_dir),
            "models": [m["model"] for m in models],
            "workers": [],
        }
