"""vLLM's other routes on rbee, answered as vLLM's server answers them (SPEC §6): ``/tokenize``,
``/detokenize``, ``/v1/chat/completions/batch``, SageMaker's ``/invocations`` and ``/ping``,
``/version`` and ``/load``; and the ways vLLM's server words its refusals (``code`` the
status, its validation messages and the parameter they name), its ``continuous_usage_stats``.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import job

pytest.importorskip("vllm")

STORY = [{"role": "user", "content": "Tell me a story about a bee and a hive."}]


def _tokenizer(cache_dir: Path, model: str) -> Any:
    from transformers import AutoTokenizer

    snapshots = cache_dir / f"models--{model.replace('/', '--')}" / "snapshots"
    return AutoTokenizer.from_pretrained(next(snapshots.iterdir()))


def _stream(api: httpx.Client, path: str, body: dict[str, Any], deadline_s: float = 60) -> list[Any]:
    """The ``data:`` chunks of a streamed answer, which must end with ``[DONE]`` by itself
    within ``deadline_s``."""
    chunks: list[Any] = []
    end = time.monotonic() + deadline_s
    with api.stream("POST", path, json=body, timeout=deadline_s) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            assert time.monotonic() < end, f"{path} outlived its {deadline_s}s deadline"
            if line.startswith("data: "):
                chunks.append(line.removeprefix("data: "))
    assert chunks and chunks[-1] == "[DONE]", chunks
    return [json.loads(chunk) for chunk in chunks[:-1]]


def test_tokenize_and_detokenize_answer_as_the_models_tokenizer(api, worker, cache_dir):
    model = worker["model"]
    answer = api.post("/tokenize", json={"model": model, "prompt": "A bee in a hive"})
    assert answer.status_code == 200, answer.text
    tokenized = answer.json()
    assert set(tokenized) == {"tokens", "token_strs", "count", "max_model_len"}
    assert tokenized["tokens"] == _tokenizer(cache_dir, model)("A bee in a hive")["input_ids"]
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["token_strs"] is None
    assert tokenized["max_model_len"] == worker["max_model_len"]
    assert answer.headers["x-job-id"].startswith("job-")  # a request, a job
    assert job(api, answer.headers["x-job-id"])["state"] == "completed"

    named = api.post("/tokenize", json={"model": model, "prompt": "A bee", "return_token_strs": True})
    assert len(named.json()["token_strs"]) == named.json()["count"]
    chat = api.post("/tokenize", json={"model": model, "messages": STORY, "add_generation_prompt": True})
    assert chat.status_code == 200 and chat.json()["count"] > tokenized["count"], chat.text

    text = api.post("/detokenize", json={"model": model, "tokens": tokenized["tokens"]})
    assert text.status_code == 200, text.text
    assert text.json()["prompt"].endswith("A bee in a hive")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": "x", "no_such": 1}, "no_such"),
        ("/detokenize", {"tokens": "not a list"}, "body.tokens"),
        ("/detokenize", {}, "body.tokens"),
    ],
)
def test_a_tokenize_refused_is_vllms_400(api, worker, path, body, param):
    refused = api.post(path, json={"model": worker["model"], **body})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == 400 and error["param"] == param and error["message"]


def test_a_batch_of_chats_answers_one_choice_each(api, worker):
    conversations = [STORY, [{"role": "user", "content": "Name a flower."}]]
    body = {"model": worker["model"], "messages": conversations, "max_tokens": 5, "temperature": 0}
    answer = api.post("/v1/chat/completions/batch", json=body)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["role"] == "assistant" and c["message"]["content"] for c in choices)
    assert job(api, answer.headers["x-job-id"])["state"] == "completed"


def test_invocations_serve_a_chat_or_a_completion_by_the_body(api, worker):
    model = worker["model"]
    chat = api.post("/invocations", json={"model": model, "messages": STORY, "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion", chat.text
    text = api.post("/invocations", json={"model": model, "prompt": "A bee", "max_tokens": 3})
    assert text.status_code == 200 and text.json()["object"] == "text_completion", text.text
    streamed = _stream(api, "/invocations", {"model": model, "prompt": "A bee", "max_tokens": 3, "stream": True})
    assert streamed and all(c["object"] == "text_completion" for c in streamed)
    neither = api.post("/invocations", json={"model": model, "prompt": "A bee", "max_tokens": "many"})
    assert neither.status_code == 400, neither.text
    message = neither.json()["error"]["message"]
    assert message.startswith("Cannot find suitable handler for request. Expected one of:")
    assert "ChatCompletionRequest" in message and "CompletionRequest" in message


def test_ping_version_and_load(api, worker):
    for method in ("GET", "POST"):
        ping = api.request(method, "/ping")
        assert ping.status_code == 200 and ping.content == b"", ping.text
    version = api.get("/version").json()
    names = metadata.packages_distributions()["vllm"]
    assert version["version"] == metadata.version(names[0]) and version["rbee"]
    load = api.get("/load")
    assert load.status_code == 200 and set(load.json()) == {"server_load"}
    assert isinstance(load.json()["server_load"], int) and load.json()["server_load"] >= 0


def _usages(api, worker: dict[str, Any], options: dict[str, Any]) -> list[Any]:
    body = {"model": worker["model"], "prompt": "A bee", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": options}  # fmt: skip
    return [chunk.get("usage") for chunk in _stream(api, "/v1/completions", body)]


def test_continuous_usage_comes_only_with_include_usage(api, worker):
    """As vLLM's server: ``continuous_usage_stats`` puts the usage in every chunk only when
    ``include_usage`` is asked for too."""
    assert all(u is None for u in _usages(api, worker, {"continuous_usage_stats": True}))
    off = {"include_usage": False, "continuous_usage_stats": True}
    assert all(u is None for u in _usages(api, worker, off))
    both = _usages(api, worker, {"include_usage": True, "continuous_usage_stats": True})
    assert all(u is not None for u in both) and both[-1]["completion_tokens"] == 4


def test_refusals_are_worded_as_vllms_server_words_them(api, worker):
    seed = api.post(
        "/v1/completions", json={"model": worker["model"], "prompt": "x", "seed": 2**64}
    )
    assert seed.status_code == 400, seed.text
    error = seed.json()["error"]
    assert error["code"] == 400 and error["param"] == "body.seed"
    assert error["message"].startswith("1 validation error:")
    assert str(2**63 - 1) in error["message"]  # the bound it broke

    unknown = api.post("/v1/chat/completions", json={"model": "nobody/none", "messages": STORY})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": "The model `nobody/none` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_the_job_keeps_rbees_code_of_a_refusal(api, worker):
    """The HTTP answer is vLLM's; the job's own record and error event keep rbee's code."""
    refused = api.post("/v1/completions", json={"model": worker["model"], "prompt": "x", "n": 0})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == 400
    record = job(api, refused.headers["x-job-id"])
    assert record["state"] == "failed" and record["error"]["code"] == "INVALID_REQUEST"
    assert "n must be at least 1" in record["error"]["message"]


