"""The OpenAI-compatible endpoints on the real engine: each request is a cancellable job."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import job, wait_for, wait_state

TERMINAL = {"completed", "failed", "cancelled"}

pytest.importorskip("vllm")


def _chunks(response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append({"done": True} if data == "[DONE]" else json.loads(data))
    return out


def test_models_lists_what_can_be_served(api, worker):
    data = api.get("/v1/models").json()
    assert data["object"] == "list"
    assert worker["model"] in [m["id"] for m in data["data"]]


def test_completion_is_a_job(api, worker):
    response = api.post(
        "/v1/completions",
        json={"model": worker["model"], "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == worker["model"]
    assert 1 <= body["usage"]["completion_tokens"] <= 12
    record = job(api, response.headers["x-job-id"])
    assert record["operation"] == "infer" and record["state"] == "completed"
    assert record["result"]["text"] == body["choices"][0]["text"]


def test_streamed_chat_completion(api, worker):
    request = {
        "model": worker["model"],
        "messages": [{"role": "user", "content": "Say something about bees and hives."}],
        "max_tokens": 16,
        "stream": True,
        "user": "ignored-field",
    }
    with api.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        job_id = response.headers["x-job-id"]
        chunks = _chunks(response)
    assert chunks[-1] == {"done": True}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert wait_state(api, job_id, "completed")["result"]["text"] == text


def test_a_client_that_disconnects_aborts_its_generation(api, worker):
    request = {
        "model": worker["model"],
        "messages": [{"role": "user", "content": "Tell me a very long story about a hive."}],
        "max_tokens": 1500,
        "stream": True,
    }
    with api.stream("POST", "/v1/chat/completions", json=request) as response:
        job_id = response.headers["x-job-id"]
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 5:
                break
    record = wait_state(api, job_id, "cancelled", timeout=5)
    assert record["result"] is None

    def idle():
        listed = wait_state(api, api.post("/v1/jobs", json={"operation": "worker_list"}).json()["job_id"], "completed")
        mine = [w for w in listed["result"]["workers"] if w["worker_id"] == worker["worker_id"]]
        return mine[0]["unfinished_requests"] == 0

    wait_for(idle, timeout=5)


def test_an_openai_job_can_be_cancelled_like_any_job(api, worker):
    request = {"model": worker["model"], "prompt": "Once upon a time", "max_tokens": 1500, "stream": True}
    with api.stream("POST", "/v1/completions", json=request) as response:
        job_id = response.headers["x-job-id"]
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {") and '"text":""' not in line:
                break
        assert api.delete(f"/v1/jobs/{job_id}").status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    errors = [json.loads(line[6:])["error"] for line in rest if line.startswith('data: {"error"')]
    assert [e["code"] for e in errors] == [409] and "cancelled" in errors[0]["message"]
    assert job(api, job_id)["state"] == "cancelled"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {"model": "test/tiny-llama"}, 400, "body.messages"),
        ("/v1/chat/completions", {"model": "test/tiny-llama", "messages": "hi"}, 400, "body.messages"),
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "nobody/none", "prompt": "hi"}, 404, "model"),
        ("/v1/completions", {"model": "test/tiny-llama", "prompt": "hi", "stream": True, "n": "x"}, 400, "body.n"),
    ],
)
def test_bad_openai_requests(api, worker, path, body, status, param):
    response = api.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]  # vLLM's: the status
    assert error["param"] == param


def test_sixty_official_clients_that_go_away_all_abort(api, hive, worker):
    """The official ``openai`` client, 10 at a time: 50 streams dropped after 1 to 8 chunks
    and 10 whole-answer requests given up after 0.3 s. Every job ends ``cancelled`` and the
    engine has nothing left to generate."""
    openai = pytest.importorskip("openai")

    client = openai.OpenAI(base_url=f"{hive.url}/v1", api_key="none", max_retries=0, timeout=30)
    impatient = client.with_options(timeout=0.3)
    messages = [{"role": "user", "content": "Tell me a very long story about a hive."}]
    common = {"model": worker["model"], "max_tokens": 1500, "extra_body": {"ignore_eos": True}}

    def go_away(i: int) -> str | None:
        if i % 6 == 5:
            with pytest.raises(openai.APITimeoutError):
                impatient.completions.create(prompt="Once upon a time", **common)
            return None
        if i % 2:
            stream = client.chat.completions.create(messages=messages, stream=True, **common)
        else:
            stream = client.completions.create(prompt="Once upon a time", stream=True, **common)
        for n, _chunk in enumerate(stream, start=1):
            if n >= i % 8 + 1:
                break
        stream.close()
        return str(stream.response.headers["x-job-id"])

    started = time.time()
    with ThreadPoolExecutor(10) as pool:
        streamed = [job_id for job_id in pool.map(go_away, range(60)) if job_id]
    assert len(streamed) == 50

    def all_ended() -> list[dict] | None:
        listed = api.get("/v1/jobs", params={"operation": "infer", "limit": 500}).json()["jobs"]
        mine = [j for j in listed if j["created_at"] >= started]
        return mine if all(j["state"] in TERMINAL for j in mine) else None

    mine = wait_for(all_ended, timeout=60)
    assert len(mine) == 60 and set(streamed) <= {j["job_id"] for j in mine}
    ran_on = [j["job_id"] for j in mine if j["state"] != "cancelled"]
    streams = sorted(set(ran_on) & set(streamed))
    assert ran_on == [], f"{len(ran_on)} of 60 ran on after their client left: {ran_on} (streams: {streams})"

    def idle() -> bool:
        listed = wait_state(api, api.post("/v1/jobs", json={"operation": "worker_list"}).json()["job_id"], "completed")
        mine = [w for w in listed["result"]["workers"] if w["worker_id"] == worker["worker_id"]]
        return bool(mine[0]["unfinished_requests"] == 0)

    wait_for(idle, timeout=10)


def test_a_whole_answer_whose_job_is_cancelled_is_not_to_be_retried(api, hive, worker):
    """409, and ``x-should-retry: false``: the official clients retry a 409 unless told, and a
    retry would run again what the cancel stopped."""
    openai = pytest.importorskip("openai")
    import httpx

    client = openai.OpenAI(
        base_url=f"{hive.url}/v1", api_key="none", max_retries=2, http_client=httpx.Client(verify=False, timeout=60)
    )
    started = time.time()
    caught: list[Exception] = []

    def ask() -> None:
        try:
            client.completions.create(
                model=worker["model"], prompt="Once upon a time", max_tokens=1500, extra_body={"ignore_eos": True}
            )
        except openai.APIStatusError as exc:
            caught.append(exc)

    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(ask)

        def running() -> list[dict] | None:
            listed = api.get("/v1/jobs", params={"operation": "infer", "state": "running"}).json()["jobs"]
            return [j for j in listed if j["created_at"] >= started] or None

        (mine,) = wait_for(running, timeout=30)
        assert api.delete(f"/v1/jobs/{mine['job_id']}").status_code == 200
        asked.result(timeout=30)
    assert len(caught) == 1 and caught[0].status_code == 409
    assert caught[0].response.headers["x-should-retry"] == "false"
    later = api.get("/v1/jobs", params={"operation": "infer", "limit": 500}).json()["jobs"]
    assert [j["job_id"] for j in later if j["created_at"] >= started] == [mine["job_id"]]  # no retry
