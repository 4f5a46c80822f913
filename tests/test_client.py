"""The Python client: typed events and errors, reconnects without loss, use from Ray Serve."""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.core.errors import (
    DownloadFailed,
    InternalError,
    InvalidRequest,
    JobCancelled,
    JobFinished,
    JobNotFound,
    ModelNotFound,
    RbeeError,
    Unauthorized,
)
from actors.core.events import Error, Narration, Progress, Result, Token
from serve_app import sse
from serve_app.client.api import (
    AsyncClient,
    Client,
    ServerError,
    ServerUnavailable,
    StreamEvent,
    error_class,
    operation,
    to_error,
)
from tests.conftest import free_port
from tests.helpers import random_model, read_sse

MiB = 1 << 20


# -- the pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("MODEL_NOT_FOUND", ModelNotFound),
        ("JOB_NOT_FOUND", JobNotFound),
        ("JOB_FINISHED", JobFinished),
        ("INVALID_REQUEST", InvalidRequest),
        ("UNAUTHORIZED", Unauthorized),
        ("DOWNLOAD_FAILED", DownloadFailed),
        ("CANCELLED", JobCancelled),
        ("INTERNAL", InternalError),
        ("UNAVAILABLE", ServerUnavailable),
    ],
)
def test_server_codes_become_the_servers_own_error_classes(code, cls):
    assert error_class(code) is cls
    error = to_error(code, "why", retriable=False)
    assert type(error) is cls and error.code == code and error.message == "why"


def test_an_unknown_code_keeps_its_code_and_survives_pickle():
    error = to_error("INSUFFICIENT_VRAM_NEXT_YEAR", "too big", retriable=True)
    assert isinstance(error, ServerError) and isinstance(error, RbeeError)
    again = pickle.loads(pickle.dumps(error))
    assert (again.code, again.message, again.retriable) == (error.code, "too big", True)
    down = pickle.loads(pickle.dumps(ServerUnavailable("nobody home")))
    assert type(down) is ServerUnavailable and down.retriable


def test_operation_leaves_out_unset_fields():
    assert operation("model_download", model="org/x", revision=None, files=["*.json"]) == {
        "operation": "model_download",
        "model": "org/x",
        "files": ["*.json"],
    }


EVENTS = [
    Narration("download", "plan_ready", "3 files", correlation_id="c-1", ts=1.5),
    Progress(bytes_done=5, bytes_total=10, rate_bps=2.5, eta_s=2.0, file="a.bin"),
    Token("Hel", 1),
    Token("lo\nworld", 2),
    Result({"path": "/x", "files": ["a.bin"]}),
    Error("MODEL_NOT_FOUND", "no such model", False),
]


def _wire(events, sentinel: str = "data: [DONE]\n\n") -> str:
    body = "".join(sse.event(StreamEvent(i, e)) for i, e in enumerate(events, 1))
    return sse.KEEPALIVE + body + sentinel


def _mock_stream(text: str, record: dict[str, Any] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/stream"):
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=record or {})

    return httpx.MockTransport(handler)


def test_stream_yields_the_servers_typed_events_with_their_ids():
    with Client("http://rbee.test", transport=_mock_stream(_wire(EVENTS[:5]))) as client:
        got = list(client.stream("job-1"))
    assert got == [StreamEvent(i, e) for i, e in enumerate(EVENTS[:5], 1)]


@given(cut=st.integers(min_value=0, max_value=len(_wire(EVENTS)) - 1))
def test_a_cut_anywhere_never_yields_half_an_event(cut):
    text = _wire(EVENTS)[:cut]
    with Client("http://rbee.test", transport=_mock_stream(text), retries=0) as client:
        got: list[StreamEvent] = []
        with pytest.raises(ServerUnavailable, match="broke 1 times"):
            got.extend(client.stream("job-1"))
    assert got == [StreamEvent(i, e) for i, e in enumerate(EVENTS, 1)][: len(got)]


@pytest.mark.parametrize(
    ("events", "sentinel", "record", "raised"),
    [
        (EVENTS[5:], "data: [ERROR] no such model\n\n", None, ModelNotFound),
        (EVENTS[:1], "data: [ERROR] it broke\n\n", {"code": "DOWNLOAD_FAILED"}, DownloadFailed),
        (EVENTS[:1], "data: [ERROR] it broke\n\n", None, ServerError),
        ([Error("CANCELLED", "cancelled on request")], "data: [CANCELLED]\n\n", None, JobCancelled),
    ],
)
def test_a_job_that_did_not_complete_raises_its_error(events, sentinel, record, raised):
    error = {**record, "message": "from the record"} if record else None
    transport = _mock_stream(_wire(events, sentinel), {"state": "failed", "error": error})
    with Client("http://rbee.test", transport=transport) as client:
        seen: list[StreamEvent] = []
        with pytest.raises(raised):
            seen.extend(client.stream("job-1"))
    assert [s.event for s in seen] == events


