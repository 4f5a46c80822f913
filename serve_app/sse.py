"""The wire format of job events (SPEC §4), both ways: ``id:``, ``event:``, one JSON
``data:`` line per event, a ``data:`` sentinel to close; and OpenAI's streams, ``data:``
lines alone (vLLM's chunks as vLLM wrote them, then ``data: [DONE]``). Every process that
writes SSE writes it here (the ingress, and the worker that writes an OpenAI answer's
bytes itself); the client, the tests and the benchmarks read it here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from actors.core.events import StreamEvent, event_from, payload

KEEPALIVE = ": keep-alive\n\n"
DONE, CANCELLED, ERROR = "[DONE]", "[CANCELLED]", "[ERROR]"


# -- writing ---------------------------------------------------------------------------------
def event(item: StreamEvent) -> str:
    data = json.dumps(payload(item.event), separators=(",", ":"))
    return f"id: {item.id}\nevent: {item.event.kind}\ndata: {data}\n\n"


def frame(id: str, kind: str, data: Any) -> str:
    """A frame of another stream than a job's (the jobs board): its own ids and kind."""
    return f"id: {id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def data(text: str) -> str:
    """One ``data:`` line of OpenAI's streams (``text`` has no newline: a JSON chunk)."""
    return f"data: {text}\n\n"


def data_json(obj: Any) -> str:
    return data(json.dumps(obj, separators=(",", ":")))


DATA_DONE = data(DONE)  #: the end of an OpenAI stream (and of a job's that completed)


def sentinel(state: str, error: dict[str, Any] | None) -> str:
    if state == "completed":
        return DATA_DONE
    if state == "cancelled":
        return f"data: {CANCELLED}\n\n"
    message = (error or {}).get("message", "failed")
    return f"data: {ERROR} {' '.join(str(message).split())}\n\n"


# -- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Frame:
    """One whole event as it came: its ``id:``, ``event:`` and ``data:`` (lines joined)."""

    id: int | None
    kind: str | None  #: None for the closing sentinel
    data: str
    raw_id: str | None = None  #: the ``id:`` as sent (the jobs board's are not numbers)

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True, slots=True)
class End:
    """The closing sentinel: how the job ended, and a failure's message."""

    state: str  #: completed | failed | cancelled
    message: str = ""


class Parser:
    """SSE lines in (without their line ends), whole frames out. A half-received event is
    never dispatched, so a cut connection loses nothing that a resume will not replay."""

    def __init__(self) -> None:
        self.comments = 0  #: keep-alives and other comment lines seen
        self._id: int | None = None
        self._raw_id: str | None = None
        self._kind: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Frame | None:
        if line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if not name:
                self.comments += 1
            elif name == "id":
                self._id = int(value) if value.isdigit() else None
                self._raw_id = value
            elif name == "event":
                self._kind = value
            elif name == "data":
                self._data.append(value)
            return None
        if self._id is None and self._kind is None and not self._data:
            return None  # a blank line after a comment
        frame = Frame(self._id, self._kind, "\n".join(self._data), self._raw_id)
        self._id, self._raw_id, self._kind, self._data = None, None, None, []
        return frame


def end_of(data: str) -> End | None:
    """The sentinel's meaning, or None if ``data`` is not one."""
    if data == DONE:
        return End("completed")
    if data == CANCELLED:
        return End("cancelled")
    if data.startswith(ERROR):
        return End("failed", data.removeprefix(ERROR).strip())
    return None


def typed(frame: Frame) -> StreamEvent | End | None:
    """The frame as an event of ours or the closing sentinel; None for anything else (a
    kind this reader does not know, from a newer server)."""
    if frame.kind is None:
        return end_of(frame.data)
    event = event_from(frame.kind, frame.json())
    if frame.id is None or event is None:
        return None
    return StreamEvent(frame.id, event)
