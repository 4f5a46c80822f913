"""The official ``openai`` client against the real server: every parameter vLLM's own server
honours works here, and one this server cannot honour is a 400 that names it (SPEC §6)."""

from __future__ import annotations

import json
import re
import threading

import pytest

from tests.helpers import job, read_sse, wait_for, wait_state

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

STORY = [{"role": "user", "content": "Tell me a story about a bee and a hive."}]
LONG = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture
def client(hive):
    with openai.OpenAI(base_url=f"{hive.url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def _unfinished(api, worker) -> int:
    listed = wait_state(api, api.post("/v1/jobs", json={"operation": "worker_list"}).json()["job_id"], "completed")
    return next(w for w in listed["result"]["workers"] if w["worker_id"] == worker["worker_id"])["unfinished_requests"]


def test_models_report_their_context_length(client, worker):
    models = {m.id: m for m in client.models.list().data}
    assert models[worker["model"]].max_model_len == worker["max_model_len"] > 0


def test_a_streamed_chat_sends_its_usage_last_when_asked(client, api, worker):
    stream = client.chat.completions.create(
        model=worker["model"], messages=STORY, stream=True, stream_options={"include_usage": True}, **LONG
    )
    chunks = list(stream)
    *tokens, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert last.usage.total_tokens == last.usage.prompt_tokens + 24
    assert all(c.usage is None for c in tokens)
    assert tokens[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in tokens)
    record = wait_state(api, stream.response.headers["x-job-id"], "completed")
    assert record["result"]["text"] == text and record["result"]["usage"]["completion_tokens"] == 24


def test_usage_is_left_out_unless_asked(client, worker):
    chunks = list(client.chat.completions.create(model=worker["model"], messages=STORY, stream=True, **LONG))
    assert chunks[-1].choices and all(c.usage is None for c in chunks)


def test_content_given_as_parts_is_the_same_prompt(client, worker):
    parts = [{"role": "user", "content": [{"type": "text", "text": STORY[0]["content"]}]}]
    as_parts = client.chat.completions.create(model=worker["model"], messages=parts, **LONG)
    as_text = client.chat.completions.create(model=worker["model"], messages=STORY, **LONG)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_a_batch_of_prompts_answers_each(client, worker):
    batch = client.completions.create(model=worker["model"], prompt=["The hive", "A bee"], **LONG)
    assert [c.index for c in batch.choices] == [0, 1]
    assert all(c.text and c.finish_reason == "length" for c in batch.choices)
    assert batch.usage.completion_tokens == 48
    # Each prompt was read (greedy texts are not compared: a batch may round differently).
    alone = [client.completions.create(model=worker["model"], prompt=p, max_tokens=1) for p in ("The hive", "A bee")]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_n_gives_several_choices_streamed_or_not(client, worker):
    whole = client.chat.completions.create(model=worker["model"], messages=STORY, n=2, seed=7, max_tokens=8, temperature=1.0)
    assert sorted(c.index for c in whole.choices) == [0, 1]
    chunks = list(client.completions.create(model=worker["model"], prompt="A bee", n=2, stream=True, max_tokens=8))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    with pytest.raises(openai.BadRequestError, match="greedy"):  # as vLLM's server says
        client.completions.create(model=worker["model"], prompt="A bee", n=2, **LONG)


def test_logprobs_come_back(client, worker):
    chat = client.chat.completions.create(model=worker["model"], messages=STORY, logprobs=True, top_logprobs=2, **LONG)
    content = chat.choices[0].logprobs.content
    assert len(content) == 24 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    text = client.completions.create(model=worker["model"], prompt="A bee", logprobs=3, **LONG)
    assert len(text.choices[0].logprobs.tokens) == 24
    # The sampled token and the top 3, by their text (two tokens of one text are one key).
    assert all(1 <= len(top) <= 4 for top in text.choices[0].logprobs.top_logprobs)


def test_penalties_change_the_text(client, worker):
    def answer(**penalties: float) -> str:
        out = client.completions.create(model=worker["model"], prompt="The hive", max_tokens=40, temperature=0, **penalties)
        return out.choices[0].text

    plain = answer()
    assert answer(presence_penalty=2.0) != plain
    assert answer(frequency_penalty=2.0) != plain
    assert answer() == plain  # greedy: the same without them


def _whitespace_tokens(cache_dir, model: str) -> list[int]:
    from transformers import AutoTokenizer

    snapshots = cache_dir / f"models--{model.replace('/', '--')}" / "snapshots"
    tokenizer = AutoTokenizer.from_pretrained(next(snapshots.iterdir()))
    vocab = tokenizer.get_vocab()
    return [i for t, i in vocab.items() if tokenizer.convert_tokens_to_string([t]).isspace()]


def test_a_json_schema_response_format_is_followed(client, worker, cache_dir):
    schema = {
        "type": "object",
        "properties": {"kind": {"type": "string", "enum": ["bee", "hive"]}, "ok": {"type": "boolean"}},
        "required": ["kind", "ok"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model=worker["model"],
        messages=STORY,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        # A random model free to fill JSON's blanks never stops: logit_bias keeps it off them.
        logit_bias={str(i): -100 for i in _whitespace_tokens(cache_dir, worker["model"])},
    )
    text = out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop", text
    value = json.loads(text)
    assert set(value) == {"kind", "ok"} and value["kind"] in ("bee", "hive") and isinstance(value["ok"], bool)


def test_a_stop_sequence_ends_the_text_before_it(client, worker):
    plain = client.completions.create(model=worker["model"], prompt="The hive", **LONG).choices[0].text
    stop = plain[len(plain) // 2 :][:3]
    assert stop.strip(), plain
    cut = client.completions.create(model=worker["model"], prompt="The hive", stop=[stop], max_tokens=24, temperature=0)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == plain[: plain.index(stop)]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"no_such_thing": 1}, "no_such_thing"),
        ({"request_id": "mine"}, "request_id"),
        ({"return_token_offsets": True}, "return_token_offsets"),
        ({"top_p": 2}, "top_p"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(client, worker, params, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=worker["model"], prompt="A bee", max_tokens=4, extra_body=params)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["param"] == param and param in error["message"] and error["type"]


def test_a_refusal_without_a_parameter_names_it_in_its_message(client, worker):
    with pytest.raises(openai.BadRequestError, match=r"\bn must be at least 1"):
        client.completions.create(model=worker["model"], prompt="A bee", max_tokens=4, n=0)


def test_a_refused_stream_is_a_400_before_any_chunk(client, worker):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=worker["model"], messages=STORY, stream=True, extra_body={"top_k": "x"})
    assert caught.value.body["param"] == "body.top_k"  # as vLLM's server names it


def test_an_unknown_model_is_a_404_in_openai_shape(client, worker):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nobody/none", messages=STORY, max_tokens=4)
    assert set(caught.value.body) >= {"message", "type", "param", "code"}


def test_one_cancel_ends_every_sequence_of_a_batch(client, api, worker):
    """A batch of two prompts with n=2 (four sequences) is one job: one cancel by id aborts
    all four, and the engine has nothing left to generate."""
    stream = client.completions.create(
        model=worker["model"], prompt=["Once upon a time", "A bee"], n=2, stream=True,
        max_tokens=1500, extra_body={"ignore_eos": True},
    )  # fmt: skip
    job_id = stream.response.headers["x-job-id"]
    seen: set[int] = set()
    with pytest.raises(openai.APIError):  # the stream ends with the job's CANCELLED error
        for chunk in stream:
            seen.add(chunk.choices[0].index)
            if len(seen) == 4:
                threading.Thread(target=api.delete, args=(f"/v1/jobs/{job_id}",)).start()
    assert seen == {0, 1, 2, 3}
    assert job(api, job_id)["state"] == "cancelled"
    wait_for(lambda: _unfinished(api, worker) == 0, timeout=10)


def test_an_openai_job_streams_each_choice_as_tokens(client, api, worker):
    out = client.completions.create(model=worker["model"], prompt=["The hive", "A bee"], stream=True, **LONG)
    chunks = list(out)
    job_id = out.response.headers["x-job-id"]
    events = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=30)
    tokens = [e["data"] for e in events.events if e["event"] == "token"]
    assert {t.get("choice", 0) for t in tokens} == {0, 1} and len(tokens) == len(chunks)
    for choice in (0, 1):
        mine = [t for t in tokens if t.get("choice", 0) == choice]
        assert [t["index"] for t in mine] == list(range(1, len(mine) + 1))
    result = events.of("result")[0]
    assert [c["text"] for c in result["choices"]] == [
        "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)
    ]


