"""OpenAI (and Anthropic) requests served by vLLM's own serving layer, in the worker that
runs them.

A request is parsed with vLLM's protocol models (``ChatCompletionRequest``,
``CompletionRequest``), rendered by vLLM (content parts, the model's chat template, tools in
the prompt), turned into ``SamplingParams`` by vLLM's own conversion and written out chunk by
chunk as vLLM's server writes it: every parameter vLLM supports works as it does there
(batches of prompts, ``n``, logprobs, penalties, ``stop``, ``seed``, ``response_format``, ...).

Anthropic's Messages go through vLLM's ``AnthropicServingMessages`` the same way: its
conversion to a chat request, its events (``event: ...`` frames, no ``[DONE]``).

rbee adds what a job needs: a key vLLM would accept and ignore is refused with its name
(nothing is accepted and ignored), the request is named by its job, every token is also a
``Token`` of its choice (its ``wire``: the frames up to it, as vLLM's server writes them;
the ``Result``'s ``tail``: the frames after the last), and a cancel ends every sequence of
the request (vLLM aborts a request whose stream is cancelled or closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import typing
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from actors.adapters import responses
from actors.core.errors import InternalError, InvalidRequest, ModelNotFound, RbeeError
from actors.core.events import Event, Result, Token
from actors.core.operations import OpenAiApi

Api = OpenAiApi

#: Keys vLLM's models take but the generation routes ignore (they serve its render routes).
_IGNORED_BY_VLLM = frozenset({"return_token_offsets", "mm_payload", "return_mm_kwargs"})
#: What ``/invocations`` serves, first first.
_INVOKED: tuple[Api, ...] = ("chat", "completions")
#: Keys rbee sets itself: the request is named by its job.
_RBEE_OWNS = frozenset({"request_id"})
#: The routes of Anthropic's API: answered in its shape.
ANTHROPIC: frozenset[Api] = frozenset({"messages", "count_tokens"})


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None


@dataclass(frozen=True)
class _Api:
    """One of vLLM's routes: the type its body is read as, the keys that type reads, and the
    serving method that answers it."""

    name: str  #: the type's
    reads: TypeAdapter[Any]
    keys: frozenset[str]
    serve: Callable[..., Awaitable[Any]]

    @classmethod
    def of(cls, reads: Any, serve: Callable[..., Awaitable[Any]]) -> _Api:
        name = reads.__name__ if isinstance(reads, type) else str(reads)
        return cls(name, TypeAdapter(reads), _keys_of(reads), serve)


class OpenAiServing:
    """vLLM's ``OpenAIServingChatBatch`` (its chat serving, batches of chats too),
    ``OpenAIServingCompletion``, ``ServingTokenization`` and ``AnthropicServingMessages``
    on one engine."""

    def __init__(
        self, engine: Any, model: str, model_path: str, tool_call_parser: str | None = None
    ) -> None:
        from vllm.entrypoints.anthropic.protocol import (
            AnthropicCountTokensRequest,
            AnthropicMessagesRequest,
        )
        from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
        from vllm.entrypoints.openai.chat_completion.batch_serving import (
            OpenAIServingChatBatch,
        )
        from vllm.entrypoints.openai.chat_completion.protocol import (
            BatchChatCompletionRequest,
            ChatCompletionRequest,
        )
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
        from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
        from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
        from vllm.renderers.online_renderer import OnlineRenderer

        self.model = model
        self._models = models = OpenAIServingModels(
            engine_client=engine,
            base_model_paths=[BaseModelPath(name=model, model_path=model_path)],
        )
        # vLLM's server defaults: the model's own template, its content format detected,
        # tool calls parsed where a parser is set for the model.
        chat: dict[str, Any] = {
            "request_logger": None,
            "chat_template": None,
            "chat_template_content_format": "auto",
            "enable_auto_tools": tool_call_parser is not None,
            "tool_parser": tool_call_parser,
        }
        renderer = OnlineRenderer(engine.model_config, engine.renderer, **chat)
        chats = OpenAIServingChatBatch(
            engine, models, "assistant", online_renderer=renderer, **chat
        )
        completions = OpenAIServingCompletion(
            engine, models, online_renderer=renderer, request_logger=None
        )
        messages = AnthropicServingMessages(
            engine, models, "assistant", online_renderer=renderer, **chat
        )
        self._responses = responses.Responses(engine, models, renderer, chat)
        tokens = ServingTokenization(
            models,
            renderer,
            chat_template=None,
            chat_template_content_format="auto",
            request_logger=None,
        )
        self._apis: dict[Api, _Api] = {
            "chat": _Api.of(ChatCompletionRequest, chats.create_chat_completion),
            "chat_batch": _Api.of(BatchChatCompletionRequest, chats.create_batch_chat_completion),
            "completions": _Api.of(CompletionRequest, completions.create_completion),
            "tokenize": _Api.of(TokenizeRequest, tokens.create_tokenize),
            "detokenize": _Api.of(DetokenizeRequest, tokens.create_detokenize),
            "messages": _Api.of(AnthropicMessagesRequest, messages.create_messages),
            "count_tokens": _Api.of(AnthropicCountTokensRequest, messages.count_tokens),
            "responses": _Api.of(ResponsesRequest, self._responses.create),
        }

    async def parse(self, api: Api, body: dict[str, Any], job_id: str) -> Any:
        """vLLM's request model of ``body``, refused as vLLM's server refuses it (its
        validation handler's message and parameter); a key it does not read, or reads and
        ignores, is refused by name."""
        reads = self._apis[api]
        for key in sorted(body):
            if key in _RBEE_OWNS:
                raise InvalidRequest(f"{key}: rbee names each request by its job id", param=key)
            if key not in reads.keys or key in _IGNORED_BY_VLLM:
                raise InvalidRequest(f"{key}: not a parameter this server honours", param=key)
        if (unknown := await self._models.registry.check_model(body.get("model"))) is not None:
            raise _error_of(unknown.error.model_dump())
        try:
            request = reads.reads.validate_python(body)
        except ValidationError as exc:
            raise await _refusal(exc) from None
        if hasattr(request, "request_id"):
            request.request_id = job_id
        return request

    def _invoked(self, body: dict[str, Any]) -> Api:
        """What SageMaker's ``/invocations`` serves ``body`` as: the first of a chat and a
        completion it reads as, as vLLM's server picks."""
        for api in _INVOKED:
            try:
                self._apis[api].reads.validate_python(body)
            except ValidationError:
                continue
            return api
        names = [self._apis[api].name for api in _INVOKED]
        raise InvalidRequest(f"Cannot find suitable handler for request. Expected one of: {names}")

    async def run(
        self,
        api: Api,
        body: dict[str, Any],
        job_id: str,
        previous: dict[str, Any] | None = None,
    ) -> AsyncGenerator[Event, None]:
        """The request's events: a ``Token`` per streamed token (the frames up to it in
        ``wire``), then a ``Result`` with each choice's text and the usage, and the frames
        after the last token (``tail``); or, for a request that is not streamed, vLLM's
        whole answer (``answer``). A response (of the Responses API) goes on from
        ``previous`` (that response and its messages), and its result keeps what it stores
        (``actors.adapters.responses``)."""
        from vllm.entrypoints.generate.base.protocol import StreamOptions
        from vllm.entrypoints.serve.utils.api_utils import should_include_usage

        if api == "invocations":
            api = self._invoked(body)
        request = await self.parse(api, body, job_id)
        if getattr(request, "stream", False) and hasattr(request, "stream_options"):
            # The job's result has the usage, asked for by the client or not.
            asked = request.stream_options
            _, continuous = should_include_usage(asked, False)  # as vLLM reads what was asked
            request.stream_options = StreamOptions(
                include_usage=True, continuous_usage_stats=continuous
            )
        background = api == "responses" and bool(request.background)
        if background:  # rbee's job runs it: vLLM streams it, for its events to be replayed
            request.background, request.stream = False, True
        lent = self._responses.lend(previous) if api == "responses" else None
        try:
            answer = await self._apis[api].serve(request, None)
        finally:
            self._responses.give_back(lent)
        if not isinstance(answer, AsyncGenerator):
            _raise_if_cancelled()
            summary = _summary(_response(answer, api), api, self.model)
            yield Result({**summary, **self._kept(api, body, job_id)})
            return
        try:
            if api == "responses":
                summarize = functools.partial(_summary, api=api, model=self.model)
                events = responses.stream(answer, self.model, summarize, background=background)
            elif api in ANTHROPIC:
                events = _anthropic_stream(answer, self.model)
            else:
                usage_asked = bool((body.get("stream_options") or {}).get("include_usage"))
                events = _openai_stream(answer, api, self.model, usage_asked)
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Result):
                        event = Result({**event.value, **self._kept(api, body, job_id)})
                    yield event
        finally:
            await answer.aclose()
            if api == "responses":
                self._responses.take(job_id)

    def _kept(self, api: Api, body: dict[str, Any], job_id: str) -> dict[str, Any]:
        """What a job's result keeps of a response for the Responses API to read back: its
        input, whether it is stored, and the messages it goes on from."""
        if api != "responses":
            return {}
        stored = body.get("store") is not False
        return {"input": body.get("input"), "stored": stored, **self._responses.take(job_id)}


