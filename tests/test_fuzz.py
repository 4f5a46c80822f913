"""Every route of the real server, fuzzed: no body, header, query or path gets a 5xx (SPEC §7).

What the fuzzers send must never act on the session's real models or workers: the only
valid model ids they make are ``fuzz/...``, which no hub and no cache holds (so ``infer`` and
``worker_spawn`` fail fast with ``MODEL_NOT_FOUND`` instead of starting an engine), and they
never cancel jobs by filter except of operations that touch nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from actors.core.config import Config
from actors.core.errors import InvalidRequest
from actors.core.operations import OPERATION_NAMES, check_model_id
from actors.core.table import is_job_id
from serve_app.server.app import build_app
from tests.helpers import read_sse, submit

pytestmark = pytest.mark.ray

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
OPENAI = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/invocations",
    "/version",
    "/ping",
    "/load",
    "/v1/responses",
    "/metrics",
)
ANTHROPIC = ("/v1/messages",)
ROUTES = [
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("DELETE", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/stream"),
    ("GET", "/v1/jobs/watch"),
    ("GET", "/v1/hives"),
    ("GET", "/"),
    ("GET", "/ui/app.js"),
    ("GET", "/sw.js"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("POST", "/cancel"),
    ("POST", "/v1/jobs/cancel"),
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/batch"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/invocations"),
    ("GET", "/version"),
    ("GET", "/ping"),
    ("POST", "/ping"),
    ("GET", "/load"),
    ("GET", "/metrics"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{id}"),
    ("DELETE", "/v1/responses/{id}"),
    ("GET", "/v1/responses/{id}/input_items"),
    ("POST", "/v1/responses/{id}/cancel"),
]
BODY_ROUTES = [path for method, path in ROUTES if method == "POST"]
# Cancelling by filter stops every job it matches: only these touch nothing.
_HARMLESS_OPS = {"hive_list", "hive_status", "model_list", "worker_list"}
_CID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# --- strategies -------------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: json.dumps writes them, the server refuses them
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_ids = (
    st.text(max_size=40)
    | st.sampled_from(
        ["a/b\n", "\na/b", " a/b", "a/b ", "a/\tb", "a/b\x00", "a/b\u00a0", "a/b\u200b", "o/n\r",
         "../x", "a/..", "x" * 300, "fuzz/ok\n", "²", "fuzz/ok", "w-main\n", ""]
    )
    | st.from_regex(r"fuzz/[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True)
)  # fmt: skip
_op_bodies = st.fixed_dictionaries(
    {"operation": st.sampled_from(sorted(OPERATION_NAMES)) | st.text(max_size=12)},
    optional={
        "model": _ids,
        "hive_id": _ids,
        "worker_id": _ids,
        "revision": _ids,
        "files": st.lists(_ids, max_size=3) | _json,
        "url": _ids | st.sampled_from(["http://127.0.0.1:9/x", "https://h/a b", "ftp://h/x"]),
        "vendor": st.sampled_from(["hf", "url", "zz"]),
        "prompt": st.text(max_size=20) | _json,
        "messages": _json,
        "max_tokens": st.integers() | _json,
        "temperature": st.floats() | _json,
        "device": st.sampled_from(["cpu", "gpu", "tpu"]),
        "extra": _json,
    },
)
_cancel_bodies = st.fixed_dictionaries({}, optional={"job_id": _ids | _json})
_cancel_many_bodies = st.fixed_dictionaries(
    {},
    optional={
        "job_ids": st.lists(_ids, max_size=4) | _json,
        "state": st.sampled_from(["queued", "running", "completed", ""]) | _json,
        "operation": st.sampled_from(sorted(OPERATION_NAMES)) | _json,
        "extra": _json,
    },
)
_openai_bodies = st.fixed_dictionaries(
    {"model": _ids},
    optional={
        "prompt": st.text(max_size=20) | st.lists(st.text(max_size=5), max_size=3) | _json,
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "tool", ""]), "content": st.text(max_size=10) | _json}
            ),
            max_size=3,
        ) | _json,
        "max_tokens": st.integers() | _json,
        "temperature": st.floats() | _json,
        "top_p": st.floats() | _json,
        "seed": st.integers() | _json,
        "stop": _ids | st.lists(_ids, max_size=10) | _json,
        "n": st.integers(-1, 3),
        "stream": st.booleans() | _json,
        "user": _json,
        # Anthropic's
        "system": st.text(max_size=10) | _json,
        "stop_sequences": st.lists(_ids, max_size=3) | _json,
        "thinking": _json,
        "tool_choice": _json,
        # OpenAI's Responses
        "input": st.text(max_size=10) | _json,
        "max_output_tokens": st.integers() | _json,
        "previous_response_id": _ids | _json,
        "store": st.booleans() | _json,
    },
)  # fmt: skip
# By name: hypothesis prints a failing example, and some of these are large.
_NASTY = {
    "deep 1000": b"[" * 1000 + b"]" * 1000,
    "deep objects": b'{"operation":' * 5000,
    "deep 200k": b"[" * 200_000,
    "5000 digits": b'{"operation":"hive_list","hive_id":' + b"1" * 5000 + b"}",
    "4000-digit float": b'{"operation":"hive_list","hive_id":1' + b"0" * 4000 + b".5}",
    "1e999": b'{"operation":"hive_list","hive_id":1e999}',
    "NaN": b'{"operation":"hive_list","hive_id":NaN}',
    "lone surrogate": b'{"operation":"hive_list","hive_id":"\\ud800"}',
    "lone low surrogate": b'{"job_id":"\\udfff"}',
    "half a pair": b'{"model":"fuzz/x","prompt":"\\ud83d"}',
    "BOM": b"\xef\xbb\xbf{}",
    "UTF-16": json.dumps({"operation": "hive_list"}).encode("utf-16"),
    "duplicate keys": b'{"a":1,"a":2}',
    "NUL": b"\x00",
    "empty": b"",
    "spaces": b" " * 100,
    "over 1 MiB": b'{"operation":"hive_list","pad":"' + b"x" * (1 << 20) + b'"}',
}
_raw = st.binary(max_size=300) | st.sampled_from(sorted(_NASTY))  # bytes, or a name
# Printable latin-1 (no DEL): what a header value may hold.
_latin1 = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=200,
)
_header_samples = [
    "Bearer x", "bearer x", "BEARER  x", "Basic eA==", "Bearer", "Bearer \xe9\xff", "Bearer " + "t" * 3000,
    "5", "0", "18446744073709551616", "9" * 3000, "²", "\xb2\xb3\xb9", "-1", "+1", "1.5", "0x10", "",
    "application/json", "text/plain; charset=latin-1", "multipart/form-data; boundary=x",
]  # fmt: skip
# h11 (under httpx) sends no value with whitespace at either end. Four headers stay under the
# 16 KiB a request's headers may take at HAProxy (test_fast_path checks what lies beyond).
_header_values = _latin1.map(lambda v: v.strip(" ")) | st.sampled_from(_header_samples)
_header_names = ["Authorization", "Last-Event-ID", "X-Correlation-Id", "Content-Type"]
_headers = st.dictionaries(st.sampled_from(_header_names), _header_values, max_size=4)
_query_values = (
    st.text(max_size=30)
    | st.sampled_from(
        ["", "0", "1", "10000", "10001", "-1", "1" * 2000, "9" * 19, "²", "\uff11\uff10", "1e3", "queued", "running",
         "completed", "hive_list", "model_list", "infer", " 1", "1\n"]
    )
)  # fmt: skip
_queries = st.lists(
    st.tuples(
        st.sampled_from(["state", "operation", "limit", "last_event_id", "x"]), _query_values
    ),
    max_size=5,
)
_path_ids = st.text(max_size=60) | st.sampled_from(
    [
        "\x00",
        "job-\x00",
        "a b",
        "job-\n",
        "é",
        "\u202e",
        "%",
        "%00",
        "?",
        "#",
        "x" * 5000,
        "job-" + "0" * 36,
        "job-00000000-0000-4000-8000-00000000000G",
        "job-00000000-0000-4000-8000-000000000000\n",
    ]
) | st.uuids().map(lambda u: f"job-{u}")  # well-formed ids of no job


# --- how to send and what to expect -------------------------------------------------------


def send(
    client: httpx.Client,
    method: str,
    path: str,
    *,
    content: bytes | None = None,
    headers: dict[str, Any] | None = None,
    params: Any = None,
) -> httpx.Response:
    """One request; an event stream is closed as soon as its headers are in (a running job's
    stream stays open), anything else is read whole."""
    timeout = httpx.Timeout(30.0, read=5.0) if path.endswith(("/stream", "/watch")) else 30.0
    if path == "/openapi.json":
        timeout = 120.0  # made on its first request: vLLM's models are read in ~10 s
    with client.stream(
        method, path, content=content, headers=headers, params=params, timeout=timeout
    ) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
    return response


def check(response: httpx.Response, path: str) -> None:
    """No 5xx; every 4xx is a JSON error, whose ``code`` is rbee's or, on vLLM's routes, the
    status (as vLLM's server writes it); on Anthropic's, in Anthropic's shape."""
    assert response.status_code < 500, (response.status_code, response.text)
    if 400 <= response.status_code < 500:
        answer = response.json()
        error = answer["error"]
        assert isinstance(error["message"], str) and error["message"]
        if path.startswith(ANTHROPIC):
            assert answer["type"] == "error" and error["type"].endswith(("_error", "_large")), answer
        elif path.startswith(OPENAI):
            assert error["code"] == response.status_code, error
        else:
            assert isinstance(error["code"], str) and error["code"]


def harmless(path: str, body: Any) -> bool:
    """Whether ``body`` sent to ``path`` can only act on things no other test owns: a valid
    model id is ``fuzz/...``; a cancel by filter names an operation that touches nothing."""
    if not isinstance(body, dict):
        return True
    model = body.get("model")
    if isinstance(model, str) and not model.startswith("fuzz/"):
        try:
            check_model_id(model)
        except InvalidRequest:
            pass
        else:
            return False
    if body.get("worker_id") == "w-main":
        return False
    if path == "/v1/jobs/cancel" and "job_ids" not in body:
        operation = body.get("operation")
        if operation is None or (
            isinstance(operation, str) and operation in OPERATION_NAMES - _HARMLESS_OPS
        ):
            return False
    return True


def _path(template: str, job_id: str) -> str:
    return template.replace("{id}", quote(job_id, safe=""))


# --- the fuzzers ----------------------------------------------------------------------------


def test_fuzzed_models_fail_fast_without_an_engine(api):
    """What makes the fuzzers safe: a valid model that is in no cache starts nothing."""
    for op in (
        {"operation": "infer", "model": "fuzz/none", "prompt": "hi"},
        {"operation": "worker_spawn", "model": "fuzz/none", "device": "gpu"},
        {"operation": "model_download", "model": "fuzz/none"},
    ):
        stream = read_sse(api, f"/v1/jobs/{submit(api, op)}/stream", deadline_s=20)
        assert stream.of("error")[-1]["code"] == "MODEL_NOT_FOUND", op
    workers = api.post("/v1/jobs", json={"operation": "worker_list"}).json()["job_id"]
    listed = read_sse(api, f"/v1/jobs/{workers}/stream", deadline_s=20).of("result")[0]
    assert all(w["model"] != "fuzz/none" for w in listed["workers"])


@pytest.mark.parametrize("path", BODY_ROUTES)
@FUZZ
@given(
    body=st.one_of(_json, _op_bodies, _cancel_bodies, _cancel_many_bodies, _openai_bodies),
    raw=_raw,
    use_raw=st.booleans(),
)
def test_bodies(api, finished_job, path, body, raw, use_raw):
    assume(use_raw or harmless(path, body))
    if isinstance(raw, str):
        raw = _NASTY[raw]
    content = raw if use_raw else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    response = send(api, "POST", _path(path, finished_job), content=content, headers=headers)
    check(response, path)
    if path == "/v1/jobs" and response.status_code == 201:
        assert response.json()["job_id"].startswith("job-")
    if len(content) > 1 << 20 and not path.endswith(("}/cancel", "/ping")):  # (read no body)
        assert response.status_code == 413


@pytest.mark.parametrize(("method", "path"), ROUTES)
@FUZZ
@given(headers=_headers)
def test_headers(api, finished_job, method, path, headers):
    body = {
        "/v1/jobs": {"operation": "hive_list"},
        "/cancel": {"job_id": "job-fuzz"},
        "/v1/jobs/cancel": {"job_ids": ["job-fuzz"]},
        "/v1/completions": {"model": "fuzz/none", "prompt": "hi", "max_tokens": 1},
        "/v1/chat/completions": {"model": "fuzz/none", "messages": [{"role": "user", "content": "hi"}]},
    }.get(path)  # fmt: skip
    content = json.dumps(body).encode() if body is not None else None
    raw_headers = {name: value.encode("latin-1") for name, value in headers.items()}
    response = send(api, method, _path(path, finished_job), content=content, headers=raw_headers)
    check(response, path)
    given_cid = headers.get("X-Correlation-Id", "")
    echoed = response.headers["x-correlation-id"]
    assert echoed == given_cid if _CID_OK.fullmatch(given_cid) else echoed.startswith("cid-")
    if path.endswith(("/stream", "/watch")) and "Last-Event-ID" in headers:
        given_id = headers["Last-Event-ID"]
        form = r"[0-9]{1,18}" if path.endswith("/stream") else r"[0-9a-f]{1,32}\.[0-9]{1,18}"
        ok = given_id == "" or re.fullmatch(form, given_id) is not None
        assert response.status_code == (200 if ok else 422), given_id


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/watch"])
@FUZZ
@given(query=_queries)
def test_list_query(api, path, query):
    response = send(api, "GET", path, params=query)
    check(response, path)
    assert response.status_code in (200, 422)


@FUZZ
@given(query=_queries)
def test_stream_query(api, finished_job, query):
    response = send(api, "GET", f"/v1/jobs/{finished_job}/stream", params=query)
    check(response, "/stream")
    assert response.status_code in (200, 422)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/jobs/{id}", 404),
        ("DELETE", "/v1/jobs/{id}", 404),
        ("GET", "/v1/jobs/{id}/stream", 404),
        ("POST", "/v1/jobs/{id}/cancel", 202),  # SPEC §5: always, unknown ids too
    ],
)
@FUZZ
@given(job_id=_path_ids)
def test_path_ids(api, method, path, status, job_id):
    response = send(api, method, _path(path, job_id))
    check(response, path)
    # httpx resolves "." and ".." segments, and "/" in an id is a different route.
    if job_id.strip(".") and "/" not in job_id:
        # An id without the job-id form names no job: 404 everywhere, the cancel too.
        expected = status if is_job_id(job_id) else 404
        assert response.status_code == expected, (job_id, response.text)


