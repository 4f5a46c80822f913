"""Worker lifecycle: GPU pinning (2 fake GPUs), stop frees the engine, cancel during load."""

from __future__ import annotations

import json
import time

import httpx
import psutil
import pytest
import ray

from actors.naming import NAMESPACE, worker_name
from actors.procs import Leftovers
from tests.helpers import alive_actors, pid_of, read_sse, submit, wait_for, wait_state

pytest.importorskip("vllm")


def _workers(api) -> list[dict]:
    return wait_state(api, submit(api, {"operation": "worker_list"}), "completed")["result"]["workers"]


def _free_gpus(api) -> int:
    hives = wait_state(api, submit(api, {"operation": "hive_list"}), "completed")["result"]["hives"]
    return sum(h["free_gpus"] for h in hives)


def _gone(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def test_two_workers_are_pinned_to_different_gpus_and_stop_frees_the_engine(api, worker, tiny_model):
    spawn = {"operation": "worker_spawn", "model": tiny_model, "device": "gpu", "worker_id": "w-gpu2"}
    stream = read_sse(api, f"/v1/jobs/{submit(api, spawn)}/stream", deadline_s=300)
    assert stream.sentinel == "[DONE]", stream.events
    second = stream.of("result")[0]
    assert len(worker["gpu_ids"]) == len(second["gpu_ids"]) == 1
    assert worker["gpu_ids"] != second["gpu_ids"]

    third = {"operation": "worker_spawn", "model": tiny_model, "device": "gpu"}
    refused = read_sse(api, f"/v1/jobs/{submit(api, third)}/stream", deadline_s=30)
    assert refused.of("error")[-1]["code"] == "INSUFFICIENT_VRAM"

    pid = second["pid"]
    stopped = wait_state(api, submit(api, {"operation": "worker_stop", "worker_id": "w-gpu2"}), "completed")
    assert stopped["result"]["stopped"] is True
    wait_for(lambda: not psutil.pid_exists(pid), timeout=30)
    wait_for(lambda: _gone(worker_name("w-gpu2")), timeout=30)
    assert "w-gpu2" not in [w["worker_id"] for w in _workers(api)]


def test_stopping_an_unknown_worker_is_a_clear_error(api, worker):
    stream = read_sse(api, f"/v1/jobs/{submit(api, {'operation': 'worker_stop', 'worker_id': 'w-nope'})}/stream")
    assert stream.of("error")[-1]["code"] == "WORKER_NOT_FOUND"


def test_spawning_a_model_that_is_not_cached_fails(api, worker):
    stream = read_sse(api, f"/v1/jobs/{submit(api, {'operation': 'worker_spawn', 'model': 'nobody/none'})}/stream")
    assert stream.of("error")[-1]["code"] == "MODEL_NOT_FOUND"


def test_a_cancel_during_model_load_abandons_it_and_frees_the_worker(api, worker, tiny_model):
    spawn = {"operation": "worker_spawn", "model": tiny_model, "device": "cpu", "worker_id": "w-abandon"}
    job_id = submit(api, spawn)
    wait_for(lambda: "w-abandon" in [w["worker_id"] for w in _workers(api)], timeout=30)
    started = time.monotonic()
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 200
    assert time.monotonic() - started < 5
    assert wait_state(api, job_id, "cancelled")["state"] == "cancelled"
    assert "w-abandon" not in [w["worker_id"] for w in _workers(api)]
    wait_for(lambda: _gone(worker_name("w-abandon")), timeout=120, interval=0.5)


def test_a_killed_worker_fails_its_job_leaves_the_pool_and_frees_its_gpu(api, worker, tiny_model):
    """kill -9 of an InferenceActor mid-generation: the job fails WORKER_DIED (retriable) and
    its stream ends [ERROR]; within 5 s the worker leaves worker_list and its GPU is free for a
    new one; the next infer works."""
    import os
    import signal

    free_before, ray_free_before = _free_gpus(api), ray.available_resources().get("GPU", 0)
    spawn = {"operation": "worker_spawn", "model": tiny_model, "device": "gpu", "worker_id": "w-doomed"}
    spawned = read_sse(api, f"/v1/jobs/{submit(api, spawn)}/stream", deadline_s=300)
    assert spawned.sentinel == "[DONE]", spawned.events
    assert _free_gpus(api) == free_before - 1
    pid = spawned.of("result")[0]["pid"]
    left = Leftovers.of(pid)  # the actor, its engine's process and any /dev/shm segments
    names = [psutil.Process(p).name() for p in left.processes]
    assert "VLLM::EngineCore" in names, names
    op = {"operation": "infer", "model": tiny_model, "worker_id": "w-doomed", "ignore_eos": True,
          "prompt": "Once upon a time there was a hive of bees", "max_tokens": 1500}  # fmt: skip
    job_id = submit(api, op)
    read_sse(api, f"/v1/jobs/{job_id}/stream", on_event=lambda e: e["event"] == "token")
    # OpenAI streams answered straight by the workers, spread over both (least busy first)
    # The ingress's view of the workers is at most 1 s old: a request that finds it older
    # reads it anew (and goes on with the old one meanwhile).
    time.sleep(1.5)
    warm = {"model": tiny_model, "prompt": "Hi", "max_tokens": 1}
    assert api.post("/v1/completions", json=warm).status_code == 200
    time.sleep(0.5)
    streams = _OpenAiStreams(api, tiny_model, 4)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=30)
    assert stream.sentinel is not None and stream.sentinel.startswith("[ERROR]")
    error = stream.of("error")[-1]
    assert error["code"] == "WORKER_DIED" and error["retriable"] is True
    assert wait_state(api, job_id, "failed")["error"]["code"] == "WORKER_DIED"
    wait_for(lambda: all(w["worker_id"] != "w-doomed" for w in _workers(api)), timeout=5)
    assert time.monotonic() - killed < 5
    # Each stream ended on its own: those on the killed worker with vLLM's error chunk (a
    # 503: the same request may succeed again), their jobs failed WORKER_DIED; the others whole.
    ended = streams.join(deadline_s=60)
    died = [s for s in ended if s.error is not None]
    assert died and len(died) < len(ended), [(s.error, s.chunks) for s in ended]
    for each in ended:
        assert each.done, (each.job_id, each.chunks, each.error)
        if each.error is not None:
            assert each.error["code"] == 503 and "died" in each.error["message"], each.error
            assert wait_state(api, each.job_id, "failed")["error"]["code"] == "WORKER_DIED"
        else:
            assert each.finish_reason == "length" and each.chunks >= 200
            assert wait_state(api, each.job_id, "completed")["state"] == "completed"
    # The hive ends what the engine left running and removes its segments.
    wait_for(lambda: not left.alive(), timeout=15)
    wait_for(lambda: not any(path.exists() for path in left.segments), timeout=5)

    # Its GPU is free again, in the hive's count (a new GPU worker is placed there) and in
    # Ray's (the actor's GPU is released); the next infer is served, by the session's worker.
    wait_for(lambda: _free_gpus(api) == free_before, timeout=15)
    wait_for(lambda: ray.available_resources().get("GPU", 0) == ray_free_before, timeout=15)
    again = {**op, "max_tokens": 8}
    del again["worker_id"]
    done = wait_state(api, submit(api, again), "completed", "failed", timeout=60)
    assert done["state"] == "completed" and done["result"]["worker_id"] == worker["worker_id"], done