async def _openai_stream(
    answer: AsyncGenerator[str, None], api: Api, model: str, usage_asked: bool
) -> AsyncGenerator[Event, None]:
    """vLLM's chunks (``data: ...`` lines) as tokens of their choices; the usage chunk (sent
    on only if the client asked for it) and ``[DONE]`` are the tail."""
    choices: dict[int, _Choice] = {}
    usage: dict[str, Any] | None = None
    tail: list[str] = []
    async for line in answer:
        data = line.removeprefix("data: ").rstrip("\n")
        if data == "[DONE]":
            tail.append(line)
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise _error_of(chunk["error"])
        if not chunk.get("choices"):  # the usage, after every choice's last chunk
            usage = chunk.get("usage")
            tail += [line] if usage_asked else []
            continue
        # vLLM's server writes one choice per chunk.
        part = chunk["choices"][0]
        choice = choices.setdefault(part["index"], _Choice())
        text = _text_of(part, api)
        choice.finish_reason = part.get("finish_reason") or choice.finish_reason
        choice.text.append(text)
        if not _opens(part, api):
            choice.tokens += 1
        yield Token(text=text, index=choice.tokens, choice=part["index"], wire=line)
    outputs = [
        {"index": i, "text": "".join(c.text), "finish_reason": c.finish_reason}
        for i, c in sorted(choices.items())
    ]
    yield Result({**_result(outputs, usage, model), "tail": "".join(tail)})


