"""The jobs board (``GET /v1/jobs/watch``), the hives (``GET /v1/hives``) and the page's own
files, on the real server."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from actors.core.config import Config
from serve_app import sse
from serve_app.server.app import build_app
from serve_app.server.page import WEB
from tests.helpers import random_model, submit, wait_state

pytestmark = pytest.mark.ray

MiB = 1 << 20
_POSITION = re.compile(r"[0-9a-f]{12}\.[0-9]+")


def watch(
    client: httpx.Client,
    until: Callable[[list[dict[str, Any]]], bool],
    *,
    deadline_s: float = 30.0,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The board's frames (``{"id", **data}``) until ``until(frames)``; fails past the deadline."""
    frames: list[dict[str, Any]] = []
    parser = sse.Parser()
    end = time.monotonic() + deadline_s
    with client.stream(
        "GET", "/v1/jobs/watch", headers=headers, params=params, timeout=deadline_s
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < end, f"the board did not show it within {deadline_s}s"
            frame = parser.feed(line)
            if frame is None:
                continue
            assert frame.kind == "jobs"
            frames.append({"id": frame.raw_id, **frame.json()})
            if until(frames):
                return frames
    raise AssertionError("the board's stream ended by itself")


def rows_of(frames: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The board as a watcher builds it from the frames."""
    board: dict[str, dict[str, Any]] = {}
    for frame in frames:
        if frame["reset"]:
            board = {}
        board.update({row["job_id"]: row for row in frame["jobs"]})
        for job_id in frame["forgotten"]:
            board.pop(job_id, None)
    return board


def test_the_board_sends_itself_whole_then_what_changes(api):
    first = watch(api, lambda frames: True)[0]
    assert first["reset"] and _POSITION.fullmatch(first["id"])
    job_id = submit(api, {"operation": "hive_list"})

    def done(frames: list[dict[str, Any]]) -> bool:
        row = rows_of(frames).get(job_id)
        return row is not None and row["state"] == "completed"

    frames = watch(api, done, headers={"Last-Event-ID": first["id"]})
    assert not any(f["reset"] for f in frames)  # only what changed since the first frame
    assert all(job_id in {r["job_id"] for r in f["jobs"]} for f in frames)
    row = rows_of(frames)[job_id]
    assert row["operation"] == "hive_list" and row["finished_at"] >= row["created_at"]
    assert {"progress", "error", "model", "tokens", "cancel_requested"} <= set(row)
    # The same position as a query parameter (for clients that cannot set headers).
    again = watch(api, done, params={"last_event_id": first["id"]})
    assert not again[0]["reset"]


def test_a_position_the_board_cannot_follow_gets_it_whole(api):
    for position in ("0123456789ab.1", "ffffffffffff.999999999999", "a.0"):
        assert watch(api, lambda frames: True, headers={"Last-Event-ID": position})[0]["reset"]
    for bad in ("12", "x.1", "a.b", "a.1.2", ".1", "a.-1", "a." + "9" * 19):
        refused = api.get("/v1/jobs/watch", headers={"Last-Event-ID": bad})
        assert refused.status_code == 422, bad
        assert refused.json()["error"]["code"] == "INVALID_REQUEST"
    for limit in ("0", "10001", "x", "-1"):
        assert api.get("/v1/jobs/watch", params={"limit": limit}).status_code == 422


def test_a_download_moves_on_the_board_and_its_cancel_shows(api, hub):
    model = random_model(hub, 3 * MiB, "org/board")  # one connection (under parallel_min_size)
    hub.throttle_bps = MiB // 2
    try:
        job_id = submit(api, {"operation": "model_download", "model": model})
        seen: list[dict[str, Any]] = []

        def moving(frames: list[dict[str, Any]]) -> bool:
            row = rows_of(frames).get(job_id)
            if row and row["progress"]:
                seen.append(row["progress"])
            return len({p["bytes_done"] for p in seen}) >= 3

        frames = watch(api, moving)
        assert rows_of(frames)[job_id]["model"] == model
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

        def cancelled(frames: list[dict[str, Any]]) -> bool:
            row = rows_of(frames).get(job_id)
            return row is not None and row["state"] == "cancelled"

        frames = watch(api, cancelled, headers={"Last-Event-ID": frames[-1]["id"]})
        assert any(r["cancel_requested"] for f in frames for r in f["jobs"])
    finally:
        hub.throttle_bps = None


def test_a_busy_board_sends_a_few_frames_a_second(api, hive):
    """However often jobs change, one watcher gets at most ~4 frames a second."""
    first = watch(api, lambda frames: True)[0]
    submitted: list[str] = []

    def submit_spread() -> None:
        with httpx.Client(base_url=hive.url, timeout=30) as client:
            for _ in range(40):
                submitted.append(submit(client, {"operation": "hive_list"}))
                time.sleep(0.05)

    submitting = threading.Thread(target=submit_spread)
    started = time.monotonic()
    submitting.start()

    def all_done(frames: list[dict[str, Any]]) -> bool:
        board = rows_of(frames)
        return len(submitted) == 40 and all(
            board.get(j, {}).get("state") == "completed" for j in submitted
        )

    try:
        frames = watch(api, all_done, headers={"Last-Event-ID": first["id"]})
    finally:
        submitting.join()
    took = time.monotonic() - started
    assert took >= 2.0  # the jobs came one by one over 2 s
    assert len(frames) <= took / 0.25 + 2, (len(frames), took)


def test_hives_are_listed_without_a_job(api):
    before = len(api.get("/v1/jobs", params={"limit": 10000}).json()["jobs"])
    hives = api.get("/v1/hives").json()["hives"]
    assert len(hives) == 1 and hives[0]["answered"] is True
    assert {"hive_id", "cpus", "gpus", "models", "workers", "free_gpus"} <= set(hives[0])
    assert len(api.get("/v1/jobs", params={"limit": 10000}).json()["jobs"]) == before


def test_the_page_and_its_files(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "/ui/app.js" in page.text and "/ui/app.css" in page.text
    script = api.get("/ui/app.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert api.head("/").status_code == 200
    worker = api.get("/sw.js")
    assert worker.status_code == 200 and "javascript" in worker.headers["content-type"]
    # The service worker keeps every file of the page, and only those.
    kept = set(re.findall(r'"(/ui/[^"]+)"', worker.text))
    files = {f"/ui/{p.name}" for p in WEB.iterdir() if p.name not in ("index.html", "sw.js")}
    assert kept == files and '"/"' in worker.text
    for missing in ("/ui/nope.js", "/ui/../actors/core/config.py", "/ui/%2e%2e/actors/core/config.py"):
        response = api.get(missing)
        assert response.status_code == 404, missing
        assert response.json()["error"]["code"] == "NOT_FOUND"


def test_the_page_and_the_board_need_the_token(hive):
    import ray

    from actors.naming import NAMESPACE, REGISTRY

    config = Config.load(env={"RBEE_API_TOKEN": "s3cret"})
    registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
    with TestClient(build_app(config, registry), base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
        for path in ("/", "/ui/app.css", "/sw.js", "/v1/jobs/watch", "/v1/hives"):
            refused = client.get(path)
            assert refused.status_code == 401, path
            assert refused.json()["error"]["code"] == "UNAUTHORIZED"
        hives = client.get("/v1/hives", headers={"Authorization": "Bearer s3cret"})
        assert hives.status_code == 200 and hives.json()["hives"]
        assert client.get("/ui/app.css", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_board_watcher_rides_through_a_registry_restart(api):
    """The registry dies and Ray starts it again: the open stream goes on, with the whole
    board again (of the new registry's epoch), the finished jobs still on it."""
    import ray

    from actors.naming import NAMESPACE, REGISTRY

    job_id = submit(api, {"operation": "hive_status"})
    wait_state(api, job_id, "completed")
    killed: list[str] = []

    def until(frames: list[dict[str, Any]]) -> bool:
        if not killed:
            killed.append(frames[-1]["id"].split(".")[0])
            ray.kill(ray.get_actor(REGISTRY, namespace=NAMESPACE), no_restart=False)
            return False
        return bool(frames[-1]["reset"]) and frames[-1]["id"].split(".")[0] != killed[0]

    frames = watch(api, until, deadline_s=90)
    assert job_id in {row["job_id"] for row in frames[-1]["jobs"]}
