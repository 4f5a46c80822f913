"""Python client of rbee's HTTP API (SPEC §3-5, §8): ``Client`` and its async twin ``AsyncClient``.

::

    from actors.core.events import Progress
    from serve_app.client.api import Client, operation

    with Client() as rbee:                       # RBEE_URL, else http://127.0.0.1:7835
        job_id = rbee.submit(operation("model_download", model="org/name"))  # returns at once
        for item in rbee.stream(job_id):         # StreamEvent(id, event): typed events
            if isinstance(item.event, Progress):
                print(item.event.bytes_done, "/", item.event.bytes_total)
        # the loop ends on [DONE]; a failed job raises its own error (ModelNotFound,
        # DownloadFailed, ...), a cancelled one JobCancelled; rbee.cancel(job_id) stops it.

``stream`` survives a dropped connection: it reconnects with ``Last-Event-ID`` (a few tries,
with backoff), so no event is lost or repeated. Errors are the server's own classes from
``actors.core.errors``, looked up by the wire ``code``; ``ServerUnavailable`` means nothing
answered. ``RBEE_API_TOKEN`` (or ``token=``) is sent as ``Authorization: Bearer``.

Inside a Ray cluster no HTTP client is needed: ``serve.get_app_handle("rbee")`` offers the
same methods with the same typed events and errors (see ``serve_app.server.deployment``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx

from actors.core.errors import JobCancelled, RbeeError, UnknownError, error_class, error_from
from actors.core.events import Error, Result, StreamEvent, event_from, payload
from serve_app import sse

DEFAULT_URL = "http://127.0.0.1:7835"

_STATUS_CODES = {
    400: "INVALID_JSON",
    401: "UNAUTHORIZED",
    404: "NOT_FOUND",
    413: "BODY_TOO_LARGE",
    422: "INVALID_REQUEST",
}


class ServerUnavailable(RbeeError):
    """Nothing answered at the URL, or a stream kept breaking; trying later may work."""

    code = "UNAVAILABLE"
    retriable = True


ServerError = UnknownError  #: an error whose ``code`` this client has no class for (a newer server)


def to_error(code: str, message: str, retriable: bool | None = None) -> RbeeError:
    """The exception for an error the server reported as ``{"code","message"}``."""
    return error_from(code, message, retriable=retriable)


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code = _STATUS_CODES.get(response.status_code, "INTERNAL")
        message = f"HTTP {response.status_code}: {response.text[:200].strip()}"
    raise to_error(code, message)


def operation(name: str, **fields: Any) -> dict[str, Any]:
    """An operation body for ``submit`` (SPEC §3); fields that are None are left out."""
    return {"operation": name, **{k: v for k, v in fields.items() if v is not None}}


parse_event = event_from
"""The typed event of one SSE ``event:``/``data:`` pair (see ``actors.core.events.event_from``)."""


class _Follow:
    """One ``stream`` call across its connections: the last id seen (the next
    ``Last-Event-ID``), the last error event, and how many attempts in a row broke."""

    def __init__(self, job_id: str, last_event_id: int | None, retries: int) -> None:
        self.job_id, self.last, self.retries = job_id, last_event_id, retries
        self.error: dict[str, Any] | None = None
        self.failures = 0
        self.connected = False
        self._parser = sse.Parser()

    def request(self) -> dict[str, Any]:
        self._parser = sse.Parser()
        headers = {"Last-Event-ID": str(self.last)} if self.last is not None else {}
        return {"method": "GET", "url": f"/v1/jobs/{self.job_id}/stream", "headers": headers}

    def feed(self, line: str) -> StreamEvent | sse.End | None:
        frame = self._parser.feed(line)
        item = sse.typed(frame) if frame is not None else None
        if isinstance(item, StreamEvent):
            self.last, self.failures = item.id, 0
            if isinstance(item.event, Error):
                self.error = payload(item.event)
        return item

    def needs_record(self, end: sse.End) -> bool:
        """A failed job whose error event came before our ``Last-Event-ID``."""
        return end.state == "failed" and self.error is None

    def end(self, end: sse.End) -> None:
        """Return if the job completed; raise its error if it failed or was cancelled."""
        error = self.error or {}
        if end.state == "cancelled":
            raise JobCancelled(error.get("message") or f"job {self.job_id} was cancelled")
        if end.state == "failed":
            if not error:
                raise ServerError(end.message or f"job {self.job_id} failed", code="INTERNAL")
            raise to_error(str(error["code"]), str(error["message"]), error.get("retriable"))

    def broke(self, exc: httpx.TransportError | None, url: str) -> float:
        """Count a broken connection; the seconds to wait before resuming, or raise."""
        if exc is not None and not self.connected:
            raise ServerUnavailable(f"cannot reach rbee at {url}: {exc}") from exc
        self.failures += 1
        if self.failures > self.retries:
            why = exc or "it closed without its sentinel"
            raise ServerUnavailable(
                f"the stream of {self.job_id} broke {self.failures} times: {why}"
            )
        return float(min(2.0, 0.1 * 2**self.failures))


class _Base:
    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        stream_read_timeout: float = 60.0,
        retries: int = 5,
    ) -> None:
        self.url = (url or os.environ.get("RBEE_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("RBEE_API_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = httpx.Timeout(timeout)
        self._stream_timeout = httpx.Timeout(timeout, read=stream_read_timeout)
        self.retries = retries
        # TLS checked for every scheme but plain HTTP, where httpx would only build a TLS
        # context it never uses (~28 ms of CPU for each client, a CLI command's whole start).
        self._verify = urlsplit(self.url).scheme.lower() != "http"

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """httpx's transport errors become ``ServerUnavailable`` here, at the border."""
        try:
            yield
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"cannot reach rbee at {self.url}: {exc}") from exc

    @staticmethod
    def _jobs_query(state: str | None, op: str | None, limit: int | None) -> dict[str, Any]:
        return {k: v for k, v in {"state": state, "operation": op, "limit": limit}.items() if v}

    @staticmethod
    def _cid(correlation_id: str | None) -> dict[str, str]:
        return {"X-Correlation-Id": correlation_id} if correlation_id else {}