async def _anthropic_stream(
    answer: AsyncGenerator[str, None], model: str
) -> AsyncGenerator[Event, None]:
    """vLLM's Anthropic events as tokens: each delta of a content block is one (its
    ``wire`` also holds the events before it that carry none: the message's start, a
    block's start and stop); the events after the last delta are the tail."""
    held: list[str] = []
    text: list[str] = []
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None
    async for frame in answer:
        kind, data = _event_of(frame)
        if kind == "error":
            error = data.get("error") or {}
            raise InternalError(str(error.get("message") or "the engine failed"))
        delta = data.get("delta") or {}
        if kind == "content_block_delta" and delta.get("type") != "signature_delta":
            piece = str(delta.get("text") or delta.get("thinking") or "")
            text.append(piece)
            yield Token(text=piece, index=len(text), wire="".join(held) + frame)
            held.clear()
            continue
        if kind == "message_delta":
            stop_reason, usage = delta.get("stop_reason"), data.get("usage")
        held.append(frame)
    outputs = [{"index": 0, "text": "".join(text), "finish_reason": stop_reason}]
    yield Result({**_result(outputs, usage, model), "tail": "".join(held)})


def _event_of(frame: str) -> tuple[str, dict[str, Any]]:
    """The name and data of one of vLLM's ``event: name\\ndata: json\\n\\n`` frames."""
    head, _, rest = frame.partition("\n")
    data = rest.strip().removeprefix("data:").strip()
    return head.removeprefix("event:").strip(), json.loads(data) if data else {}


