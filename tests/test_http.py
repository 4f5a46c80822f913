"""The HTTP contract around jobs: status codes, errors, correlation ids, auth, fuzzing."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from actors.config import Config
from serve_app.app import build_app
from tests.helpers import job, read_sse, submit, wait_state


def test_health(api):
    response = api.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


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
    ],
)
def test_bad_submissions_get_clear_json_errors(api, body, status, code):
    before = len(api.get("/v1/jobs", params={"limit": 10000}).json()["jobs"])
    response = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert len(api.get("/v1/jobs", params={"limit": 10000}).json()["jobs"]) == before


def test_body_over_the_limit_is_413(api):
    big = json.dumps({"operation": "hive_list", "pad": "x" * (1 << 20)})
    response = api.post("/v1/jobs", content=big)
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
    "query", [{"state": "sleeping"}, {"operation": "dance"}, {"limit": "x"}, {"limit": "0"}]
)
def test_bad_list_filters_are_422(api, query):
    response = api.get("/v1/jobs", params=query)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


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


def test_bad_last_event_id_is_422(api):
    job_id = submit(api, {"operation": "hive_list"})
    response = api.get(f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": "abc"})
    assert response.status_code == 422


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
    with TestClient(build_app(config, registry)) as client:
        assert client.get("/health").status_code == 200
        refused = client.get("/v1/jobs")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "UNAUTHORIZED"
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/v1/jobs", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_ops = st.sampled_from(
    ["model_download", "model_list", "model_get", "model_delete", "hive_list", "hive_status", "x"]
)
_op_bodies = st.fixed_dictionaries(
    {"operation": _ops},
    optional={
        "model": st.text(max_size=30) | st.sampled_from(["a/b", "../x", "a/..", "o/n\x00"]),
        "files": st.lists(st.text(max_size=12), max_size=3) | _json_values,
        "revision": st.text(max_size=12),
        "vendor": st.sampled_from(["hf", "url", "zz"]),
        "hive_id": st.text(max_size=8),
        "extra": _json_values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_op_bodies | _json_values)
def test_fuzz_submit_never_5xx(api, body):
    response = api.post("/v1/jobs", json=body)
    assert response.status_code < 500, response.text
    assert response.status_code in (201, 400, 422)
    if response.status_code != 201:
        assert response.json()["error"]["code"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({}, optional={"job_id": _json_values}) | _json_values)
def test_fuzz_cancel_never_5xx(api, body):
    response = api.post("/cancel", json=body)
    assert response.status_code in (202, 400, 422), response.text


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bytes_never_5xx(api, raw):
    for path in ("/v1/jobs", "/cancel"):
        response = api.post(path, content=raw)
        assert response.status_code < 500, response.text


def test_hub_unreachable_is_a_failed_job_not_a_5xx(api):
    job_id = submit(api, {"operation": "model_download", "model": "nobody/missing"})
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=30)
    assert stream.of("error")[-1]["code"] == "MODEL_NOT_FOUND"
    assert job(api, job_id)["state"] == "failed"


__all__ = ["httpx"]
