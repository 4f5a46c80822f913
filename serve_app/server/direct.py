"""OpenAI requests answered on the one road: the ingress gives the request straight to a
worker that serves its model and writes what the worker sends back (vLLM's chunks, as
bytes). The registry is off the request's path: it is told of the job (``adopt``, not
awaited) and hears of its end from the worker.

``Routes`` knows which workers serve which model: the registry's answer, asked at most once
per ``ROUTES_TTL_S`` (all requests in between share it); a request goes to the least busy
worker of its model, counted here. A model no worker serves yet takes the job road (the
registry starts a worker and waits for it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, TaskCancelledError

from actors.core.errors import JobCancelled, RbeeError, WorkerDied, rbee_cause
from actors.core.running import Ended
from actors.naming import NAMESPACE
from actors.registry_client import Registry

log = logging.getLogger("rbee.direct")

ROUTES_TTL_S = 1.0
"""How old the ingress's view of the workers may be."""


@dataclass(frozen=True, slots=True)
class Route:
    name: str  #: the worker's actor name
    actor: Any


class Routes:
    def __init__(self, registry: Registry, ttl_s: float = ROUTES_TTL_S) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._table: dict[str, list[str]] = {}
        self._read_at = -ttl_s
        self._reading: asyncio.Future[dict[str, list[str]]] | None = None
        self._handles: dict[str, Any] = {}
        self._busy: dict[str, int] = {}

    async def pick(self, model: str) -> Route | None:
        """The least busy ready worker of ``model``; None when there is none (as far as a
        view at most ``ttl_s`` old knows)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._read_at > self._ttl_s:
            await self._refresh()
        names = self._table.get(model)
        if not names:
            return None
        name = min(names, key=lambda n: self._busy.get(n, 0))
        actor = self._handles.get(name)
        if actor is None:
            try:
                actor = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
            except ValueError:  # gone since the registry answered
                self.forget(name)
                return None
            self._handles[name] = actor
        return Route(name, actor)

    async def _refresh(self) -> None:
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._registry.routes())
        try:
            self._table = dict(await asyncio.shield(self._reading))
        except RayError as exc:  # the registry is restarting: the job road copes
            log.info("the registry gave no routes: %r", exc)
            self._table = {}
        self._read_at = asyncio.get_running_loop().time()

    def forget(self, name: str) -> None:
        """A worker that failed a call: not routed to until the registry lists it again."""
        self._handles.pop(name, None)
        for names in self._table.values():
            if name in names:
                names.remove(name)

    def busy(self, route: Route) -> Busy:
        """Count a request at ``route`` until ``close``."""
        self._busy[route.name] = self._busy.get(route.name, 0) + 1
        return Busy(self._busy, route.name)


class Busy:
    """One request counted at a worker; ``close`` (any number of times) ends it."""

    def __init__(self, counts: dict[str, int], name: str) -> None:
        self._counts, self._name, self._open = counts, name, True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._counts[self._name] -= 1


async def items(
    stream: Any, route: Route, routes: Routes, registry: Registry
) -> AsyncIterator[bytes | Ended]:
    """The worker's answer, item by item; its failures as rbee's errors: a cancel is
    ``JobCancelled``, a worker that died ``WorkerDied`` (and the registry is told, which
    fails the job)."""
    try:
        async for ref in stream:
            yield await ref
    except (TaskCancelledError, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise JobCancelled("the job was cancelled") from exc
    except RayActorError as exc:
        routes.forget(route.name)
        registry.actor_gone(route.name)
        raise WorkerDied(f"{route.name} died while answering") from exc
    except RayError as exc:
        cause = rbee_cause(exc)
        if cause is not None:
            raise cause from None
        if "CancelledError" in str(exc):
            raise JobCancelled("the job was cancelled") from exc
        raise


def give_up(stream: Any) -> None:
    """Stop the worker's answer: nobody is left to read it (vLLM aborts the request)."""
    try:
        ray.cancel(stream)
    except Exception as exc:  # it ended meanwhile
        log.debug("cancelling an answer that ended: %r", exc)


__all__ = ["RbeeError", "Route", "Routes", "give_up", "items"]
