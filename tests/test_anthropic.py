"""Anthropic's Messages API on rbee (SPEC §6), through vLLM's own Anthropic serving code and
driven by the official ``anthropic`` client: each request a job, a stream in Anthropic's
events (no ``[DONE]``), a disconnect that cancels the job, errors in Anthropic's shape."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.helpers import job, wait_for, wait_state

pytest.importorskip("vllm")
anthropic = pytest.importorskip("anthropic")

HIVE = [{"role": "user", "content": "Tell me a very long story about a bee and a hive."}]
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture
def client(hive) -> Any:
    http = anthropic.DefaultHttpxClient(verify=False)  # plain HTTP: no TLS context to build
    with anthropic.Anthropic(
        base_url=hive.url, api_key="none", max_retries=0, timeout=60, http_client=http
    ) as made:
        yield made


def _frames(response: httpx.Response, deadline_s: float) -> list[tuple[str, dict[str, Any]]]:
    """The ``event:``/``data:`` frames of a streamed answer, which must end by itself within
    ``deadline_s``."""
    end = time.monotonic() + deadline_s
    frames: list[tuple[str, dict[str, Any]]] = []
    kind = None
    for line in response.iter_lines():
        assert time.monotonic() < end, f"the stream outlived its {deadline_s}s deadline"
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert kind is not None, f"data without its event: {line}"
            frames.append((kind, json.loads(line.removeprefix("data: "))))
            kind = None
        else:
            assert line == "", f"not a line of Anthropic's stream: {line!r}"
    return frames


def _idle(api: httpx.Client, worker: dict[str, Any]) -> bool:
    op = {"operation": "worker_list"}
    listed = wait_state(api, api.post("/v1/jobs", json=op).json()["job_id"], "completed")
    mine = [w for w in listed["result"]["workers"] if w["worker_id"] == worker["worker_id"]]
    return bool(mine[0]["unfinished_requests"] == 0)


def test_a_message_is_a_job_and_reads_as_anthropics(api, client, worker):
    raw = client.messages.with_raw_response.create(
        model=worker["model"], max_tokens=12, messages=HIVE
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.model == worker["model"]
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 1 <= message.usage.output_tokens <= 12
    record = job(api, raw.headers["x-job-id"])
    assert record["operation"] == "infer" and record["state"] == "completed"
    assert record["result"]["text"] == message.content[0].text
    assert record["result"]["finish_reason"] == message.stop_reason


def test_a_streamed_message_is_anthropics_events_and_ends_on_its_own(api, client, worker):
    with client.messages.stream(model=worker["model"], max_tokens=24, messages=HIVE) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        job_id = stream.response.headers["x-job-id"]
    assert final.content[0].text == text and final.usage.output_tokens >= 1
    assert wait_state(api, job_id, "completed")["result"]["text"] == text

    # On the wire: Anthropic's events in their order, and nothing after message_stop.
    body = {"model": worker["model"], "max_tokens": 24, "messages": HIVE, "stream": True}
    with api.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = _frames(response, deadline_s=60)
    kinds = [kind for kind, _ in frames]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds
    assert all(data["type"] == kind for kind, data in frames)
    deltas = [data["delta"] for kind, data in frames if kind == "content_block_delta"]
    assert deltas and all(d["type"] == "text_delta" for d in deltas)
    usage = frames[-2][1]["usage"]
    assert usage["output_tokens"] == len(deltas) or usage["output_tokens"] >= 1


def test_count_tokens_is_the_chat_templated_prompt(api, client, worker):
    counted = client.messages.count_tokens(model=worker["model"], messages=HIVE)
    tokenized = api.post(
        "/tokenize",
        json={"model": worker["model"], "messages": HIVE, "add_generation_prompt": True},
    )
    assert tokenized.status_code == 200, tokenized.text
    assert counted.input_tokens == tokenized.json()["count"] > 0


def test_twenty_anthropic_streams_dropped_midway_all_cancel(api, client, worker):
    """The official client, 5 at a time: each stream read for 1 to 6 events and closed.
    Every job ends ``cancelled`` and the engine has nothing left to generate."""

    def drop(i: int) -> str:
        stream = client.messages.create(
            model=worker["model"], max_tokens=1500, messages=HIVE, stream=True
        )
        for n, _event in enumerate(stream, start=1):
            if n >= i % 6 + 1:
                break
        stream.close()
        return str(stream.response.headers["x-job-id"])

    with ThreadPoolExecutor(5) as pool:
        dropped = list(pool.map(drop, range(20)))

    def ended() -> list[dict[str, Any]] | None:
        records = [job(api, job_id) for job_id in dropped]
        return records if all(r["state"] in TERMINAL for r in records) else None

    records = wait_for(ended, timeout=30)
    ran_on = [r["job_id"] for r in records if r["state"] != "cancelled"]
    assert ran_on == [], f"{len(ran_on)} of 20 ran on after their client left"
    wait_for(lambda: _idle(api, worker), timeout=10)


def test_a_message_cancelled_as_a_job_ends_its_stream_with_an_error_event(api, worker):
    body = {"model": worker["model"], "max_tokens": 1500, "messages": HIVE, "stream": True}
    with api.stream("POST", "/v1/messages", json=body) as response:
        job_id = response.headers["x-job-id"]
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: content_block_delta"):
                break
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
        rest = list(lines)
    errors = [json.loads(line[6:]) for line in rest if line.startswith('data: {"type":"error"')]
    assert len(errors) == 1 and "cancelled" in errors[0]["error"]["message"], rest[-4:]
    assert rest[-3:] == ["event: error", rest[-2], ""] and "[DONE]" not in "".join(rest)
    assert wait_state(api, job_id, "cancelled")["state"] == "cancelled"
    wait_for(lambda: _idle(api, worker), timeout=10)


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"model": "nobody/none", "max_tokens": 4}, 404, "not_found_error"),
        ({"model": None, "max_tokens": 4}, 400, "invalid_request_error"),
        ({"max_tokens": None}, 400, "invalid_request_error"),
        ({"max_tokens": 4, "no_such": 1}, 400, "invalid_request_error"),  # read by no one
        ({"max_tokens": "many"}, 400, "invalid_request_error"),
        ({"max_tokens": 4, "mm_payload": {}}, 400, "invalid_request_error"),  # vLLM ignores it
    ],
)
def test_refusals_are_in_anthropics_shape(api, client, worker, body, status, kind):
    sent = {"model": worker["model"], "messages": HIVE, **body}
    refused = api.post("/v1/messages", json=sent)
    assert refused.status_code == status, refused.text
    error = refused.json()
    assert error["type"] == "error" and error["error"]["type"] == kind, error
    assert error["error"]["message"]
    raised = anthropic.NotFoundError if status == 404 else anthropic.BadRequestError
    rest = {k: v for k, v in sent.items() if k not in ("model", "max_tokens", "messages")}
    with pytest.raises(raised):
        client.messages.create(
            model=sent["model"], max_tokens=sent["max_tokens"], messages=HIVE, extra_body=rest
        )


def test_count_tokens_refusals_are_in_anthropics_shape(api, worker):
    for body, status in [
        ({"messages": HIVE}, 400),
        ({"model": "nobody/none", "messages": HIVE}, 404),
    ]:
        refused = api.post("/v1/messages/count_tokens", json=body)
        assert refused.status_code == status and refused.json()["type"] == "error", refused.text


def test_a_foreign_page_is_refused_in_anthropics_shape(api, worker):
    sent = {"model": worker["model"], "max_tokens": 4, "messages": HIVE}
    refused = api.post("/v1/messages", json=sent, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403, refused.text
    assert refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "permission_error"
