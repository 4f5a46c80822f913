"""A registry that dies comes back (Ray restarts it) and still knows its finished jobs."""

from __future__ import annotations

import os
import uuid

import ray

from actors.naming import NAMESPACE, REGISTRY
from tests.helpers import read_sse, submit, wait_for, wait_state


def test_registry_restart_keeps_finished_jobs(api):
    job_id = submit(api, {"operation": "hive_status"}, **{"X-Correlation-Id": "keep-me"})
    before = wait_state(api, job_id, "completed")
    ray.kill(ray.get_actor(REGISTRY, namespace=NAMESPACE), no_restart=False)

    def back():
        try:
            return api.get(f"/v1/jobs/{job_id}").status_code == 200
        except Exception:
            return False

    wait_for(back, timeout=60, interval=0.5)
    after = api.get(f"/v1/jobs/{job_id}").json()
    assert after == before
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=20)
    assert stream.sentinel == "[DONE]" and stream.of("result")
    fresh = submit(api, {"operation": "hive_list"})
    assert wait_state(api, fresh, "completed")["result"]["hives"]


def test_a_restart_keeps_every_record_completed_failed_and_cancelled(api, hub):
    repo = f"org/restart-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo, {"config.json": b"{}", "model.bin": os.urandom(4 << 20)})
    completed = submit(api, {"operation": "hive_list"})
    wait_state(api, completed, "completed")
    failed = submit(api, {"operation": "worker_stop", "worker_id": "w-none"})
    wait_state(api, failed, "failed")
    hub.throttle_bps = 256 << 10
    try:
        cancelled = submit(api, {"operation": "model_download", "model": repo})
        wait_state(api, cancelled, "running")
        assert api.delete(f"/v1/jobs/{cancelled}").status_code == 200
    finally:
        hub.throttle_bps = None
    ids = [completed, failed, cancelled]
    before = [api.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    listed = [j["job_id"] for j in api.get("/v1/jobs", params={"limit": 3}).json()["jobs"]]
    assert listed == ids[::-1]

    ray.kill(ray.get_actor(REGISTRY, namespace=NAMESPACE), no_restart=False)
    wait_for(lambda: _answers(api, cancelled), timeout=60, interval=0.5)
    assert [api.get(f"/v1/jobs/{job_id}").json() for job_id in ids] == before
    assert [b["state"] for b in before] == ["completed", "failed", "cancelled"]
    again = [j["job_id"] for j in api.get("/v1/jobs", params={"limit": 3}).json()["jobs"]]
    assert again == listed


def _answers(api, job_id: str) -> bool:
    try:
        return api.get(f"/v1/jobs/{job_id}").status_code == 200
    except Exception:
        return False
