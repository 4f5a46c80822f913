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
    kind: ClassVar[str] = "token"
    text: str
    index: int


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
    return asdict(event)


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