@pytest.fixture(scope="module")
def guarded(hive) -> Iterator[TestClient]:
    """The app with an API token, in this process, on the session's registry."""
    import ray

    from actors.naming import NAMESPACE, REGISTRY

    config = Config.load(env={"RBEE_API_TOKEN": "s3cret"})
    registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
    with TestClient(build_app(config, registry), base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
        yield client


_authorizations = (
    _latin1
    | _latin1.map(lambda t: f"Bearer {t}")
    | st.sampled_from(
        ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", " \tBeArEr \t s3cret\t ", "Bearer s3cret x",
         "Bearer s3cretx", "Bearer S3CRET", "Bearers3cret", "Basic s3cret", "s3cret", "Bearer\ts3cret"]
    )
)  # fmt: skip


@FUZZ
@given(value=_authorizations)
def test_authorization(guarded, value):
    """Any bytes (the in-process client sends them unstripped): 200 for the token, else 401."""
    headers = {"Authorization": value.encode("latin-1")}
    response = guarded.get("/v1/jobs", params={"limit": 1}, headers=headers)
    words = re.split(r"[ \t]+", value.strip(" \t"))
    right = len(words) == 2 and words[0].lower() == "bearer" and words[1] == "s3cret"
    assert response.status_code == (200 if right else 401), value
    check(response, "/v1/jobs")
