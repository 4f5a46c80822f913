"""OpenAI's Responses API served by vLLM's ``OpenAIServingResponses``, with rbee's job
records as its store.

vLLM keeps every stored response, and the messages that led to it, in dictionaries of its
serving object that only grow. Here nothing stays in them: a request that goes on from an
earlier response (``previous_response_id``) brings that response and its messages from its
job's record, they are put in vLLM's store for the request to read and taken out once it
has, and what the request stores is taken out into its own job's result (``response``,
``messages``, ``input``). The response's id is its job's.
"""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from actors.core.errors import InternalError
from actors.core.events import Event, Result, Token

#: The events that carry a token of the answer (the rest go with the next one, or the tail).
_DELTAS = frozenset({"response.output_text.delta", "response.reasoning_text.delta"})


class Responses:
    """vLLM's Responses serving on one engine, its store kept empty between requests."""

    def __init__(self, engine: Any, models: Any, renderer: Any, chat: dict[str, Any]) -> None:
        from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses

        self._serving = OpenAIServingResponses(engine, models, renderer, **chat)
        # ``store`` honoured (vLLM leaves it off unless an environment variable says so):
        # what it stores is rbee's to keep.
        self._serving.enable_store = True
        self._lent: collections.Counter[str] = collections.Counter()

    @property
    def create(self) -> Callable[..., Awaitable[Any]]:
        return self._serving.create_responses

    def lend(self, previous: dict[str, Any] | None) -> str | None:
        """Put an earlier response and its messages in vLLM's store, for a request that goes
        on from it; its id, to hand back (``give_back``)."""
        if previous is None:
            return None
        from vllm.entrypoints.openai.responses.protocol import ResponsesResponse

        response = ResponsesResponse.model_validate(previous["response"])
        self._serving.response_store[response.id] = response
        if previous.get("messages") is not None:
            self._serving.msg_store[response.id] = previous["messages"]
        self._lent[response.id] += 1
        return response.id

    def give_back(self, lent: str | None) -> None:
        if lent is None:
            return
        self._lent[lent] -= 1
        if self._lent[lent] <= 0:
            del self._lent[lent]
            self._serving.response_store.pop(lent, None)
            self._serving.msg_store.pop(lent, None)

    def take(self, request_id: str) -> dict[str, Any]:
        """What vLLM stored of a request, out of its store: the messages of the conversation
        so far (where the request asked for it to be stored)."""
        self._serving.response_store.pop(request_id, None)
        messages = self._serving.msg_store.pop(request_id, None)
        if messages is None:
            return {}
        return {"messages": json.loads(json.dumps(messages, default=_plain))}


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    raise TypeError(f"not JSON: {type(value).__name__}")


def frame(event: Any) -> tuple[str, str]:
    """One of vLLM's streamed events as its server writes it, and its type."""
    kind = str(getattr(event, "type", "unknown"))
    data = event.model_dump_json(indent=None, by_alias=True)
    return kind, f"event: {kind}\ndata: {data}\n\n"


async def stream(
    answer: AsyncGenerator[Any, None],
    model: str,
    summary: Callable[..., dict[str, Any]],
    *,
    background: bool = False,
) -> AsyncGenerator[Event, None]:
    """vLLM's Responses events as tokens: each text delta is one (its ``wire`` also holds the
    events before it that carry none); the events after the last are the tail, and the
    response the last one (``response.completed``) holds is the result's ``response``.
    ``background``: the response the events carry says so (vLLM streams it as a foreground
    one, for rbee's job runs it)."""
    held: list[str] = []
    text: list[str] = []
    response: dict[str, Any] | None = None
    async for event in answer:
        if background and getattr(event, "response", None) is not None:
            event.response.background = True
        kind, wire = frame(event)
        if kind == "error":
            raise InternalError(str(getattr(event, "message", None) or "the engine failed"))
        if kind in _DELTAS:
            piece = str(getattr(event, "delta", "") or "")
            text.append(piece)
            yield Token(text=piece, index=len(text), wire="".join(held) + wire)
            held.clear()
            continue
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.response.model_dump(mode="json", by_alias=True)
        held.append(wire)
    result = summary(response or {})
    result.pop("answer", None)  # (a stream's is its events)
    yield Result({**result, "tail": "".join(held), "response": response})


def text_of(response: dict[str, Any]) -> str:
    """The text of a response's messages."""
    return "".join(
        part.get("text") or ""
        for item in response.get("output") or []
        if item.get("type") == "message"
        for part in item.get("content") or []
        if part.get("type") == "output_text"
    )