def test_a_killed_hive_takes_back_its_ready_workers_and_stops_loading_ones(api, worker, tiny_model):
    """kill -9 of the Hive while one worker serves and another loads: the spawn job fails
    WORKER_DIED, the hive Ray restarts lists the ready worker again (no second engine for its
    model) and stops the one that was loading; the next infer and spawn work."""
    import os
    import signal

    ready = {w["worker_id"] for w in _workers(api) if w["state"] == "ready"}
    assert worker["worker_id"] in ready
    spawn = {"operation": "worker_spawn", "model": tiny_model, "device": "cpu", "worker_id": "w-halfway"}
    job_id = submit(api, spawn)
    wait_for(lambda: not _gone(worker_name("w-halfway")), timeout=60, interval=0.5)
    hives = [a.name for a in alive_actors() if a.name.startswith("rbee:hive:")]
    assert len(hives) == 1, hives
    os.kill(pid_of(hives[0]), signal.SIGKILL)

    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=30)
    assert stream.sentinel is not None and stream.sentinel.startswith("[ERROR]"), stream.events
    assert stream.of("error")[-1]["code"] == "WORKER_DIED"
    wait_for(lambda: _answers(api), timeout=60, interval=0.5)
    listed = {w["worker_id"]: w for w in _workers(api)}
    assert ready <= set(listed) and all(listed[w]["state"] == "ready" for w in ready), listed
    wait_for(lambda: _gone(worker_name("w-halfway")), timeout=120, interval=0.5)
    assert "w-halfway" not in {w["worker_id"] for w in _workers(api)}

    op = {"operation": "infer", "model": tiny_model, "prompt": "Once upon a time there was", "max_tokens": 8}
    served = wait_state(api, submit(api, op), "completed", timeout=60)["result"]["worker_id"]
    assert served in ready
    assert {w["worker_id"] for w in _workers(api)} == set(listed) - {"w-halfway"}