class Client(_Base):
    """A blocking client; ``transport`` is httpx's seam (``httpx.MockTransport`` in tests)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        self._http = httpx.Client(
            base_url=self.url,
            headers=self._headers,
            timeout=self._timeout,
            transport=transport,
            verify=self._verify,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._reaching():
            response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/health"))

    def submit(self, op: Mapping[str, Any], *, correlation_id: str | None = None) -> str:
        """Start a job (SPEC §3) and return its id at once; the job runs without a watcher."""
        body = self._call("POST", "/v1/jobs", json=dict(op), headers=self._cid(correlation_id))
        return str(body["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/jobs/{job_id}"))

    def jobs(
        self, *, state: str | None = None, operation: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Jobs, newest first."""
        params = self._jobs_query(state, operation, limit)
        return list(self._call("GET", "/v1/jobs", params=params)["jobs"])

    def cancel(self, job_id: str, *, wait: bool = False) -> None:
        """Ask for the cancel and return at once; ``wait=True`` returns once the job is
        ``cancelled`` and raises ``JobFinished``/``JobNotFound`` if there was nothing to stop."""
        if wait:
            self._call("DELETE", f"/v1/jobs/{job_id}")
        else:
            self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def stream(self, job_id: str, last_event_id: int | None = None) -> Iterator[StreamEvent]:
        """The job's events after ``last_event_id``, live, until it ends: returns on
        ``[DONE]``, raises the job's error on ``[ERROR]`` and ``JobCancelled`` on
        ``[CANCELLED]``. A dropped connection is resumed with ``Last-Event-ID``."""
        follow = _Follow(job_id, last_event_id, self.retries)
        while True:
            broke: httpx.TransportError | None = None
            try:
                with self._http.stream(
                    **follow.request(), timeout=self._stream_timeout
                ) as response:
                    if not response.is_success:
                        response.read()
                        _raise_for(response)
                    follow.connected = True
                    for line in response.iter_lines():
                        item = follow.feed(line)
                        if isinstance(item, StreamEvent):
                            yield item
                        elif item is not None:
                            if follow.needs_record(item):
                                follow.error = self.job(job_id)["error"]
                            follow.end(item)
                            return
            except httpx.TransportError as exc:
                broke = exc
            time.sleep(follow.broke(broke, self.url))

    def run(
        self, op: Mapping[str, Any], on_event: Callable[[StreamEvent], None] | None = None
    ) -> dict[str, Any]:
        """Submit ``op``, follow it to the end and return its result object."""
        result: dict[str, Any] = {}
        for item in self.stream(self.submit(op)):
            if isinstance(item.event, Result):
                result = item.event.value
            if on_event is not None:
                on_event(item)
        return result

    def download(
        self, model: str, on_event: Callable[[StreamEvent], None] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Download ``model`` (``revision``, ``files``, ``vendor``, ``url``, ``hive_id``)."""
        return self.run(operation("model_download", model=model, **fields), on_event)

    def infer(
        self, prompt: str, on_event: Callable[[StreamEvent], None] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Run ``prompt`` (``model``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
        ...); ``on_event`` sees each ``Token`` as it arrives."""
        return self.run(operation("infer", prompt=prompt, **fields), on_event)


class AsyncClient(_Base):
    """The async twin of ``Client``: the same methods, awaited (``stream`` is ``async for``)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers,
            timeout=self._timeout,
            transport=transport,
            verify=self._verify,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._reaching():
            response = await self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    async def health(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/health"))

    async def submit(self, op: Mapping[str, Any], *, correlation_id: str | None = None) -> str:
        headers = self._cid(correlation_id)
        body = await self._call("POST", "/v1/jobs", json=dict(op), headers=headers)
        return str(body["job_id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/v1/jobs/{job_id}"))

    async def jobs(
        self, *, state: str | None = None, operation: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        params = self._jobs_query(state, operation, limit)
        return list((await self._call("GET", "/v1/jobs", params=params))["jobs"])

    async def cancel(self, job_id: str, *, wait: bool = False) -> None:
        if wait:
            await self._call("DELETE", f"/v1/jobs/{job_id}")
        else:
            await self._call("POST", f"/v1/jobs/{job_id}/cancel")

    async def stream(
        self, job_id: str, last_event_id: int | None = None
    ) -> AsyncIterator[StreamEvent]:
        follow = _Follow(job_id, last_event_id, self.retries)
        while True:
            broke: httpx.TransportError | None = None
            try:
                async with self._http.stream(
                    **follow.request(), timeout=self._stream_timeout
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        _raise_for(response)
                    follow.connected = True
                    async for line in response.aiter_lines():
                        item = follow.feed(line)
                        if isinstance(item, StreamEvent):
                            yield item
                        elif item is not None:
                            if follow.needs_record(item):
                                follow.error = (await self.job(job_id))["error"]
                            follow.end(item)
                            return
            except httpx.TransportError as exc:
                broke = exc
            await asyncio.sleep(follow.broke(broke, self.url))

    async def run(
        self, op: Mapping[str, Any], on_event: Callable[[StreamEvent], None] | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        async for item in self.stream(await self.submit(op)):
            if isinstance(item.event, Result):
                result = item.event.value
            if on_event is not None:
                on_event(item)
        return result

    async def download(
        self, model: str, on_event: Callable[[StreamEvent], None] | None = None, **fields: Any
    ) -> dict[str, Any]:
        return await self.run(operation("model_download", model=model, **fields), on_event)

    async def infer(
        self, prompt: str, on_event: Callable[[StreamEvent], None] | None = None, **fields: Any
    ) -> dict[str, Any]:
        return await self.run(operation("infer", prompt=prompt, **fields), on_event)


__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "Client",
    "ServerError",
    "ServerUnavailable",
    "StreamEvent",
    "error_class",
    "operation",
    "parse_event",
    "to_error",
]