def test_token_url_and_errors_from_the_environment(monkeypatch):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/jobs/job-gone":
            return httpx.Response(404, json={"error": {"code": "JOB_NOT_FOUND", "message": "no"}})
        if request.url.path == "/v1/jobs/job-proxy":
            return httpx.Response(502, text="<html>bad gateway</html>")
        return httpx.Response(201, json={"job_id": "job-9", "sse_url": "/v1/jobs/job-9/stream"})

    monkeypatch.setenv("RBEE_URL", "http://elsewhere.test:9/")
    monkeypatch.setenv("RBEE_API_TOKEN", "s3cret")
    with Client(transport=httpx.MockTransport(handler)) as client:
        assert client.url == "http://elsewhere.test:9"
        assert client.submit({"operation": "hive_list"}, correlation_id="trace-1") == "job-9"
        with pytest.raises(JobNotFound, match="no"):
            client.job("job-gone")
        with pytest.raises(InternalError, match="HTTP 502"):
            client.job("job-proxy")
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    assert seen[0].headers["x-correlation-id"] == "trace-1"
    assert json.loads(seen[0].content) == {"operation": "hive_list"}


def test_nothing_listening_is_server_unavailable():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as client:
        with pytest.raises(ServerUnavailable, match="cannot reach rbee"):
            client.submit(operation("hive_list"))
        with pytest.raises(ServerUnavailable):
            list(client.stream("job-x"))
    with pytest.raises(ServerUnavailable):
        asyncio.run(_async_jobs(url))


async def _async_jobs(url: str) -> list[dict[str, Any]]:
    async with AsyncClient(url) as client:
        return await client.jobs()


# -- against the real hive ---------------------------------------------------------------------


def _repo(hub, size: int) -> str:
    return random_model(hub, size, "org/cl")


@pytest.fixture
def rbee(hive):
    with Client(hive.url) as client:
        yield client


@pytest.fixture
def slow_hub(hub):
    hub.throttle_bps = MiB
    yield hub
    hub.throttle_bps = None


def test_download_streams_typed_events_and_returns_the_result(rbee, hub, cache_dir):
    repo = _repo(hub, 2 * MiB)
    started = time.monotonic()
    job_id = rbee.submit(operation("model_download", model=repo))
    assert time.monotonic() - started < 5 and job_id.startswith("job-")
    items = list(rbee.stream(job_id))
    assert [i.id for i in items] == list(range(1, len(items) + 1))
    progress = [i.event for i in items if isinstance(i.event, Progress)]
    assert progress[-1].bytes_done == progress[-1].bytes_total == 2 * MiB + 2
    result = items[-1].event
    assert isinstance(result, Result) and result.value["model"] == repo
    assert str(cache_dir) in result.value["path"]
    assert rbee.job(job_id)["state"] == "completed"
    assert job_id in [j["job_id"] for j in rbee.jobs(operation="model_download", limit=50)]
    again = rbee.download(repo)
    assert again["path"] == result.value["path"]


def test_errors_of_the_real_server_are_typed(rbee):
    with pytest.raises(JobNotFound):
        rbee.job("job-never")
    with pytest.raises(JobNotFound):
        list(rbee.stream("job-never"))
    with pytest.raises(InvalidRequest, match="typo"):
        rbee.submit({"operation": "model_download", "model": "org/x", "typo": 1})
    with pytest.raises(InvalidRequest):
        rbee.jobs(state="sleeping")
    with pytest.raises(ModelNotFound, match="org/absent"):
        rbee.run(operation("model_get", model="org/absent"))
    with pytest.raises(JobNotFound):
        rbee.cancel("job-never", wait=True)


def test_cancel_ends_the_stream_with_job_cancelled(rbee, slow_hub):
    repo = _repo(slow_hub, 3 * MiB)
    job_id = rbee.submit(operation("model_download", model=repo))
    seen: list[StreamEvent] = []
    with pytest.raises(JobCancelled):
        for item in rbee.stream(job_id):
            seen.append(item)
            if isinstance(item.event, Progress) and item.event.bytes_done > 0:
                rbee.cancel(job_id)
    assert rbee.job(job_id)["state"] == "cancelled"
    assert isinstance(seen[-1].event, Error) and seen[-1].event.code == "CANCELLED"
    with pytest.raises(JobFinished):
        rbee.cancel(job_id, wait=True)
    rbee.cancel(job_id)  # POST .../cancel stays idempotent