def _answers(api) -> bool:
    try:
        return bool(_workers(api) is not None)
    except Exception:
        return False


def test_a_spawn_with_reuse_takes_the_worker_already_there(api, worker, tiny_model):
    """What a preload asks for: a request that came first may have started the worker."""
    before = {w["worker_id"] for w in _workers(api)}
    spawn = {"operation": "worker_spawn", "model": tiny_model, "reuse": True}
    stream = read_sse(api, f"/v1/jobs/{submit(api, spawn)}/stream", deadline_s=30)
    assert stream.sentinel == "[DONE]"
    assert stream.of("result")[0]["worker_id"] in before
    assert "already" in stream.of("narration")[0]["message"]
    assert {w["worker_id"] for w in _workers(api)} == before


class _OpenAiStream:
    def __init__(self) -> None:
        self.job_id = ""
        self.chunks = 0
        self.done = False
        self.error: dict | None = None
        self.finish_reason: str | None = None


class _OpenAiStreams:
    """``n`` streamed completions at once, each read to its end in a thread of its own; the
    call returns once each has its first chunk."""

    def __init__(self, api: httpx.Client, model: str, n: int) -> None:
        import threading

        self._started = threading.Barrier(n + 1, timeout=60)
        self.streams = [_OpenAiStream() for _ in range(n)]
        self._threads = [
            threading.Thread(target=self._read, args=(api, model, s), daemon=True) for s in self.streams
        ]
        for thread in self._threads:
            thread.start()
        self._started.wait()

    def _read(self, api: httpx.Client, model: str, out: _OpenAiStream) -> None:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 1000, "stream": True,
                "ignore_eos": True}  # fmt: skip
        headers = dict(api.headers)
        with httpx.Client(base_url=api.base_url, headers=headers, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                out.job_id = response.headers["x-job-id"]
                started = False
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if not started:
                        started = True
                        self._started.wait()
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        out.done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        out.error = chunk["error"]
                        continue
                    out.chunks += 1
                    out.finish_reason = chunk["choices"][0].get("finish_reason") or out.finish_reason

    def join(self, deadline_s: float) -> list[_OpenAiStream]:
        ends = time.monotonic() + deadline_s
        for thread in self._threads:
            thread.join(max(0.0, ends - time.monotonic()))
            assert not thread.is_alive(), "a stream did not end on its own"
        return self.streams
