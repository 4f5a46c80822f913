"""OpenAI requests served by vLLM's own serving layer, in the worker that runs them.

A request is parsed with vLLM's protocol models (``ChatCompletionRequest``,
``CompletionRequest``), rendered by vLLM (content parts, the model's chat template, tools in
the prompt), turned into ``SamplingParams`` by vLLM's own conversion and written out chunk by
chunk as vLLM's server writes it: every parameter vLLM supports works as it does there
(batches of prompts, ``n``, logprobs, penalties, ``stop``, ``seed``, ``response_format``, ...).

rbee adds what a job needs: a key vLLM would accept and ignore is refused with its name
(nothing is accepted and ignored), the request is named by its job, every chunk is also a
``Token`` of its choice, and a cancel ends every sequence of the request (vLLM aborts a
request whose stream is cancelled or closed).
"""

from __future__ import annotations

import asyncio
import functools
import json
import typing
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

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
    ``OpenAIServingCompletion`` and ``ServingTokenization`` on one engine."""

    def __init__(
        self, engine: Any, model: str, model_path: str, tool_call_parser: str | None = None
    ) -> None:
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

    async def run(self, api: Api, body: dict[str, Any], job_id: str) -> AsyncGenerator[Event, None]:
        """The request's events: a ``Token`` per streamed chunk (the chunk in ``wire``), then
        a ``Result`` with each choice's text and the usage (and vLLM's whole response under
        ``openai`` for a request that is not streamed)."""
        from vllm.entrypoints.generate.base.protocol import StreamOptions
        from vllm.entrypoints.serve.utils.api_utils import should_include_usage

        if api == "invocations":
            api = self._invoked(body)
        request = await self.parse(api, body, job_id)
        if getattr(request, "stream", False):
            # The job's result has the usage, asked for by the client or not.
            asked = request.stream_options
            _, continuous = should_include_usage(asked, False)  # as vLLM reads what was asked
            request.stream_options = StreamOptions(
                include_usage=True, continuous_usage_stats=continuous
            )
        answer = await self._apis[api].serve(request, None)
        if not isinstance(answer, AsyncGenerator):
            _raise_if_cancelled()
            yield Result(_summary(_response(answer), api, self.model))
            return
        asked = body.get("stream_options") or {}
        choices: dict[int, _Choice] = {}
        usage: dict[str, Any] | None = None
        usage_chunk: str | None = None
        try:
            async for line in answer:
                data = line.removeprefix("data: ").rstrip("\n")
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _error_of(chunk["error"])
                if not chunk.get("choices"):  # the usage, after every choice's last chunk
                    usage, usage_chunk = chunk.get("usage"), data
                    continue
                # vLLM's server writes one choice per chunk.
                part = chunk["choices"][0]
                choice = choices.setdefault(part["index"], _Choice())
                text = _text_of(part, api)
                choice.finish_reason = part.get("finish_reason") or choice.finish_reason
                choice.text.append(text)
                if not _opens(part, api):
                    choice.tokens += 1
                yield Token(text=text, index=choice.tokens, choice=part["index"], wire=data)
        finally:
            await answer.aclose()
        outputs = [
            {"index": i, "text": "".join(c.text), "finish_reason": c.finish_reason}
            for i, c in sorted(choices.items())
        ]
        result = _result(outputs, usage, self.model)
        if asked.get("include_usage") and usage_chunk is not None:
            result["usage_chunk"] = usage_chunk
        yield Result(result)


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


def _response(answer: Any) -> dict[str, Any]:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(answer, ErrorResponse):
        raise _error_of(answer.error.model_dump())
    whole: dict[str, Any] = answer.model_dump(mode="json")
    return whole


def _summary(whole: dict[str, Any], api: Api, model: str) -> dict[str, Any]:
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
    return {**_result(outputs, whole.get("usage"), model), "openai": whole}


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
