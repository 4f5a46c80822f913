"""OpenAI requests answered on the one road: the ingress gives the request straight to a
worker that serves its model, on a connection of its own (``actors.core.pipe``), and writes
what the worker sends back (vLLM's chunks, as bytes). The registry is off the request's
path: it is told of the job (``adopt``, not awaited) and of its end.

``Routes`` knows which workers serve which model: the registry's answer, asked at most once
per ``ROUTES_TTL_S`` (all requests in between share it, and a request that has a view of its
model never waits for a newer one); a request goes to the least busy worker of its model,
counted here. A model no worker serves yet takes the job road (the
registry starts a worker and waits for it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError

from actors.core import pipe
from actors.core.errors import InternalError, JobCancelled, RbeeError, WorkerDied
from actors.core.running import Ended
from actors.naming import NAMESPACE
from actors.registry_client import Registry

log = logging.getLogger("rbee.direct")

ROUTES_TTL_S = 1.0
"""How old the ingress's view of the workers may be."""


@dataclass(frozen=True, slots=True)
class Route:
    name: str  #: the worker's actor name
    address: pipe.Address
    busy: Busy  #: this request, counted at the worker until it is closed


class Routes:
    def __init__(self, registry: Registry, ttl_s: float = ROUTES_TTL_S) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._table: dict[str, list[str]] = {}
        self._read_at = -ttl_s
        self._reading: asyncio.Future[None] | None = None
        self._addresses: dict[str, pipe.Address] = {}
        self._busy: dict[str, int] = {}

    async def pick(self, model: str) -> Route | None:
        """The least busy ready worker of ``model``, this request counted at it (until
        ``route.busy`` is closed); None when there is none (as far as a view at most
        ``ttl_s`` old knows)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._read_at > self._ttl_s:
            reading = self._refresh()
            if not self._table.get(model):  # nothing to go on: the fresh view, then
                await asyncio.shield(reading)
        names = self._table.get(model)
        if not names:
            return None
        name = min(names, key=lambda n: self._busy.get(n, 0))
        busy = self._count(name)  # at once: requests picking meanwhile see it
        address = self._addresses.get(name)
        if address is None:
            try:
                actor = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
                address = await actor.pipe_address.remote()
            except (ValueError, RayError) as exc:  # gone since the registry answered
                log.info("worker %s gave no address: %r", name, exc)
                busy.close()
                self.forget(name)
                return None
            self._addresses[name] = address
        return Route(name, address, busy)

    def load(self) -> int:
        """The requests this ingress has at workers now."""
        return sum(self._busy.values())

    def _refresh(self) -> asyncio.Future[None]:
        """The registry's view of the workers, read once however many ask meanwhile. A
        request that has a view of its model goes on with it (the read is not on its
        path)."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        return self._reading

    async def _read(self) -> None:
        try:
            self._table = dict(await self._registry.routes())
        except (RayError, RbeeError) as exc:  # the registry is restarting: the job road copes
            log.info("the registry gave no routes: %r", exc)
            self._table = {}
        self._read_at = asyncio.get_running_loop().time()

    def forget(self, name: str) -> None:
        """A worker that failed a call: not routed to until the registry lists it again."""
        self._addresses.pop(name, None)
        for names in self._table.values():
            if name in names:
                names.remove(name)

    def _count(self, name: str) -> Busy:
        """Count a request at worker ``name`` until ``close``."""
        self._busy[name] = self._busy.get(name, 0) + 1
        return Busy(self._busy, name)


class Busy:
    """One request counted at a worker; ``close`` (any number of times) ends it."""

    def __init__(self, counts: dict[str, int], name: str) -> None:
        self._counts, self._name, self._open = counts, name, True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._counts[self._name] -= 1


async def call(route: Route, job_id: str, op: Any, correlation_id: str | None) -> pipe.Call:
    """Give the request to the worker; a worker that takes no connection died."""
    try:
        return await pipe.Call.open(route.address, job_id, op, correlation_id)
    except OSError as exc:
        raise WorkerDied(f"{route.name} took no connection: {exc}") from exc


async def items(
    answer: pipe.Call, route: Route, routes: Routes, registry: Registry
) -> AsyncIterator[bytes | Ended]:
    """The worker's answer, item by item; its failures as rbee's errors: a cancel is
    ``JobCancelled``, a worker whose connection broke ``WorkerDied`` (and the registry is
    told, which fails the job)."""
    try:
        async for item in answer.items():
            yield item
    except pipe.Cancelled as exc:
        raise JobCancelled("the job was cancelled") from exc
    except pipe.Failed as exc:
        raise InternalError(f"the answer failed at {route.name}: {exc}") from exc
    except pipe.Broken as exc:
        routes.forget(route.name)
        registry.actor_gone(route.name)
        raise WorkerDied(f"{route.name} died while answering") from exc


__all__ = ["RbeeError", "Route", "Routes", "call", "items"]