def test_a_tool_call_is_parsed_where_the_model_has_a_parser(client, worker):
    """The session's tiny model has vLLM's ``hermes`` parser (``engine.tool_call_parsers``):
    with ``tool_choice: auto``, the ``<tool_call>`` it writes (held to it here by vLLM's
    ``structured_outputs``) comes back as a tool call, streamed or not."""
    tools = [{"type": "function", "function": {"name": "count_bees", "parameters": {"type": "object", "properties": {}}}}]
    call = '<tool_call>\n{"name": "count_bees", "arguments": {}}\n</tool_call>'
    common = {
        "model": worker["model"], "messages": STORY, "tools": tools, "tool_choice": "auto", "max_tokens": 60,
        "temperature": 0, "extra_body": {"structured_outputs": {"regex": re.escape(call)}},
    }  # fmt: skip
    out = client.chat.completions.create(**common)
    assert out.choices[0].finish_reason == "tool_calls", out
    (tool,) = out.choices[0].message.tool_calls
    assert tool.function.name == "count_bees" and json.loads(tool.function.arguments) == {}
    streamed = [c for c in client.chat.completions.create(stream=True, **common) if c.choices]
    names = [t.function.name for c in streamed for t in (c.choices[0].delta.tool_calls or []) if t.function.name]
    assert names == ["count_bees"]
    plain = client.chat.completions.create(**{**common, "tool_choice": "none", "extra_body": {}})
    assert plain.choices[0].message.tool_calls in (None, []) and plain.choices[0].message.content
