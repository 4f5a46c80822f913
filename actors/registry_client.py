"""The job registry as its callers see it: typed calls with named arguments and typed
answers, our own errors raised (never Ray's wrappers), and what nothing waits for sent in
batches.

``post`` queues an adoption or an end (``actors.core.jobs``): they go in one ``mail`` call
per ``MAIL_S`` (or at once, when ``MAIL_MAX`` are waiting), so hundreds of short requests
a second cost the registry a few calls. Every other call sends what is queued first: Ray
runs one caller's calls to an actor in order, so a cancel, a read or a stream of a job
always comes after the job's adoption.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError, RayError, TaskCancelledError

from actors.core.errors import Unavailable, rbee_cause
from actors.core.events import StreamEvent
from actors.core.jobs import Adoption, Ending
from actors.core.table import Lease

MAIL_S = 0.01
MAIL_MAX = 256
READ_WAIT_S = 15.0
"""How long a read waits for a registry that is restarting (Ray restarts it)."""
RETRY_S = 0.5
CANCEL_ATTEMPTS = 10

log = logging.getLogger("rbee.registry_client")


@dataclass(frozen=True, slots=True)
class EventsPage:
    """A job's events after a point, its state, and the actor that numbers its events now."""

    events: list[StreamEvent]
    state: str
    lease: Lease | None


@dataclass(frozen=True, slots=True)
class CancelAnswer:
    job_ids: list[str]  #: the jobs the cancel is for
    unknown: list[str]  #: ids no job has
    ended: list[str] = field(default_factory=list)  #: with ``wait``: the ones it ended

    def to_dict(self) -> dict[str, list[str]]:
        return {"job_ids": self.job_ids, "unknown": self.unknown}


async def remote(ref: Any) -> Any:
    """Await a Ray call; our errors raised inside an actor come back as themselves."""
    try:
        return await ref
    except Exception as exc:
        cause = rbee_cause(exc)
        if cause is not None and cause is not exc:
            raise cause from None
        raise


class Registry:
    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._mail: list[Adoption | Ending] = []
        self._sending: asyncio.TimerHandle | None = None
        self._delivering: set[asyncio.Task[None]] = set()

    # -- what nothing waits for ------------------------------------------------------------

    def post(self, item: Adoption | Ending) -> None:
        """Queue ``item`` for the registry (see the module's text)."""
        self._mail.append(item)
        if len(self._mail) >= MAIL_MAX:
            self.send()
        elif self._sending is None:
            self._sending = asyncio.get_running_loop().call_later(MAIL_S, self.send)

    def send(self) -> None:
        """Send what is queued now. The call belongs to no request: Ray cancels the calls a
        request made along with it (a client that leaves after its answer, say), and the
        mail holds other requests' jobs too (sent in a context of its own, as a cancel is)."""
        if self._sending is not None:
            self._sending.cancel()
            self._sending = None
        if self._mail:
            mail, self._mail = self._mail, []
            contextvars.Context().run(self.handle.mail.remote, mail)

    def actor_gone(self, actor: str) -> None:
        self.send()
        self.handle.actor_gone.remote(actor)

    def cancel_soon(self, job_id: str, *, correlation_id: str | None = None) -> None:
        """Ask for the job's cancel without waiting: safe in the cleanup of a request Serve
        is cancelling. Ray cancels the calls a request made along with it (``ray.cancel``
        is recursive), and one sent from its cleanup can be dropped before it runs: the
        call is made from a task outside the request's context, and again while dropped."""
        task = asyncio.get_running_loop().create_task(
            self._deliver_cancel(job_id, correlation_id), context=contextvars.Context()
        )
        self._delivering.add(task)
        task.add_done_callback(self._delivering.discard)

    async def _deliver_cancel(self, job_id: str, correlation_id: str | None) -> None:
        for _ in range(CANCEL_ATTEMPTS):
            self.send()
            try:
                await self.handle.cancel.remote([job_id], correlation_id)
                return
            except TaskCancelledError:
                log.warning("the cancel of %s was dropped by Ray: sending it again", job_id)
            except RayError as exc:  # the registry is gone: a restart ends the job anyway
                log.warning("could not cancel %s: %r", job_id, exc)
                return
        log.error("the cancel of %s was dropped %d times", job_id, CANCEL_ATTEMPTS)

    # -- calls -----------------------------------------------------------------------------

    def _call(self, make: Callable[[Any], Any]) -> Any:
        self.send()
        return remote(make(self.handle))

    async def _read(self, make: Callable[[Any], Any], wait_s: float = READ_WAIT_S) -> Any:
        """A read that waits up to ``wait_s`` for a registry that is restarting, rather
        than failing the request; then ``Unavailable``."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                return await self._call(make)
            except RayActorError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise Unavailable(
                        f"the job registry did not come back within {wait_s:g}s"
                    ) from exc
                await asyncio.sleep(RETRY_S)

    async def ready(self) -> None:
        await self._call(lambda r: r.ready.remote())

    async def preloads(self) -> dict[str, dict[str, Any]]:
        return dict(await self._call(lambda r: r.preloads.remote()))

    async def submit(self, request: Any, *, correlation_id: str) -> dict[str, Any]:
        """Start a job; its record."""
        return dict(await self._call(lambda r: r.submit.remote(request, correlation_id)))

    async def job(self, job_id: str, *, request: bool = False) -> dict[str, Any]:
        """The job's record; with ``request``, what it was asked too."""
        return dict(await self._read(lambda r: r.job.remote(job_id, request)))

    async def job_now(self, job_id: str) -> dict[str, Any]:
        """The record, without waiting for a registry that is restarting."""
        return dict(await self._call(lambda r: r.job.remote(job_id)))

    async def forget(self, job_id: str) -> bool:
        """Forget a finished job (False: it has not finished)."""
        return bool(await self._call(lambda r: r.forget.remote(job_id)))

    async def jobs(
        self, *, state: str | None = None, operation: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return list(await self._read(lambda r: r.jobs.remote(state, operation, limit)))

    async def events(self, job_id: str, *, after: int, poll_s: float, live: int) -> EventsPage:
        events, state, lease = await self._call(
            lambda r: r.events.remote(job_id, after, poll_s, live)
        )
        return EventsPage(events, state, lease)

    async def board(
        self, *, after: int | None, limit: int, poll_s: float, epoch: str | None
    ) -> dict[str, Any]:
        return dict(await self._call(lambda r: r.board.remote(after, limit, poll_s, epoch)))

    async def hives(self) -> list[dict[str, Any]]:
        return list(await self._call(lambda r: r.hives.remote()))

    async def models(self) -> list[dict[str, Any]]:
        return list(await self._call(lambda r: r.models.remote()))

    async def routes(self) -> dict[str, list[str]]:
        return dict(await self._call(lambda r: r.routes.remote()))

    async def cancel(
        self,
        job_ids: list[str] | None,
        *,
        correlation_id: str | None = None,
        state: str | None = None,
        operation: str | None = None,
        wait: bool = False,
    ) -> CancelAnswer:
        """The cancel of the jobs named (or, ``job_ids`` None, of every unfinished one of
        ``state`` and ``operation``); with ``wait``, once they are terminal."""
        answer = await self._call(
            lambda r: r.cancel.remote(
                job_ids, correlation_id, state=state, operation=operation, wait=wait
            )
        )
        return CancelAnswer(answer["job_ids"], answer["unknown"], answer.get("ended", []))


__all__ = ["CancelAnswer", "EventsPage", "Registry", "remote"]
