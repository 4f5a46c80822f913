"""The Ray Serve deployment that hosts the Starlette ingress, and rbee's Python API inside Ray.

``serve run configs/serve.yaml`` imports ``serve_app.server.deployment:app_builder``; ``rbee serve``
binds ``INGRESS`` itself. Either way the replica brings up (or finds) rbee's actors.

Python code inside the Ray cluster (a driver, a task, another Serve application) calls the
same replica through ``serve.get_app_handle("rbee")``, with no HTTP in between (SPEC §8)::

    rbee = serve.get_app_handle("rbee")
    job_id = await rbee.submit.remote({"operation": "model_download", "model": "org/name"})
    async for item in rbee.options(stream=True).stream.remote(job_id):
        ...                      # StreamEvent(id, event): Narration, Progress, Token, Result, ...
    await rbee.cancel.remote(job_id)

Events are the typed events of ``actors.core.events``; errors are rbee's own classes from
``actors.core.errors`` (Ray wraps them in a ``RayTaskError`` that is also an instance of
them), exactly as the HTTP client raises them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from actors.cluster import ON_HEAD, ensure_cluster
from actors.core.config import Config
from actors.core.errors import InvalidRequest
from actors.core.events import StreamEvent
from actors.registry_client import Registry
from serve_app.server.app import build_app, check_job_id
from serve_app.server.jobstream import (
    JobStream,
    check_cancelled,
    check_listing,
    new_correlation_id,
)

APP_NAME = "rbee"
SOURCE_TREE = Path(__file__).resolve().parents[2]
"""The folder holding ``serve_app/`` (a checkout, for a source or editable install)."""


class Ingress:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._handle = ensure_cluster(config)
        self._registry = Registry(self._handle)
        self._jobs = JobStream(config, self._registry)

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self._config, self._handle, self._jobs)

    # -- the Python API through Serve handles (the HTTP client's methods, without HTTP) --

    async def submit(self, op: Mapping[str, Any], correlation_id: str | None = None) -> str:
        """Start a job (SPEC §3) and return its id at once."""
        cid = correlation_id or new_correlation_id()
        record = await self._registry.submit(dict(op), correlation_id=cid)
        return str(record["job_id"])

    async def stream(self, job_id: str, last_event_id: int = 0) -> AsyncIterator[StreamEvent]:
        """The job's events after ``last_event_id``, live (call with
        ``.options(stream=True)``): ends if the job completed, raises its error if it failed
        and ``JobCancelled`` if it was cancelled."""
        _check_job_id(job_id)
        if isinstance(last_event_id, bool) or not isinstance(last_event_id, int) or last_event_id < 0:
            raise InvalidRequest("last_event_id must be a non-negative integer")
        await self._registry.job(job_id)
        async for item in self._jobs.events(job_id, last_event_id):
            yield item

    async def cancel(self, job_id: str, wait: bool = False) -> None:
        """Ask for the cancel and return at once, whatever the job (as the HTTP client's
        ``cancel``: ``POST /v1/jobs/{id}/cancel`` is 202 for any id); with ``wait``, return
        once the job is cancelled and raise ``JobNotFound``/``JobFinished`` if there was
        nothing to stop (``DELETE /v1/jobs/{id}``)."""
        _check_job_id(job_id)
        answer = await self._registry.cancel([job_id], wait=wait)
        if wait:
            check_cancelled(job_id, answer)

    async def job(self, job_id: str) -> dict[str, Any]:
        _check_job_id(job_id)
        return await self._registry.job(job_id)

    async def jobs(
        self, state: str | None = None, operation: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Jobs, newest first."""
        check_listing(state, operation, limit)
        return await self._registry.jobs(state=state, operation=operation, limit=limit)

    async def run(self, op: Mapping[str, Any], correlation_id: str | None = None) -> dict[str, Any]:
        """Submit ``op``, wait for it and return its result (or raise its error)."""
        return await self._jobs.result(await self.submit(op, correlation_id))


def _check_job_id(job_id: Any) -> None:
    if not isinstance(job_id, str):
        raise InvalidRequest("job_id must be a string")
    check_job_id(job_id)


# Serve's decorators, applied as calls: a class decorator does not change what a type
# checker thinks the class is, and ``INGRESS.bind`` is what Serve adds.
INGRESS = serve.deployment(
    name="rbee-ingress",
    num_replicas=1,
    # On the head, with the registry: a node that leaves never takes the ingress along.
    ray_actor_options={"num_cpus": 0, "resources": ON_HEAD},
    max_ongoing_requests=10_000,
)(serve.ingress()(Ingress))


def app_builder(args: dict[str, Any]) -> Application:
    """Builder for ``serve run``/``serve deploy``: ``args`` may name a ``config`` file.

    Serve builds the application on the cluster, in a worker whose folder is the one Ray was
    started in, not the one ``serve deploy`` ran in: a relative ``config`` is looked for
    there, then in rbee's own source tree (``configs/rbee.yaml`` of a checkout)."""
    given = args.get("config")
    return INGRESS.bind(Config.load(config_file(given) if given else None))


def config_file(given: str, where: Path | None = None) -> Path:
    """The config file ``given`` names: as is if absolute; else in ``where`` (the working
    folder), then in rbee's source tree; ``FileNotFoundError`` naming both otherwise."""
    path = Path(given).expanduser()
    if path.is_absolute():
        return path
    places = [where or Path.cwd(), SOURCE_TREE]
    for place in places:
        if (place / path).is_file():
            return place / path
    raise FileNotFoundError(
        f"rbee's config {given!r} is in none of {[str(p) for p in places]}: give an absolute "
        "path in the Serve config's args.config (or set RBEE_CONFIG on the cluster)"
    )
