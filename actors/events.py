"""Typed job events. Actors yield these; only ``serve_app`` turns them into SSE lines."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
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


def payload(event: Event) -> dict[str, Any]:
    """The JSON ``data:`` object of an event."""
    if isinstance(event, Result):
        return dict(event.value)
    return asdict(event)
