"""OpenAI-compatible inference (SPEC §6): every request is an ``infer`` job (``X-Job-Id``),
cancellable like any job; a client that disconnects aborts its generation."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from actors.core.errors import InvalidRequest, RbeeError
from actors.core.events import Error, Result, StreamEvent, Token
from serve_app.server.jobstream import JobStream

log = logging.getLogger("rbee.openai")

Kind = Literal["text_completion", "chat.completion"]


class _Request(BaseModel):
    # OpenAI clients send fields we don't use (user, logprobs, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extra field: go on past end-of-text
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class OpenAi:
    def __init__(self, jobs: JobStream) -> None:
        self._jobs = jobs

    def routes(self, guard: Any) -> list[Route]:
        return [
            Route("/v1/models", guard(self.models), methods=["GET"]),
            Route("/v1/completions", guard(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", guard(self.chat), methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        models = await self._jobs.models()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "rbee"} for m in models]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        body = _parse(CompletionRequest, await self._jobs.read_json(request))
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt[:1])
        return await self._run(request, body, {"prompt": prompt}, "text_completion")

    async def chat(self, request: Request) -> Response:
        body = _parse(ChatRequest, await self._jobs.read_json(request))
        messages = [m.model_dump() for m in body.messages]
        return await self._run(request, body, {"messages": messages}, "chat.completion")

    async def _run(
        self, request: Request, body: _Request, what: dict[str, Any], kind: Kind
    ) -> Response:
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        op = {
            "operation": "infer",
            "model": body.model,
            "max_tokens": body.max_completion_tokens or body.max_tokens or 256,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed,
            "stop": stop,
            "ignore_eos": body.ignore_eos or None,
            **what,
        }
        job_id = await self._submit(request, {k: v for k, v in op.items() if v is not None})
        headers = {"X-Job-Id": job_id}
        chunks = _Chunks(kind, job_id, body.model)
        if body.stream:
            return _JobStreamResponse(self._jobs, job_id, self._stream(job_id, chunks), headers)
        result = await self._result_while_connected(request, job_id)
        if result is None:
            return Response(status_code=499)  # nobody is left to read it
        return JSONResponse(chunks.whole(result), headers=headers)

    async def _result_while_connected(self, request: Request, job_id: str) -> Any:
        """The job's result, or None once the client has gone; the job is cancelled on any
        way out but its own end.

        Serve cancels a request whose client left, and Ray then cancels the calls the
        request had made, but a cancel can also miss the app: so the app watches its own
        ``receive`` for the disconnect too, as a streamed response does.
        """
        result = asyncio.ensure_future(self._jobs.result(job_id))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        ended = False
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                log.info("client of %s gone before the job ended: cancelling it", job_id)
                return None
            try:
                value = result.result()
            except RbeeError:
                ended = True  # the job's own error: it has ended
                raise
            ended = True
            return value
        finally:
            gone.cancel()
            result.cancel()
            if not ended:
                self._jobs.cancel_soon(job_id)

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
            self._jobs.cancel_soon(submitted.result())

    async def _stream(self, job_id: str, chunks: _Chunks) -> AsyncIterator[str]:
        yield _sse(chunks.first())
        async for batch in self._jobs.follow(job_id):
            out = []
            for item in batch:
                if not isinstance(item, StreamEvent):
                    continue
                event = item.event
                if isinstance(event, Token):
                    out.append(chunks.delta_sse(event.text))
                elif isinstance(event, Result):
                    usage = event.value.get("usage")
                    out.append(_sse(chunks.last(event.value.get("finish_reason"), usage)))
                elif isinstance(event, Error):
                    out.append(_sse({"error": {"code": event.code, "message": event.message}}))
            if out:
                yield "".join(out)
        yield "data: [DONE]\n\n"


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
                self._jobs.cancel_soon(self._job_id)
            for iterator in (self.body_iterator, self._body):
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await asyncio.shield(aclose())


class _Chunks:
    """OpenAI's wire objects for one job."""

    def __init__(self, kind: Kind, job_id: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + job_id.removeprefix(
            "job-"
        )
        self.created = int(time.time())
        # A token's chunk is the same but for its text: made once, the text put in each time.
        mark = json.dumps("\x00")  # the text comes last: its rightmost occurrence
        self._delta_head, _, self._delta_tail = _sse(self.delta("\x00")).rpartition(mark)

    def _chunk(self, choice: dict[str, Any], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {
            "id": self.id, "object": obj, "created": self.created, "model": self.model,
            "choices": [{"index": 0, **choice}], **extra,
        }  # fmt: skip

    def first(self) -> dict[str, Any]:
        if self.kind == "chat.completion":
            return self._chunk(
                {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            )
        return self._chunk({"text": "", "finish_reason": None})

    def delta(self, text: str) -> dict[str, Any]:
        if self.kind == "chat.completion":
            return self._chunk({"delta": {"content": text}, "finish_reason": None})
        return self._chunk({"text": text, "finish_reason": None})

    def delta_sse(self, text: str) -> str:
        """``_sse(self.delta(text))``, without building and encoding the whole chunk again."""
        return self._delta_head + json.dumps(text) + self._delta_tail

    def last(self, finish: str | None, usage: dict[str, int] | None) -> dict[str, Any]:
        empty: dict[str, Any] = {"delta": {}} if self.kind == "chat.completion" else {"text": ""}
        return self._chunk({**empty, "finish_reason": finish or "stop"}, usage=usage)

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        text, finish = result.get("text", ""), result.get("finish_reason") or "stop"
        if self.kind == "chat.completion":
            choice = {"message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"text": text, "finish_reason": finish, "logprobs": None}
        return {
            "id": self.id, "object": self.kind, "created": self.created, "model": self.model,
            "choices": [{"index": 0, **choice}], "usage": result.get("usage"),
        }  # fmt: skip


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _parse(model: type[_Request], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}") from None


__all__ = ["OpenAi", "RbeeError"]
