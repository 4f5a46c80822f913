"""``rbee serve`` as an operator runs it: a real process in a session of its own, with its own
Ray. Start-up never waits for a preload; a failed or cancelled preload leaves the server
serving; a request waits for a worker that is loading; SIGTERM (to the process or to its
whole group, as systemd sends it) cancels and records the running jobs and ends every process
within 15 s, leaving no shared memory behind.

Each test starts a Ray of its own (~15 s): they are few. They only ever signal the processes
they started, found by the server's session id and process tree.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from actors.adapters.cache import RepoLayout
from actors.core.store import JobStore
from actors.core.table import JobState
from actors.procs import shared_memory, unmapped
from tests.helpers import submit, wait_for, wait_state
from tests.servers import Served, alive, serving

TINY = "test/tiny-llama"
SHUTDOWN_S = 15.0


def _shared_memory(processes: dict[int, float]) -> set[Path]:
    """The /dev/shm files these processes map."""
    return {path for pid in alive(processes) for path in shared_memory(pid)}


def _stop(served: Served, *, to_group: bool) -> set[Path]:
    """SIGTERM the server (or its whole group); every one of its processes must be gone
    within 15 s and the shared memory they mapped removed. Returns those segments."""
    processes = served.processes()
    segments = _shared_memory(processes)
    assert len(processes) > 5, "Ray's daemons and workers should be running"
    started = time.monotonic()
    if to_group:
        os.killpg(served.process.pid, signal.SIGTERM)
    else:
        served.process.send_signal(signal.SIGTERM)
    try:
        wait_for(lambda: not alive(processes), timeout=SHUTDOWN_S, interval=0.1)
    except AssertionError:
        left = [psutil.Process(p).cmdline()[:2] for p in alive(processes)]
        raise AssertionError(
            f"still running after {SHUTDOWN_S}s: {left}\n{served.output()}"
        ) from None
    assert time.monotonic() - started < SHUTDOWN_S
    assert served.process.wait(timeout=1) == 0, served.output()
    assert [s for s in segments if s.exists()] == [], served.output()
    return segments


def _semaphores() -> set[Path]:
    return set(Path("/dev/shm").glob("sem.mp-*"))


def _left_semaphores(before: set[Path]) -> set[Path]:
    """The semaphores made since ``before`` that no running process holds: left behind. (Other
    servers on the machine, the session's among them, make and remove their own meanwhile.)"""
    return unmapped(_semaphores() - before)


def _hub_that_never_answers() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def _cache_tiny_llama(cache_dir: Path, build_dir: Path) -> None:
    """The tiny test Llama, written into the cache as a download would leave it."""
    from tests.tinymodel import build_tiny_llama

    layout = RepoLayout.of(cache_dir, TINY)
    commit = hashlib.sha1(TINY.encode()).hexdigest()
    for path, data in build_tiny_llama(build_dir).items():
        etag = hashlib.sha256(data).hexdigest()
        layout.blob(etag).parent.mkdir(parents=True, exist_ok=True)
        layout.blob(etag).write_bytes(data)
        layout.link(commit, path, etag)
    layout.write_ref("main", commit)


def _result(api: httpx.Client, op: dict[str, Any]) -> dict[str, Any]:
    return dict(wait_state(api, submit(api, op), "completed")["result"])


def test_a_failed_or_cancelled_preload_leaves_the_server_serving(tmp_path):
    pytest.importorskip("vllm")
    cache = tmp_path / "cache"
    _cache_tiny_llama(cache, tmp_path / "tiny")
    semaphores = _semaphores()
    with (
        serving(tmp_path, cache, preload=["nobody/missing", TINY]) as served,
        httpx.Client(base_url=served.url, timeout=30, verify=False) as api,
    ):

        def preload() -> dict[str, Any]:
            return dict(_result(api, {"operation": "hive_status"})["preload"])

        # Start-up did not wait: the tiny model is still loading, the missing one failed.
        status = wait_for(
            lambda: (p := preload()).keys() == {"nobody/missing", TINY} and p, interval=0.5
        )
        assert status[TINY]["state"] == "loading", status
        cancel = api.post(f"/v1/jobs/{status[TINY]['job_id']}/cancel")
        assert cancel.status_code == 202
        wait_state(api, status[TINY]["job_id"], "cancelled")
        status = wait_for(
            lambda: (p := preload())["nobody/missing"]["state"] == "failed" and p, interval=0.5
        )
        assert status["nobody/missing"]["error"]["code"] == "MODEL_NOT_FOUND"
        assert status[TINY]["state"] == "cancelled"
        health = api.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        reported = health.json()["preload"]  # the failure is reported, the server serves on
        assert reported["nobody/missing"]["state"] == "failed"
        assert reported["nobody/missing"]["error"]["code"] == "MODEL_NOT_FOUND"
        assert reported[TINY]["state"] == "cancelled"
        assert _result(api, {"operation": "hive_list"})["hives"]
        logged = ("preloading nobody/missing failed", f"preloading {TINY} was cancelled")
        wait_for(lambda: all(line in served.output() for line in logged), timeout=10)

        # A request for a model whose worker is loading waits for that worker.
        spawn = submit(api, {"operation": "worker_spawn", "model": TINY, "worker_id": "w-first"})

        def loading() -> bool:
            workers = _result(api, {"operation": "worker_list"})["workers"]
            return [(w["worker_id"], w["state"]) for w in workers] == [("w-first", "loading")]

        wait_for(loading, timeout=60, interval=0.2)
        op = {"operation": "infer", "model": TINY, "prompt": "The capital", "max_tokens": 4}
        infer = wait_state(api, submit(api, op), "completed", "failed", timeout=300)
        assert infer["state"] == "completed", infer
        assert infer["result"]["worker_id"] == "w-first"
        assert wait_state(api, spawn, "completed")["result"]["worker_id"] == "w-first"
        assert [w["worker_id"] for w in _result(api, {"operation": "worker_list"})["workers"]] == [
            "w-first"
        ]
        assert preload()[TINY]["state"] == "ready"

        # (vLLM's OpenAI serving leaves a semaphore of multiprocessing's with the resource
        # tracker on its first request)
        chat = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert api.post("/v1/chat/completions", json=chat).status_code == 200

        # A group SIGTERM kills the raylet under a live engine: its processes, its shared
        # memory and the semaphores the resource trackers hold must go all the same.
        running = [psutil.Process(p) for p in alive(served.processes())]
        names = [(proc.name(), proc.cmdline()[:2]) for proc in running]
        assert any(name == "VLLM::EngineCore" for name, _ in names), (names, served.output())
        _stop(served, to_group=True)
    deadline = time.monotonic() + 5  # (one that another process is removing may show a moment)
    while (left := _left_semaphores(semaphores)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"semaphores left in /dev/shm: {sorted(left)}"


def test_two_cold_starts_at_once_answer_their_own_jobs_and_each_ends_on_sigterm(tmp_path):
    """Two servers start on one machine at once. For each, a job submitted the moment its
    ``/health`` first answers 200 is made (never Serve's 404 of a route table not filled
    yet), on that server: the other has never heard of it. Then a SIGTERM, to the first's
    process group and to the second's process alone, while a download hangs on a hub that
    never answers: every process of each ends, the download is recorded cancelled and the
    finished job completed (the other server serving on meanwhile)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    from tests.conftest import free_port

    ports = [free_port(), free_port()]
    first: dict[int, httpx.Response] = {}

    def submit_at_first_health(port: int, until: float) -> None:
        url = f"http://127.0.0.1:{port}"
        while time.monotonic() < until:
            try:
                healthy = httpx.get(f"{url}/health", timeout=1, verify=False).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy:
                first[port] = httpx.post(
                    f"{url}/v1/jobs", json={"operation": "hive_list"}, timeout=30
                )
                return
            time.sleep(0.05)

    until = time.monotonic() + 240
    watchers = [threading.Thread(target=submit_at_first_health, args=(p, until)) for p in ports]
    for watcher in watchers:
        watcher.start()
    for p in ports:
        (tmp_path / str(p)).mkdir()
    hub = _hub_that_never_answers()
    endpoint = f"http://127.0.0.1:{hub.getsockname()[1]}"
    contexts = [serving(tmp_path / str(p), port=p, hub={"endpoint": endpoint}) for p in ports]
    with hub, ExitStack() as stack:
        with ThreadPoolExecutor(2) as pool:
            starts = [pool.submit(c.__enter__) for c in contexts]
        for context, start in zip(contexts, starts, strict=True):
            if start.exception() is None:
                stack.push(context.__exit__)
        served = [start.result() for start in starts]
        for watcher in watchers:
            watcher.join(timeout=60)
        assert sorted(first) == sorted(ports)
        for own, other in ((served[0], served[1]), (served[1], served[0])):
            answer = first[int(own.url.rsplit(":", 1)[1])]
            assert answer.status_code == 201, answer.text
            job_id = answer.json()["job_id"]
            assert httpx.get(f"{own.url}/v1/jobs/{job_id}", timeout=10).status_code == 200
            assert httpx.get(f"{other.url}/v1/jobs/{job_id}", timeout=10).status_code == 404

        jobs = {}
        for each in served:
            with httpx.Client(base_url=each.url, timeout=30) as api:
                done = submit(api, {"operation": "hive_list"})
                wait_state(api, done, "completed")
                stuck = submit(api, {"operation": "model_download", "model": "org/stuck"})
                wait_state(api, stuck, "running")
                jobs[each.url] = done, stuck
        _stop(served[0], to_group=True)
        assert httpx.get(f"{served[1].url}/health", timeout=10).status_code == 200
        _stop(served[1], to_group=False)

    for each in served:
        done, stuck = jobs[each.url]
        back = {saved["job_id"]: saved for saved, _ in JobStore(each.state_dir).load()}
        assert back[done]["state"] == JobState.COMPLETED
        assert back[stuck]["state"] == JobState.CANCELLED, back[stuck]
        assert "shutting down" in each.output()
