"""Cancel, each form: the work stops on the server, partial files go, streams end right."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from actors.core.table import new_job_id
from tests.helpers import job, read_sse, submit, wait_for, wait_state

MiB = 1 << 20


@pytest.fixture
def slow_hub(hub):
    hub.throttle_bps = 2 * MiB
    yield hub
    hub.throttle_bps = None


def _start_download(api, hub, size: int) -> tuple[str, str]:
    repo = f"org/c-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo, {"model.bin": os.urandom(size)})
    job_id = submit(api, {"operation": "model_download", "model": repo})
    wait_for(lambda: (job(api, job_id)["progress"] or {}).get("bytes_done", 0) > 0, timeout=30)
    return repo, job_id


def _leftovers(cache_dir: Path, repo: str) -> list[Path]:
    blobs = cache_dir / f"models--{repo.replace('/', '--')}" / "blobs"
    return list(blobs.iterdir()) if blobs.is_dir() else []


def _assert_cancelled_stream(api, job_id: str, cid: str | None = None) -> None:
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=20)
    assert stream.sentinel == "[CANCELLED]"
    assert stream.events[-1]["event"] == "error"
    assert stream.events[-1]["data"]["code"] == "CANCELLED"
    actions = [n["action"] for n in stream.of("narration")]
    assert "cancel" in actions and "cancel_complete" in actions
    assert actions.index("cancel") < actions.index("cancel_complete")
    if cid is not None:
        for narration in stream.of("narration"):
            if narration["action"].startswith("cancel"):
                assert narration["correlation_id"] == cid
    complete = next(n for n in stream.of("narration") if n["action"] == "cancel_complete")
    last_write = re.search(r"last byte written (-?\d+) ms after the cancel", complete["message"])
    if last_write:
        assert int(last_write.group(1)) < 500


@pytest.mark.parametrize("size", [3 * MiB, 12 * MiB], ids=["sequential", "parallel-ranges"])
def test_delete_stops_a_running_download_and_removes_the_partial(api, slow_hub, cache_dir, size):
    repo, job_id = _start_download(api, slow_hub, size)
    started = time.monotonic()
    response = api.delete(f"/v1/jobs/{job_id}", headers={"X-Correlation-Id": "cancel-1"})
    assert time.monotonic() - started < 5
    assert response.status_code == 200
    assert response.json() == {"job_id": job_id, "status": "cancelled"}
    record = job(api, job_id)
    assert record["state"] == "cancelled" and record["finished_at"] is not None
    assert _leftovers(cache_dir, repo) == []
    _assert_cancelled_stream(api, job_id, cid="cancel-1")
    gets = slow_hub.count("GET", f"{repo}/resolve/")
    time.sleep(0.5)
    assert slow_hub.count("GET", f"{repo}/resolve/") == gets, "the transfer came back"
    again = api.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "JOB_FINISHED"


@pytest.mark.parametrize("form", ["path", "body"])
def test_post_cancel_answers_202_at_once_and_is_idempotent(api, slow_hub, cache_dir, form):
    repo, job_id = _start_download(api, slow_hub, 3 * MiB)

    def cancel():
        if form == "path":
            return api.post(f"/v1/jobs/{job_id}/cancel", headers={"X-Correlation-Id": "c-2"})
        return api.post("/cancel", json={"job_id": job_id}, headers={"X-Correlation-Id": "c-2"})

    first = cancel()
    assert first.status_code == 202
    assert first.json() == {"job_id": job_id, "status": "cancelling"}
    assert cancel().status_code == 202
    wait_state(api, job_id, "cancelled", timeout=5)
    assert cancel().status_code == 202
    assert _leftovers(cache_dir, repo) == []
    _assert_cancelled_stream(api, job_id, cid="c-2")


def test_cancel_of_unknown_job_is_202_and_logged(api, ray_dir):
    never = new_job_id()
    for response in (
        api.post(f"/v1/jobs/{never}/cancel", headers={"X-Correlation-Id": "ghost-1"}),
        api.post("/cancel", json={"job_id": never}, headers={"X-Correlation-Id": "ghost-2"}),
    ):
        assert response.status_code == 202
    assert api.delete(f"/v1/jobs/{never}").status_code == 404

    def warned():
        lines = []
        for path in (ray_dir / "session_latest" / "logs").glob("worker-*.err"):
            lines += [x for x in path.read_text(errors="replace").splitlines() if never in x]
        return len([x for x in lines if "ghost-" in x]) >= 2 and lines

    lines = wait_for(warned, timeout=20, interval=0.2)
    line = next(x for x in lines if "cid=ghost-1" in x)
    assert "WARNING" in line and f"job_id={never}" in line and "rbee.jobs" in line


@pytest.mark.parametrize("job_id", ["job-never", "../../etc/passwd", "job-" + "0" * 36, new_job_id().upper()])
def test_a_cancel_of_what_is_no_job_id_is_404(api, job_id):
    """An id without the job-id form names no job: every cancel form answers 404 (a
    well-formed unknown id stays 202), and nothing reaches the registry."""
    in_path = quote(job_id, safe="")
    for response in (
        api.post(f"/v1/jobs/{in_path}/cancel"),
        api.post("/cancel", json={"job_id": job_id}),
        api.post("/v1/jobs/cancel", json={"job_ids": [new_job_id(), job_id]}),
        api.delete(f"/v1/jobs/{in_path}"),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "JOB_NOT_FOUND"


@pytest.mark.parametrize("body", [{}, {"job_id": ""}, {"job_id": 5}, {"job_id": None}, []])
def test_cancel_body_needs_a_job_id(api, body):
    response = api.post("/cancel", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


def test_a_queued_job_cancelled_never_starts(api, slow_hub, cache_dir):
    running = [_start_download(api, slow_hub, 64 * MiB) for _ in range(2)]  # the limit is 2
    repo = f"org/q-{uuid.uuid4().hex[:8]}"
    slow_hub.add_repo(repo, {"model.bin": os.urandom(MiB)})
    queued = submit(api, {"operation": "model_download", "model": repo})
    time.sleep(0.3)
    assert job(api, queued)["state"] == "queued"
    response = api.delete(f"/v1/jobs/{queued}", headers={"X-Correlation-Id": "q-1"})
    assert response.status_code == 200
    for _, job_id in running:
        assert api.delete(f"/v1/jobs/{job_id}").status_code == 200
    record = job(api, queued)
    assert record["state"] == "cancelled" and record["started_at"] is None
    _assert_cancelled_stream(api, queued, cid="q-1")
    time.sleep(0.5)
    assert slow_hub.count(path_contains=repo) == 0, "a cancelled queued job reached the hub"
    assert _leftovers(cache_dir, repo) == []


def test_cancelling_one_of_two_shared_downloads_leaves_the_other_running(api, slow_hub, cache_dir):
    repo, first = _start_download(api, slow_hub, 3 * MiB)
    second = submit(api, {"operation": "model_download", "model": repo})
    # It shares the transfer once it reports bytes ("running" comes before it has joined).
    wait_for(lambda: (job(api, second)["progress"] or {}).get("bytes_done", 0) > 0)
    assert api.delete(f"/v1/jobs/{first}").status_code == 200
    stream = read_sse(api, f"/v1/jobs/{second}/stream", deadline_s=30)
    assert stream.sentinel == "[DONE]"
    assert slow_hub.count("GET", f"{repo}/resolve/") == 1
    assert [p.name for p in _leftovers(cache_dir, repo) if p.name.endswith(".incomplete")] == []


def test_every_cancelled_job_is_terminal_within_5s(api, slow_hub):
    jobs = [_start_download(api, slow_hub, 3 * MiB)[1] for _ in range(2)]
    queued = [submit(api, {"operation": "model_download", "model": "org/none"}) for _ in range(3)]
    started = time.monotonic()
    for job_id in jobs + queued:
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    for job_id in jobs + queued:
        wait_state(api, job_id, "cancelled", "failed", timeout=5)
    assert time.monotonic() - started < 5


def test_bulk_cancel_of_queued_jobs(api, slow_hub):
    running = [_start_download(api, slow_hub, 64 * MiB)[1] for _ in range(2)]
    queued = [submit(api, {"operation": "model_download", "model": "org/bulk"}) for _ in range(20)]
    assert all(job(api, j)["state"] == "queued" for j in queued)
    response = api.post("/v1/jobs/cancel", json={"state": "queued", "operation": "model_download"})
    assert response.status_code == 202
    assert set(queued) <= set(response.json()["job_ids"])
    for job_id in queued:
        record = wait_state(api, job_id, "cancelled", timeout=5)
        assert record["started_at"] is None
    ghost = new_job_id()
    by_id = api.post("/v1/jobs/cancel", json={"job_ids": [*running, ghost]})
    assert by_id.status_code == 202
    assert by_id.json()["unknown"] == [ghost]
    for job_id in running:
        wait_state(api, job_id, "cancelled", timeout=5)


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"job_ids": "x"},
        {"job_ids": [1]},
        {"state": "completed"},
        {"operation": "dance"},
        {"job_ids": ["a"], "state": "queued"},
        {"what": 1},
    ],
)
def test_bulk_cancel_refuses_bad_bodies(api, body):
    response = api.post("/v1/jobs/cancel", json=body)
    assert response.status_code == 422
