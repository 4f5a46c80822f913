"""Small test helpers: read an SSE stream under a deadline, wait for a condition."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from serve_app import sse


@dataclass
class Sse:
    events: list[dict[str, Any]] = field(default_factory=list)  #: {"id","event","data"}
    sentinel: str | None = None
    comments: int = 0

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["event"] == kind]


def read_sse(
    client: httpx.Client,
    path: str,
    *,
    deadline_s: float = 60.0,
    headers: dict[str, str] | None = None,
    on_event: Callable[[dict[str, Any]], bool | None] | None = None,
) -> Sse:
    """Read a job stream until it closes by itself; fail if it outlives ``deadline_s``.

    ``on_event`` may return True to stop reading early (the stream is then left open).
    """
    out = Sse()
    end = time.monotonic() + deadline_s
    parser = sse.Parser()
    with client.stream("GET", path, headers=headers, timeout=deadline_s) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < end, f"stream {path} outlived its {deadline_s}s deadline"
            frame = parser.feed(line)
            out.comments = parser.comments
            if frame is None:
                continue
            if frame.kind is None:
                assert out.sentinel is None, "two sentinels"
                out.sentinel = frame.data
                continue
            current = {"id": frame.id, "event": frame.kind, "data": frame.json()}
            out.events.append(current)
            if on_event and on_event(current):
                return out
        assert out.sentinel is not None, "the stream closed without a sentinel"
    return out


def random_model(hub: Any, size: int, prefix: str = "org/m", *, config: bool = True) -> str:
    """A new repo on the fake hub: a ``config.json`` (unless ``config`` is False) and
    ``size`` random bytes of ``model.bin``; its id, ``<prefix>-<8 hex>``."""
    repo = f"{prefix}-{uuid.uuid4().hex[:8]}"
    files = {"config.json": b"{}"} if config else {}
    hub.add_repo(repo, {**files, "model.bin": os.urandom(size)})
    return repo


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def submit(client: httpx.Client, op: dict[str, Any], **headers: str) -> str:
    response = client.post("/v1/jobs", json=op, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_state(
    client: httpx.Client, job_id: str, *states: str, timeout: float = 30.0
) -> dict[str, Any]:
    return dict(wait_for(lambda: (j := job(client, job_id))["state"] in states and j, timeout))


def outside_address() -> str | None:
    """An IPv4 address of this machine beyond loopback, or None if it has none."""
    import socket

    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


def alive_actors(**match: str) -> list[Any]:
    """The alive actors of the Ray this process is connected to (Ray's state API on its own
    finds every Ray on the machine, and refuses to choose when there are two)."""
    import ray
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE"), *((key, "=", value) for key, value in match.items())]
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    return list(list_actors(address=address, filters=filters))


def pid_of(actor_name: str) -> int:
    """The pid of the alive actor of that name (to ``kill -9`` it)."""
    alive = alive_actors(name=actor_name)
    assert len(alive) == 1, alive
    return int(alive[0].pid)
