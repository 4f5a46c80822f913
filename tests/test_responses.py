"""OpenAI's Responses API on rbee's jobs (SPEC §6), driven by the official ``openai`` client:
a response is a job (its id the job's), read back from the job's record, cancelled as a
job, and a conversation goes on from a stored response (``previous_response_id``)."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from tests.helpers import job, wait_for, wait_state

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

STORY = "Tell me a very long story about a bee and a hive."


@pytest.fixture
def client(hive) -> Any:
    http = httpx.Client(verify=False, timeout=60)  # plain HTTP: no TLS context to build
    with openai.OpenAI(base_url=f"{hive.url}/v1", api_key="none", max_retries=0, http_client=http) as made:
        yield made


def _idle(api: httpx.Client, worker: dict[str, Any]) -> bool:
    listed = wait_state(api, api.post("/v1/jobs", json={"operation": "worker_list"}).json()["job_id"], "completed")
    mine = [w for w in listed["result"]["workers"] if w["worker_id"] == worker["worker_id"]]
    return bool(mine[0]["unfinished_requests"] == 0)


def _follow(stream: Any) -> tuple[list[str], threading.Event]:
    """The types of a stream's events as a thread reads them (``error`` if it raises), and
    an event set once it has ended."""
    seen: list[str] = []
    ended = threading.Event()

    def read() -> None:
        try:
            for event in stream:
                seen.append(event.type)
        except openai.APIError:
            seen.append("error")
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    return seen, ended


def test_a_response_is_a_job_and_is_read_back(api, client, worker):
    raw = client.responses.with_raw_response.create(model=worker["model"], input=STORY, max_output_tokens=16)
    response = raw.parse()
    assert response.id == raw.headers["x-job-id"] and response.status in ("completed", "incomplete")
    assert response.output_text and 1 <= response.usage.output_tokens <= 16
    record = job(api, response.id)
    assert record["operation"] == "infer" and record["state"] == "completed"
    assert record["result"]["text"] == response.output_text

    again = client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text
    assert again.usage.output_tokens == response.usage.output_tokens

    items = list(client.responses.input_items.list(response.id))
    assert len(items) == 1 and items[0].role == "user" and items[0].content[0].text == STORY


def test_a_streamed_response_numbers_its_events_and_is_read_back(api, client, worker):
    with client.responses.create(model=worker["model"], input=STORY, max_output_tokens=24, stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert text and done.output_text == text
    assert wait_state(api, done.id, "completed")["result"]["text"] == text
    assert client.responses.retrieve(done.id).output_text == text


def test_a_conversation_goes_on_from_a_stored_response(client, worker):
    first = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=8)
    then = client.responses.create(
        model=worker["model"], input="And then?", max_output_tokens=8, previous_response_id=first.id
    )
    assert then.status in ("completed", "incomplete") and then.previous_response_id == first.id
    alone = client.responses.create(model=worker["model"], input="And then?", max_output_tokens=8)
    # The earlier turn is in the prompt: its input and its output.
    history = first.usage.input_tokens + first.usage.output_tokens
    assert then.usage.input_tokens >= history + alone.usage.input_tokens - 8


def test_a_response_not_stored_is_not_read_back(client, worker):
    response = client.responses.create(model=worker["model"], input="hi", max_output_tokens=4, store=False)
    assert response.output_text is not None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=worker["model"], input="x", max_output_tokens=4, previous_response_id=response.id)


def test_a_response_cancelled_by_id_stops_and_reads_cancelled(api, client, worker):
    stream = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=1500, stream=True)
    response_id = stream.response.headers["x-job-id"]
    seen, ended = _follow(stream)
    wait_for(lambda: "response.output_text.delta" in seen, timeout=30)
    cancelled = client.responses.cancel(response_id)
    assert cancelled.id == response_id and cancelled.status == "cancelled"
    assert ended.wait(10), "the stream did not end after its response was cancelled"
    assert "response.completed" not in seen
    assert job(api, response_id)["state"] == "cancelled"
    assert client.responses.retrieve(response_id).status == "cancelled"
    wait_for(lambda: _idle(api, worker), timeout=10)


def test_a_stream_dropped_midway_cancels_its_response(api, client, worker):
    stream = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=1500, stream=True)
    for n, _event in enumerate(stream, start=1):
        if n >= 6:
            break
    stream.close()
    response_id = stream.response.headers["x-job-id"]
    assert wait_state(api, response_id, "cancelled", timeout=5)["state"] == "cancelled"
    wait_for(lambda: _idle(api, worker), timeout=10)


def test_refusals_are_vllms(client, worker, finished_job):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.retrieve("job-00000000-0000-4000-8000-000000000000")
    assert "not found" in unknown.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nothing")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(finished_job)  # a job, but not a response
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model=worker["model"], input="x", previous_response_id="job-00000000-0000-4000-8000-000000000000"
        )
    done = client.responses.create(model=worker["model"], input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(done.id)  # vLLM's: "Cannot cancel a synchronous response."
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=worker["model"], input="x", max_output_tokens="many")  # type: ignore[arg-type]
    assert bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=worker["model"], input="x", background=True, store=False)
    with pytest.raises(openai.BadRequestError):  # not a background one: its events are not kept
        client.responses.retrieve(done.id, stream=True)


def test_a_response_outlives_a_restart_of_the_registry(api, client, worker):
    """The registry comes back from its store on disk (as a whole server does on the same
    state dir): a response is read back as it was, and a conversation goes on from it."""
    import ray

    from actors.naming import NAMESPACE, REGISTRY

    first = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=8)
    behind = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=12, background=True)
    wait_for(lambda: client.responses.retrieve(behind.id).status in ("completed", "incomplete"), timeout=30)
    replayed = [e.model_dump() for e in client.responses.retrieve(behind.id, stream=True)]
    gone = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=2)
    assert client.responses.delete(gone.id) is None  # (the client reads no body)
    before = client.responses.retrieve(first.id).model_dump()
    items = [i.model_dump() for i in client.responses.input_items.list(first.id)]
    ray.kill(ray.get_actor(REGISTRY, namespace=NAMESPACE), no_restart=False)

    def back() -> bool:
        try:
            return api.get(f"/v1/responses/{first.id}").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(back, timeout=60, interval=0.5)
    assert client.responses.retrieve(first.id).model_dump() == before
    # A background response's stream replays with the same events and sequence numbers.
    assert [e.model_dump() for e in client.responses.retrieve(behind.id, stream=True)] == replayed
    with pytest.raises(openai.NotFoundError):  # a deleted response stays deleted
        client.responses.retrieve(gone.id)
    assert api.get(f"/v1/jobs/{gone.id}").status_code == 404
    assert [i.model_dump() for i in client.responses.input_items.list(first.id)] == items
    then = client.responses.create(
        model=worker["model"], input="And then?", max_output_tokens=4, previous_response_id=first.id
    )
    assert then.status in ("completed", "incomplete") and then.usage.input_tokens > first.usage.input_tokens


def test_a_deleted_response_is_forgotten_with_its_job(api, client, worker):
    response = client.responses.create(model=worker["model"], input="hi", max_output_tokens=2)
    deleted = api.delete(f"/v1/responses/{response.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": response.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    assert api.get(f"/v1/jobs/{response.id}").status_code == 404
    assert response.id not in [j["job_id"] for j in api.get("/v1/jobs", params={"limit": 500}).json()["jobs"]]
    assert api.delete(f"/v1/responses/{response.id}").status_code == 404

    # One still running is cancelled, then forgotten.
    stream = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=1500, stream=True)
    running = stream.response.headers["x-job-id"]
    next(iter(stream))
    assert api.delete(f"/v1/responses/{running}").json()["deleted"] is True
    stream.close()
    assert api.get(f"/v1/jobs/{running}").status_code == 404
    wait_for(lambda: _idle(api, worker), timeout=10)


def test_the_responses_routes_touch_no_job_of_another_api(api, worker):
    """A chat's job is no response: it is not read, cancelled or deleted through them."""
    chat = {"model": worker["model"], "messages": [{"role": "user", "content": STORY}], "max_tokens": 1500, "stream": True}
    with api.stream("POST", "/v1/chat/completions", json=chat) as response:
        job_id = response.headers["x-job-id"]
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert api.get(f"/v1/responses/{job_id}").status_code == 404
        assert api.post(f"/v1/responses/{job_id}/cancel").status_code == 404
        assert api.delete(f"/v1/responses/{job_id}").status_code == 404
        assert api.get(f"/v1/responses/{job_id}/input_items").status_code == 404
        assert job(api, job_id)["state"] == "running"
    wait_state(api, job_id, "cancelled")


