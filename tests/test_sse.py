"""The SSE module: what the server writes, the client, tests and benchmarks read back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from actors.core.events import Error, Narration, Progress, Result, StreamEvent, Token
from serve_app import sse


def _read(wire: str, parser: sse.Parser | None = None) -> list[object]:
    parser = parser or sse.Parser()
    frames = (parser.feed(line) for line in wire.split("\n"))
    items = (sse.typed(f) for f in frames if f is not None)
    return [item for item in items if item is not None]


EVENTS = [
    Narration("worker", "generate", "generating", correlation_id="cid-1", ts=1.5),
    Progress(10, 100, 5.0, 18.0, "model.safetensors"),
    Token(" hi", 1),
    Result({"text": " hi", "usage": {"completion_tokens": 1}}),
    Error("MODEL_NOT_FOUND", "no such model", retriable=False),
]


def test_every_event_and_sentinel_reads_back_as_written():
    written = [StreamEvent(n, e) for n, e in enumerate(EVENTS, 1)]
    for state, error, end in [
        ("completed", None, sse.End("completed")),
        ("cancelled", None, sse.End("cancelled")),
        ("failed", {"message": "the engine\ndied"}, sse.End("failed", "the engine died")),
    ]:
        wire = sse.KEEPALIVE + "".join(map(sse.event, written)) + sse.sentinel(state, error)
        parser = sse.Parser()
        assert _read(wire, parser) == [*written, end]
        assert parser.comments == 1


def test_a_half_received_event_is_never_dispatched():
    whole = sse.event(StreamEvent(7, Token("x", 7)))
    cut = whole[: whole.index("data:") + 9]  # the connection broke inside the data line
    assert _read(cut) == []


def test_an_unknown_kind_or_an_event_without_an_id_is_skipped():
    wire = 'id: 3\nevent: hologram\ndata: {"x":1}\n\nevent: token\ndata: {"text":"a","index":1}\n\n'
    assert _read(wire) == []
    assert sse.end_of("[SOMETHING]") is None


@given(st.text(), st.integers(min_value=1, max_value=2**53))
def test_any_token_text_survives_the_wire(text, n):
    item = StreamEvent(n, Token(text, n))
    assert _read(sse.event(item)) == [item]