def _text_of(part: dict[str, Any], api: Api) -> str:
    if api == "completions":
        return str(part.get("text") or "")
    delta = part.get("delta") or {}
    return str(delta.get("content") or delta.get("reasoning_content") or "")


def _opens(part: dict[str, Any], api: Api) -> bool:
    """Whether a chunk is a chat's opening one, which names the role and holds no token."""
    delta = part.get("delta") or {}
    return api == "chat" and "role" in delta and not delta.get("content")


def _result(outputs: list[dict[str, Any]], usage: Any, model: str) -> dict[str, Any]:
    first = outputs[0] if outputs else {"text": "", "finish_reason": None}
    return {
        "text": first["text"],
        "finish_reason": first["finish_reason"],
        "choices": outputs,
        "usage": usage,
        "model": model,
    }


def _response(answer: Any, api: Api) -> dict[str, Any]:
    """vLLM's answer as its server writes it (the Anthropic routes leave out what is None)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(answer, ErrorResponse):
        raise _error_of(answer.error.model_dump())
    if api == "responses":  # (as vLLM's server writes it: by the fields' aliases)
        return dict(answer.model_dump(mode="json", by_alias=True))
    whole: dict[str, Any] = answer.model_dump(mode="json", exclude_none=api in ANTHROPIC)
    return whole


def _summary(whole: dict[str, Any], api: Api, model: str) -> dict[str, Any]:
    if api == "responses":
        outputs = [
            {"index": 0, "text": responses.text_of(whole), "finish_reason": whole.get("status")}
        ]
        return {**_result(outputs, whole.get("usage"), model), "answer": whole}
    if api in ANTHROPIC:
        blocks = whole.get("content") or []
        said = "".join(b.get("text") or "" for b in blocks if b.get("type") == "text")
        outputs = [{"index": 0, "text": said, "finish_reason": whole.get("stop_reason")}]
        return {**_result(outputs, whole.get("usage"), model), "answer": whole}
    outputs = []
    for choice in whole.get("choices", []):
        if api == "completions":
            text = choice.get("text")
        else:
            text = (choice.get("message") or {}).get("content")
        outputs.append(
            {
                "index": choice["index"],
                "text": text or "",
                "finish_reason": choice.get("finish_reason"),
            }
        )
    return {**_result(outputs, whole.get("usage"), model), "answer": whole}


def _error_of(error: dict[str, Any]) -> RbeeError:
    """vLLM's error object as rbee's: a 4xx is the caller's (with the parameter it names)."""
    message = str(error.get("message") or "the engine refused the request")
    status, param = error.get("code"), error.get("param")
    param = param if isinstance(param, str) else None
    if status == 404:
        return ModelNotFound(message, param=param)
    if isinstance(status, int) and 400 <= status < 500:
        return InvalidRequest(message, param=param)
    return InternalError(message)


async def _refusal(exc: ValidationError) -> InvalidRequest:
    """What vLLM's server answers a body its request model refuses: FastAPI hands vLLM's
    validation handler the errors under ``body``, and the handler writes the message and
    names the parameter."""
    from fastapi.exceptions import RequestValidationError
    from vllm.entrypoints.serve.exception_handling.handlers.validation import (
        validation_exception_handler,
    )

    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    args = SimpleNamespace(log_error_stack=False)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(args=args)))
    answer = await validation_exception_handler(request, RequestValidationError(errors))  # type: ignore[arg-type]
    error = json.loads(bytes(answer.body))["error"]
    return InvalidRequest(error["message"], param=error.get("param"))


def _raise_if_cancelled() -> None:
    """vLLM answers a cancelled request that is not streamed with an error response rather
    than the ``CancelledError``: put it back."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@functools.cache
def _keys_of(reads: Any) -> frozenset[str]:
    """The keys a request type reads (a model, or a union of models): their fields and the
    fields' aliases (worked out once)."""
    if not (isinstance(reads, type) and issubclass(reads, BaseModel)):
        return frozenset().union(*(_keys_of(each) for each in typing.get_args(reads)))
    fields = reads.model_fields
    return frozenset(fields) | {f.alias for f in fields.values() if f.alias is not None}
