"""Typed job events. Actors yield these; only ``serve_app`` turns them into SSE lines."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal


@dataclass(frozen=True, slots=True)
class Narration:
    """A human line about what an actor is doing."""

    kind: ClassVar[str] = "narration"
    actor: str
    action: str
    message: str
    level: Literal["info", "warn"] = "info"
    correlation_id: str | None = None
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress of a whole job; ``file`` is the one in flight."""

    kind: ClassVar[str] = "progress"
    bytes_done: int
    bytes_total: int
    rate_bps: float
    eta_s: float | None
    file: str | None


@dataclass(frozen=True, slots=True)
class Token:
    """A delta of one choice: ``index`` counts that choice's deltas so far. A token of an
    OpenAI request carries its chunk as vLLM's server writes it (``wire``: the endpoint
    sends it as is; it is not part of the job's event)."""

    kind: ClassVar[str] = "token"
    text: str
    index: int
    choice: int = 0
    wire: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Result:
    kind: ClassVar[str] = "result"
    value: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Error:
    kind: ClassVar[str] = "error"
    code: str
    message: str
    retriable: bool = False
    param: str | None = None  #: the request's parameter at fault, when one is


Event = Narration | Progress | Token | Result | Error

EVENT_KINDS = ("narration", "progress", "token", "result", "error")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a job and its per-job ``id`` (1, 2, 3, ...: the SSE ``id:``)."""

    id: int
    event: Event


def payload(event: Event) -> dict[str, Any]:
    """The JSON ``data:`` object of an event."""
    if isinstance(event, Result):
        return dict(event.value)
    if isinstance(event, Token):  # a choice but the first is named (SPEC §4's shape holds)
        token: dict[str, Any] = {"text": event.text, "index": event.index}
        if event.choice:
            token["choice"] = event.choice
        return token
    data = asdict(event)
    if isinstance(event, Error) and event.param is None:
        del data["param"]
    return data


_TYPES: dict[str, type[Any]] = {cls.kind: cls for cls in (Narration, Progress, Token, Error)}


def event_from(kind: str, data: Mapping[str, Any]) -> Event | None:
    """The typed event of a ``kind`` and its ``payload`` (None for a kind not known here;
    fields not known here are ignored, so an older reader takes a newer writer's events)."""
    if kind == Result.kind:
        return Result(dict(data))
    cls = _TYPES.get(kind)
    if cls is None:
        return None
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[no-any-return]