def test_a_background_response_runs_on_its_own_and_its_stream_replays(api, client, worker):
    queued = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=40, background=True)
    assert queued.status in ("queued", "in_progress") and queued.background is True
    wait_for(lambda: client.responses.retrieve(queued.id).status in ("completed", "incomplete"), timeout=60)
    done = client.responses.retrieve(queued.id)
    assert done.background is True and done.output_text and done.usage.output_tokens >= 1

    events = list(client.responses.retrieve(queued.id, stream=True))
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(numbers))) and len(numbers) > 10
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert all(e.response.background is True for e in events if hasattr(e, "response"))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == done.output_text == events[-1].response.output_text

    after = list(client.responses.retrieve(queued.id, stream=True, starting_after=5))
    assert [e.model_dump() for e in after] == [e.model_dump() for e in events[6:]]
    assert list(client.responses.retrieve(queued.id, stream=True, starting_after=numbers[-1])) == []
    bad = api.get(f"/v1/responses/{queued.id}", params={"stream": "true", "starting_after": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"


def test_a_background_stream_left_midway_runs_on_and_a_cancel_stops_it(api, client, worker):
    stream = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=30, background=True, stream=True)
    for n, _event in enumerate(stream, start=1):
        if n >= 4:
            break
    stream.close()
    left = stream.response.headers["x-job-id"]
    assert wait_state(api, left, "completed", timeout=60)["state"] == "completed"  # it ran on

    long = client.responses.create(model=worker["model"], input=STORY, max_output_tokens=1500, background=True)
    seen, ended = _follow(client.responses.retrieve(long.id, stream=True))
    wait_for(lambda: "response.output_text.delta" in seen, timeout=30)
    assert client.responses.cancel(long.id).status == "cancelled"
    assert ended.wait(10), "the followed stream did not end after the cancel"
    assert seen[-1] == "error" and "response.completed" not in seen
    assert job(api, long.id)["state"] == "cancelled"
    wait_for(lambda: _idle(api, worker), timeout=10)
