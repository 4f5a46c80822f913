"""rbee from Python inside Ray, through ``serve.get_app_handle("rbee")`` (SPEC §8): from a
plain Ray driver of its own and from another Serve application, with the typed events and
errors of the HTTP client and no HTTP in between."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

from actors.core.errors import JobCancelled, ModelNotFound, rbee_cause
from actors.core.events import Progress
from tests.helpers import random_model, wait_for

MiB = 1 << 20


def _repo(hub, size: int) -> str:
    return random_model(hub, size, "org/handle")


def test_a_ray_driver_of_its_own_uses_rbee_through_the_app_handle(hive, hub):
    repo, slow = _repo(hub, 256 << 10), _repo(hub, 8 * MiB)
    address = ray.get_runtime_context().gcs_address
    hub.throttle_bps = MiB
    try:
        driver = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("handle_driver.py")), address, repo, slow],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        hub.throttle_bps = None
    assert driver.returncode == 0, driver.stderr[-3000:]
    seen = json.loads(driver.stdout.strip().splitlines()[-1])
    assert seen["typed"] and seen["ids"] == list(range(1, len(seen["ids"]) + 1))
    assert {"Narration", "Progress", "Result"} <= set(seen["kinds"])
    assert seen["result"]["model"] == repo and seen["record"]["state"] == "completed"
    assert seen["listed"] and seen["resumed"] == seen["ids"][2:]
    assert seen["run"]["model"] == repo
    assert seen["cancel"] == "JobCancelled" and seen["cancelled_state"] == "cancelled"
    assert seen["cancel_again"] == "JobFinished"
    assert seen["errors"] == {
        "job": "JobNotFound",
        "stream": "JobNotFound",
        "submit": "InvalidRequest",
        "jobs": "InvalidRequest",
        "run": "ModelNotFound",
        "cancel": "no error",  # as POST /v1/jobs/{id}/cancel: 202 for any well-formed id
        "cancel_wait": "JobNotFound",  # as DELETE /v1/jobs/{id}: 404
        "cancel_malformed": "JobNotFound",  # no job-id form: 404 on every route
    }


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Fetcher:
    """A user's deployment that reaches rbee through rbee's own application handle."""

    def __init__(self) -> None:
        self._rbee = serve.get_app_handle("rbee")

    async def fetch(self, model: str) -> dict[str, Any]:
        job_id = await self._rbee.submit.remote({"operation": "model_download", "model": model})
        ids, kinds = [], set()
        async for item in self._rbee.options(stream=True).stream.remote(job_id):
            ids.append(item.id)
            kinds.add(type(item.event).__name__)
        record = await self._rbee.job.remote(job_id)
        return {"job_id": job_id, "ids": ids, "kinds": kinds, "record": record}

    async def cancel_midway(self, model: str) -> dict[str, Any]:
        job_id = await self._rbee.submit.remote({"operation": "model_download", "model": model})
        try:
            async for item in self._rbee.options(stream=True).stream.remote(job_id):
                if isinstance(item.event, Progress) and item.event.bytes_done > 0:
                    await self._rbee.cancel.remote(job_id)
        except JobCancelled as exc:  # Ray's wrapper is also an instance of rbee's error
            return {"raised": type(exc).__name__, "record": await self._rbee.job.remote(job_id)}
        return {"raised": None}

    async def cached(self, model: str) -> dict[str, Any]:
        return await self._rbee.run.remote({"operation": "model_get", "model": model})


def test_a_serve_application_uses_rbee_through_the_app_handle(hive, hub):
    app_name = f"rbee-user-{uuid.uuid4().hex[:6]}"
    handle = serve.run(Fetcher.bind(), name=app_name, route_prefix=None)
    try:
        repo = _repo(hub, MiB)
        out = handle.fetch.remote(repo).result(timeout_s=120)
        assert out["job_id"].startswith("job-")
        assert out["ids"] == list(range(1, len(out["ids"]) + 1))
        assert {"Narration", "Progress", "Result"} <= out["kinds"]
        assert out["record"]["state"] == "completed"
        assert out["record"]["result"]["model"] == repo
        assert handle.cached.remote(repo).result(timeout_s=60)["model"] == repo
        with pytest.raises(Exception) as raised:
            handle.cached.remote("org/absent").result(timeout_s=60)
        assert isinstance(rbee_cause(raised.value), ModelNotFound)
        hub.throttle_bps = MiB
        try:
            cancelled = handle.cancel_midway.remote(_repo(hub, 8 * MiB)).result(timeout_s=120)
        finally:
            hub.throttle_bps = None
        assert "JobCancelled" in cancelled["raised"]
        assert cancelled["record"]["state"] == "cancelled"
    finally:
        serve.delete(app_name)
        wait_for(lambda: app_name not in serve.status().applications, timeout=60)
