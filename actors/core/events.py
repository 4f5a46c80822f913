"""Typed job events. Actors yield these; only ``serve_app`` turns them into SSE lines.

Each pickles as its class and its fields in order (``__reduce__``): Ray ships events
between processes by the thousand, and a dataclass's own pickling asks ``fields()`` for
every object it writes (a third of the ingress's CPU went there)."""

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

    def __reduce__(self) -> tuple[Any, ...]:
        return (Narration, (self.actor, self.action, self.message, self.level, self.correlation_id, self.ts))


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress of a whole job; ``file`` is the one in flight."""

    kind: ClassVar[str] = "progress"
    bytes_done: int
    bytes_total: int
    rate_bps: float
    eta_s: float | None
    file: str | None

    def __reduce__(self) -> tuple[Any, ...]:
        return (Progress, (self.bytes_done, self.bytes_total, self.rate_bps, self.eta_s, self.file))


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

    def __reduce__(self) -> tuple[Any, ...]:
        return (Token, (self.text, self.index, self.choice, self.wire))


@dataclass(frozen=True, slots=True)
class Result:
    kind: ClassVar[str] = "result"
    value: dict[str, Any]

    def __reduce__(self) -> tuple[Any, ...]:
        return (Result, (self.value,))


@dataclass(frozen=True, slots=True)
class Error:
    kind: ClassVar[str] = "error"
    code: str
    message: str
    retriable: bool = False
    param: str | None = None  #: the request's parameter at fault, when one is

    def __reduce__(self) -> tuple[Any, ...]:
        return (Error, (self.code, self.message, self.retriable, self.param))


Event = Narration | Progress | Token | Result | Error

EVENT_KINDS = ("narration", "progress", "token", "result", "error")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a job and its per-job ``id`` (1, 2, 3, ...: the SSE ``id:``)."""

    id: int
    event: Event

    def __reduce__(self) -> tuple[Any, ...]:
        return (StreamEvent, (self.id, self.event))


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


Packed = list[Any]
"""A job's events as they travel between processes (``pack``): each run of ``Token``s as
one ``(first_id, texts, indexes, choices)`` tuple of plain lists, the rest as they are.
A generation's hundreds of tokens pickle as a few lists of strings, not as objects."""


def pack(events: list[StreamEvent]) -> Packed:
    out: Packed = []
    run: tuple[int, list[str], list[int], list[int]] | None = None
    for item in events:
        event = item.event
        if isinstance(event, Token):
            if run is None or run[0] + len(run[1]) != item.id:
                run = (item.id, [], [], [])
                out.append(run)
            run[1].append(event.text)
            run[2].append(event.index)
            run[3].append(event.choice)
        else:
            run = None
            out.append(item)
    return out


def unpack(packed: Packed) -> list[StreamEvent]:
    """The events ``pack`` made of them (a token's ``wire`` is not kept: it was the
    answer's, not the job's)."""
    events: list[StreamEvent] = []
    for item in packed:
        if isinstance(item, StreamEvent):
            events.append(item)
            continue
        first, texts, indexes, choices = item
        events += [
            StreamEvent(first + i, Token(text, index, choice))
            for i, (text, index, choice) in enumerate(zip(texts, indexes, choices, strict=True))
        ]
    return events