def test_openapi_json_documents_every_route_and_is_valid_openapi_3_1(api, hive):
    """Made from the routes and the models that read their bodies: every route is there,
    ``POST /v1/jobs`` takes every operation, vLLM's routes take vLLM's own request models."""
    from openapi_spec_validator import validate
    from starlette.routing import Route

    from actors.core.config import Config
    from actors.core.operations import OPERATION_NAMES
    from actors.registry_client import Registry
    from serve_app.server.app import Api
    from serve_app.server.jobstream import JobStream

    answer = api.get("/openapi.json", timeout=120)  # (vLLM's models are read once, ~10 s)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    config = Config.load(env={})
    routes: dict[str, set[str]] = {}
    for route in Api(config, JobStream(config, Registry(None))).routes():
        if isinstance(route, Route) and ":rest}" not in route.path:
            methods = {m.lower() for m in route.methods or ()} - {"head"}
            routes.setdefault(route.path.replace(":job}", "}"), set()).update(methods)
    assert {path: set(ops) for path, ops in doc["paths"].items()} == routes
    schemas = doc["components"]["schemas"]
    jobs = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    operation = schemas[jobs["schema"]["$ref"].rsplit("/", 1)[1]]
    assert set(operation["discriminator"]["mapping"]) == set(OPERATION_NAMES)
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    spelled = schemas[chat["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"messages", "model", "stream_options"} <= set(spelled["properties"])
    assert doc["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"][0]["schema"]["pattern"]
    assert api.get("/openapi.json").json() == doc  # made once
