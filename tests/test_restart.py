"""A registry that dies comes back (Ray restarts it) and still knows its finished jobs."""

from __future__ import annotations

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
