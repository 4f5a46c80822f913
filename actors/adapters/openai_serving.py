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
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from actors.core.errors import InternalError, InvalidRequest, ModelNotFound, RbeeError
from actors.core.events import Event, Result, Token

Api = Literal["chat", "completions"]

#: Keys vLLM's models take but the generation routes ignore (they serve its render routes).
_IGNORED_BY_VLLM = frozenset({"return_token_offsets", "mm_payload", "return_mm_kwargs"})
#: Keys rbee sets itself: the request is named by its job.
_RBEE_OWNS = frozenset({"request_id"})


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None


class OpenAiServing:
    """vLLM's ``OpenAIServingChat`` and ``OpenAIServingCompletion`` on one engine."""

    def __init__(
        self, engine: Any, model: str, model_path: str, tool_call_parser: str | None = None
    ) -> None:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer

        self.model = model
        models = OpenAIServingModels(
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
        self._chat = OpenAIServingChat(
            engine, models, "assistant", online_renderer=renderer, **chat
        )
        self._completion = OpenAIServingCompletion(
            engine, models, online_renderer=renderer, request_logger=None
        )

    def parse(self, api: Api, body: dict[str, Any], job_id: str) -> Any:
        """vLLM's request model of ``body``; a key it does not read, or reads and ignores,
        is refused by name."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        model = ChatCompletionRequest if api == "chat" else CompletionRequest
        known = _keys_of(model)
        for key in sorted(body):
            if key in _RBEE_OWNS:
                raise InvalidRequest(f"{key}: rbee names each request by its job id", param=key)
            if key not in known or key in _IGNORED_BY_VLLM:
                raise InvalidRequest(f"{key}: not a parameter this server honours", param=key)
        if body.get("model") != self.model:
            raise ModelNotFound(f"the model {body.get('model')!r} does not exist")
        try:
            return model.model_validate({**body, "request_id": job_id})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            message = str(first["msg"]).removeprefix("Value error, ")
            raise InvalidRequest(f"{where}: {message}" if where else message, param=where) from None

    async def run(self, api: Api, body: dict[str, Any], job_id: str) -> AsyncGenerator[Event, None]:
        """The request's events: a ``Token`` per streamed chunk (the chunk in ``wire``), then
        a ``Result`` with each choice's text and the usage (and vLLM's whole response under
        ``openai`` for a request that is not streamed)."""
        from vllm.entrypoints.generate.base.protocol import StreamOptions

        request = self.parse(api, body, job_id)
        asked = request.stream_options
        if request.stream:  # the job's result has the usage, asked for by the client or not
            continuous = bool(asked and asked.continuous_usage_stats)
            request.stream_options = StreamOptions(
                include_usage=True, continuous_usage_stats=continuous
            )
        serve = (
            self._chat.create_chat_completion
            if api == "chat"
            else self._completion.create_completion
        )
        answer = await serve(request, None)
        if not isinstance(answer, AsyncGenerator):
            _raise_if_cancelled()
            yield Result(_summary(_response(answer), api, self.model))
            return
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
        if asked is not None and asked.include_usage and usage_chunk is not None:
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
    if status == 404:
        return ModelNotFound(message)
    if isinstance(status, int) and 400 <= status < 500:
        return InvalidRequest(message, param=param if isinstance(param, str) else None)
    return InternalError(message)


def _raise_if_cancelled() -> None:
    """vLLM answers a cancelled request that is not streamed with an error response rather
    than the ``CancelledError``: put it back."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@functools.cache
def _keys_of(model: type[BaseModel]) -> frozenset[str]:
    """The keys a request model reads: its fields and their aliases (worked out once)."""
    fields = model.model_fields
    return frozenset(fields) | {f.alias for f in fields.values() if f.alias is not None}