async def test_async_client_runs_a_download(hive, hub):
    repo = _repo(hub, MiB)
    async with AsyncClient(hive.url) as client:
        kinds: list[str] = []
        result = await client.download(repo, on_event=lambda item: kinds.append(item.event.kind))
        assert result["model"] == repo and kinds[-1] == "result" and "progress" in kinds
        job_id = (await client.jobs(operation="model_download", limit=1))[0]["job_id"]
        assert (await client.job(job_id))["state"] == "completed"
        with pytest.raises(ModelNotFound):
            await client.run(operation("model_get", model="org/absent"))


# -- a dropped stream is resumed: nothing lost, nothing twice -------------------------------------


class CuttingProxy:
    """A real TCP proxy on 127.0.0.1 in front of the hive that cuts the first job-stream
    response after ``cut_after`` bytes (headers included), then forwards everything."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._cut_after = cut_after
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.heads: list[str] = []  #: the request heads seen, in order
        self.cuts = 0
        self._lock = threading.Lock()

    def __enter__(self) -> CuttingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self._upstream)
            armed = threading.Event()
            threading.Thread(target=self._requests, args=(down, up, armed), daemon=True).start()
            threading.Thread(target=self._responses, args=(up, down, armed), daemon=True).start()

    def _requests(self, down: socket.socket, up: socket.socket, armed: threading.Event) -> None:
        while chunk := _recv(down):
            head = chunk.decode("latin-1")
            if head.startswith("GET "):
                with self._lock:
                    self.heads.append(head)
                    if "/stream" in head.split("\r\n", 1)[0] and self.cuts == 0:
                        armed.set()
            up.sendall(chunk)
        _close(up, down)

    def _responses(self, up: socket.socket, down: socket.socket, armed: threading.Event) -> None:
        sent = 0
        while chunk := _recv(up):
            if armed.is_set():
                room = self._cut_after - sent
                if len(chunk) >= room:
                    down.sendall(chunk[:room])
                    with self._lock:
                        self.cuts += 1
                    _close(up, down)
                    return
                sent += len(chunk)
            down.sendall(chunk)
        _close(up, down)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _follow(kind: str, url: str, job_id: str) -> list[int]:
    if kind == "sync":
        with Client(url) as client:
            return [item.id for item in client.stream(job_id)]

    async def follow() -> list[int]:
        async with AsyncClient(url) as client:
            return [item.id async for item in client.stream(job_id)]

    return asyncio.run(follow())


def _resumed_at(proxy: CuttingProxy) -> int:
    streams = [h for h in proxy.heads if "/stream" in h.split("\r\n", 1)[0]]
    assert len(streams) == 2, streams
    assert "last-event-id" not in streams[0].lower()
    line = next(x for x in streams[1].split("\r\n") if x.lower().startswith("last-event-id:"))
    return int(line.split(":", 1)[1])


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_finished_jobs_stream_cut_midway_is_resumed_exactly(kind, api, hive, hub):
    repo = _repo(hub, MiB)
    with Client(hive.url) as client:
        job_id = client.submit(operation("model_download", model=repo))
        list(client.stream(job_id))
    n = len(read_sse(api, f"/v1/jobs/{job_id}/stream").events)
    with CuttingProxy(hive.url, cut_after=700) as proxy:
        ids = _follow(kind, proxy.url, job_id)
    assert proxy.cuts == 1
    assert ids == list(range(1, n + 1))
    assert 1 <= _resumed_at(proxy) < n


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_live_stream_cut_midway_is_resumed_exactly(kind, api, hive, slow_hub):
    repo = _repo(slow_hub, 3 * MiB)
    with Client(hive.url) as client:
        job_id = client.submit(operation("model_download", model=repo))
    with CuttingProxy(hive.url, cut_after=1100) as proxy:
        ids = _follow(kind, proxy.url, job_id)
    assert proxy.cuts == 1
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream")
    assert stream.sentinel == "[DONE]"
    assert ids == [e["id"] for e in stream.events] == list(range(1, len(ids) + 1))
    assert 1 <= _resumed_at(proxy) < len(ids)
