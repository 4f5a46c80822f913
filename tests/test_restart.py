"""A registry that dies comes back (Ray restarts it) and still knows its finished jobs."""

from __future__ import annotations

import os
import time
import uuid

import ray

from actors.naming import NAMESPACE, REGISTRY
from tests.helpers import job, pid_of, read_sse, submit, wait_for, wait_state


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


def test_a_registry_killed_mid_job_orphans_nothing(api, hub, cache_dir, worker):
    """kill -9 of the registry while a download and a generation run and a client watches:
    the watcher's stream ends [ERROR], the registry comes back with every finished record,
    both jobs are failed WORKER_DIED (none stays running), the work stops (no byte written,
    no token generated for them), and the next jobs of both kinds work."""
    import signal
    import threading

    finished = submit(api, {"operation": "hive_list"})
    before = wait_state(api, finished, "completed")
    repo = f"org/orphan-{uuid.uuid4().hex[:8]}"
    # 32 MiB at 256 KiB/s: two minutes, unless the restart stops it.
    hub.add_repo(repo, {"config.json": b"{}", "model.bin": os.urandom(32 << 20)})
    folder = cache_dir / f"models--{repo.replace('/', '--')}"
    hub.throttle_bps = 256 << 10
    try:
        download = submit(api, {"operation": "model_download", "model": repo})
        wait_for(lambda: (job(api, download)["progress"] or {}).get("bytes_done", 0) >= 256 << 10)
        op = {"operation": "infer", "model": worker["model"], "prompt": "Once upon a time there",
              "max_tokens": 20_000, "ignore_eos": True}  # fmt: skip
        infer = submit(api, op)
        read_sse(api, f"/v1/jobs/{infer}/stream", on_event=lambda e: e["event"] == "token")
        watched: list = []

        def watch() -> None:
            try:
                watched.append(read_sse(api, f"/v1/jobs/{infer}/stream", deadline_s=60))
            except BaseException as exc:  # seen by the assertion below
                watched.append(exc)

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.5)
        os.kill(pid_of(REGISTRY), signal.SIGKILL)
        watcher.join(70)
        assert len(watched) == 1 and not isinstance(watched[0], BaseException), watched
        assert watched[0].sentinel.startswith("[ERROR]"), watched[0].events[-3:]

        wait_for(lambda: _answers(api, finished), timeout=60, interval=0.5)
        assert api.get(f"/v1/jobs/{finished}").json() == before
        for job_id in (download, infer):
            record = wait_state(api, job_id, "failed", "completed", "cancelled", timeout=10)
            assert record["state"] == "failed" and record["error"]["code"] == "WORKER_DIED"
            assert record["error"]["retriable"] is True

        # The work itself stopped: nothing more is written (a parallel transfer makes its
        # partial file whole-sized at once: the blocks written count), the engine goes idle.
        def written() -> list[tuple[str, int, int]]:
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            return [(p.name, p.stat().st_blocks, p.stat().st_mtime_ns) for p in files]

        def still() -> bool:
            first = written()
            time.sleep(2)
            return written() == first

        wait_for(still, timeout=10)
        wait_for(lambda: _unfinished(api, worker["worker_id"]) == 0, timeout=10)
    finally:
        hub.throttle_bps = None

    again = submit(api, {"operation": "model_download", "model": repo})
    assert read_sse(api, f"/v1/jobs/{again}/stream", deadline_s=60).sentinel == "[DONE]"
    short = submit(api, {**op, "max_tokens": 8})
    assert read_sse(api, f"/v1/jobs/{short}/stream", deadline_s=60).sentinel == "[DONE]"


def _unfinished(api, worker_id: str) -> int:
    listed = wait_state(api, submit(api, {"operation": "worker_list"}), "completed")
    mine = [w for w in listed["result"]["workers"] if w["worker_id"] == worker_id]
    return int(mine[0]["unfinished_requests"])
