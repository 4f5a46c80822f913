"""The HTTP contract around jobs: status codes, errors, correlation ids, auth, bad input.

``test_fuzz.py`` throws random input at every route; here are the cases known to have hurt."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.testclient import TestClient

from actors.core.config import Config
from serve_app.server.app import build_app
from serve_app.server.guards import is_loopback
from serve_app.server.launch import open_without_token
from tests.helpers import job, read_sse, submit, wait_state


def test_health(api):
    response = api.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "preload": {}}  # this hive preloads nothing


def test_correlation_id_is_echoed_or_generated(api):
    given_id = api.get("/health", headers={"X-Correlation-Id": "trace-42"})
    assert given_id.headers["x-correlation-id"] == "trace-42"
    made = api.get("/v1/jobs/job-nope")
    assert made.headers["x-correlation-id"].startswith("cid-")


def test_submit_returns_at_once_with_stream_url(api):
    response = api.post(
        "/v1/jobs", json={"operation": "hive_list"}, headers={"X-Correlation-Id": "c-1"}
    )
    assert response.status_code == 201
    body = response.json()
    assert body["job_id"].startswith("job-")
    assert body["sse_url"] == f"/v1/jobs/{body['job_id']}/stream"
    record = wait_state(api, body["job_id"], "completed")
    assert record["correlation_id"] == "c-1"
    assert set(record) >= {
        "job_id",
        "operation",
        "state",
        "created_at",
        "started_at",
        "finished_at",
        "progress",
        "result",
        "error",
        "correlation_id",
    }
    assert record["result"]["hives"][0]["alive"] is True


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "INVALID_JSON"),
        (b'{"operation": "explode"}', 422, "INVALID_REQUEST"),
        (b'{"operation": "model_download", "model": "a/b", "typo": 1}', 422, "INVALID_REQUEST"),
        (b'{"operation": "model_download", "model": "../../etc"}', 422, "INVALID_REQUEST"),
        (
            b'{"operation": "model_download", "model": "a/b", "files": ["../../x"]}',
            422,
            "INVALID_REQUEST",
        ),
        (b"[]", 422, "INVALID_REQUEST"),
        # Too deep or too long for the parser, or not JSON numbers at all: 400, never 500.
        (b"[" * 1000 + b"]" * 1000, 400, "INVALID_JSON"),
        (b"[" * 200_000, 400, "INVALID_JSON"),
        (b'{"operation": "hive_list", "hive_id": ' + b"7" * 5000 + b"}", 400, "INVALID_JSON"),
        (b'{"operation": "hive_list", "hive_id": 1e999}', 400, "INVALID_JSON"),
        (b'{"operation": "hive_list", "hive_id": NaN}', 400, "INVALID_JSON"),
        (b'{"operation": "hive_list", "hive_id": "\\ud800"}', 400, "INVALID_JSON"),
        # `$` matches before a final newline: ids are matched whole.
        (b'{"operation": "model_get", "model": "a/b\\n"}', 422, "INVALID_REQUEST"),
        (b'{"operation": "model_download", "model": " a/b"}', 422, "INVALID_REQUEST"),
        (b'{"operation": "infer", "model": "a/b\\n", "prompt": "x"}', 422, "INVALID_REQUEST"),
        (b'{"operation": "hive_status", "hive_id": "h\\n"}', 422, "INVALID_REQUEST"),
        (b'{"operation": "worker_stop", "worker_id": "w 1"}', 422, "INVALID_REQUEST"),
        (
            b'{"operation": "worker_spawn", "model": "a/b", "worker_id": "w\\n"}',
            422,
            "INVALID_REQUEST",
        ),
        (
            b'{"operation": "model_download", "model": "a/b", "revision": "main\\n"}',
            422,
            "INVALID_REQUEST",
        ),
        (
            b'{"operation": "model_download", "model": "a/b", "files": ["*.json\\t"]}',
            422,
            "INVALID_REQUEST",
        ),
        (
            b'{"operation": "model_download", "model": "a/b", "vendor": "url", "url": "http://h/x\\n"}',
            422,
            "INVALID_REQUEST",
        ),
    ],
)
def test_bad_submissions_get_clear_json_errors(api, body, status, code):
    before = len(api.get("/v1/jobs", params={"limit": 10000}).json()["jobs"])
    response = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert len(api.get("/v1/jobs", params={"limit": 10000}).json()["jobs"]) == before


def test_body_over_the_limit_is_413(api):
    big = json.dumps({"operation": "hive_list", "pad": "x" * (1 << 20)})
    response = api.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "BODY_TOO_LARGE"


def test_unknown_job_and_route_are_404_json(api):
    for response in (
        api.get("/v1/jobs/job-unknown"),
        api.get("/v1/jobs/job-unknown/stream"),
        api.delete("/v1/jobs/job-unknown"),
        api.get("/no/such/route"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"]


@pytest.mark.parametrize(
    "query",
    [
        {"state": "sleeping"},
        {"operation": "dance"},
        {"limit": "x"},
        {"limit": "0"},
        {"limit": "10001"},
        {"limit": "1" * 5000},
        {"limit": "²"},
        {"limit": "\uff11\uff10"},  # fullwidth digits: int() takes them, we do not
        {"limit": " 5"},
        [("state", "queued"), ("state", "running")],
        [("limit", "5"), ("limit", "6")],
    ],
)
def test_bad_list_filters_are_422(api, query):
    response = api.get("/v1/jobs", params=query)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


def test_empty_filters_mean_any(api):
    """What a web form sends for "any": no filter, not an error."""
    every = api.get("/v1/jobs", params={"limit": 5}).json()["jobs"]
    blank = api.get("/v1/jobs", params={"state": "", "operation": "", "limit": "5"})
    assert blank.status_code == 200 and blank.json()["jobs"] == every


def test_list_is_newest_first_and_filters(api):
    first = submit(api, {"operation": "hive_list"})
    second = submit(api, {"operation": "model_list"})
    wait_state(api, second, "completed")
    ids = [j["job_id"] for j in api.get("/v1/jobs").json()["jobs"]]
    assert ids.index(second) < ids.index(first)
    only = api.get("/v1/jobs", params={"operation": "model_list", "limit": 1000}).json()["jobs"]
    assert second in [j["job_id"] for j in only]
    assert all(j["operation"] == "model_list" for j in only)
    assert len(api.get("/v1/jobs", params={"limit": 1}).json()["jobs"]) == 1


def test_finished_job_replays_and_resumes_after_last_event_id(api):
    job_id = submit(api, {"operation": "hive_status"})
    wait_state(api, job_id, "completed")
    full = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=20)
    assert full.sentinel == "[DONE]"
    ids = [e["id"] for e in full.events]
    assert ids == list(range(1, len(ids) + 1))
    assert full.of("result")[0]["hive_id"]
    resumed = read_sse(
        api, f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": str(ids[0])}, deadline_s=20
    )
    assert [e["id"] for e in resumed.events] == ids[1:]
    assert resumed.sentinel == "[DONE]"


@pytest.mark.parametrize(
    "value", ["abc", "1" * 5000, "9" * 19, "²", "\u0661", "-1", "1.0", "0x1", "1 2"]
)
def test_bad_last_event_id_is_422(api, value):
    job_id = submit(api, {"operation": "hive_list"})
    wait_state(api, job_id, "completed")
    path = f"/v1/jobs/{job_id}/stream"
    for response in (
        api.get(path, headers={"Last-Event-ID": value.encode()}),
        api.get(path, params={"last_event_id": value}),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "INVALID_REQUEST"


def test_odd_path_ids_are_unknown_jobs(api):
    """An id without the job-id form names no job, on every route, the cancel included (it
    stays 202 for a well-formed id of no job: ``test_cancel``)."""
    for job_id in ("%00", "job-%0A", "a%20b", "%C3%A9", "%E2%80%AE", "x" * 5000):
        for method, path in (
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/stream"),
            ("DELETE", f"/v1/jobs/{job_id}"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
        ):
            response = api.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "JOB_NOT_FOUND"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/cancel", {}),
        ("/cancel", {"job_id": ""}),
        ("/cancel", {"job_id": ["job-1"]}),
        ("/v1/jobs/cancel", {"job_ids": "job-1"}),
        ("/v1/jobs/cancel", {"operation": ["model_list"]}),  # unhashable: was a 500
        ("/v1/jobs/cancel", {"state": {"x": 1}}),
    ],
)
def test_bad_cancel_bodies_are_422(api, path, body):
    response = api.post(path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/cancel", {"job_id": "job-1\n"}),
        ("/cancel", {"job_id": " "}),
        ("/cancel", {"job_id": "a\x00b"}),
        ("/v1/jobs/cancel", {"job_ids": ["job-1", "job 2"]}),
        ("/v1/jobs/cancel", {"job_ids": [""]}),
    ],
)
def test_cancel_bodies_naming_no_job_id_are_404(api, path, body):
    response = api.post(path, json=body)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "JOB_NOT_FOUND"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b"[" * 5000),
        ("/v1/completions", b'{"model": "a/b", "prompt": NaN}'),
        ("/v1/completions", b'{"model": "a/b\\n", "prompt": "x"}'),
        ("/v1/completions", b'{"model": "a/b", "prompt": [1, 2]}'),
        ("/v1/completions", b'{"model": "a/b", "prompt": "x", "seed": 1e999}'),
        ("/v1/chat/completions", b'{"model": "a/b", "messages": []}'),
        ("/v1/chat/completions", b'{"model": "a/b", "messages": [{"role": "x", "content": "y"}]}'),
        ("/v1/chat/completions", b'{"model": "a/b", "messages": "hi"}'),
        ("/v1/chat/completions", b"null"),
    ],
)
def test_openai_routes_refuse_bad_bodies_with_4xx_json(api, path, body):
    response = api.post(path, content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["message"]


def test_model_get_of_missing_model_fails_the_job(api):
    job_id = submit(api, {"operation": "model_get", "model": "nobody/nothing"})
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=20)
    assert stream.of("error")[-1]["code"] == "MODEL_NOT_FOUND"
    assert stream.sentinel.startswith("[ERROR] ")
    assert job(api, job_id)["state"] == "failed"


def test_api_token_guards_every_route_but_health(hive):
    import ray

    from actors.naming import NAMESPACE, REGISTRY

    config = Config.load(env={"RBEE_API_TOKEN": "s3cret"})
    registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
    with TestClient(build_app(config, registry), base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
        assert client.get("/health").status_code == 200
        refused = client.get("/v1/jobs")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "UNAUTHORIZED"
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/v1/jobs", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        # The scheme is case-insensitive (RFC 7235), whitespace around it is tolerated.
        for given in ("bearer s3cret", "BEARER s3cret", "  Bearer \t s3cret  "):
            assert client.get("/v1/jobs", headers={"Authorization": given}).status_code == 200
        # Anything else is a 401, whatever its bytes.
        for given in (
            b"Bearer S3CRET",
            b"Bearer s3cret extra",
            b"Bearers3cret",
            b"Basic s3cret",
            b"s3cret",
            b"Bearer \xe9\xff\x80",
            b"Bearer s3cret\xe9",
            b"Bearer " + b"t" * 100_000,
            b"\xff" * 1000,
        ):
            response = client.get("/v1/jobs", headers={"Authorization": given})
            assert response.status_code == 401, given[:40]
            assert response.json()["error"]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.20", False),
        ("::ffff:10.0.0.1", False),
        ("rbee.example.com", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_listening_beyond_loopback_without_a_token_warns():
    def warns(host: str, **env: str) -> bool:
        return open_without_token(Config.load(env=env, server__host=host).server)

    assert warns("0.0.0.0") and warns("192.168.1.20") and warns("rbee.example.com")
    assert not warns("127.0.0.1") and not warns("::1") and not warns("localhost")
    assert not warns("0.0.0.0", RBEE_API_TOKEN="s3cret")


def test_hub_unreachable_is_a_failed_job_not_a_5xx(api):
    job_id = submit(api, {"operation": "model_download", "model": "nobody/missing"})
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=30)
    assert stream.of("error")[-1]["code"] == "MODEL_NOT_FOUND"
    assert job(api, job_id)["state"] == "failed"


__all__ = ["httpx"]
