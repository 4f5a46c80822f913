"""The worker's answer connection (``actors.core.pipe``), end to end on loopback sockets:
bytes as written, the end, a cancel, a fault, a worker that dies, a stranger without the
secret, and an ingress that goes away (the answer stops)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors.core import pipe
from actors.core.events import StreamEvent, Token
from actors.core.running import Ended
from actors.core.table import JobState

DEADLINE_S = 10


class Worker:
    """An answer that yields what ``chunks`` says, and tells what became of it."""

    def __init__(self, chunks: list[bytes], *, then: str = "end", pause_s: float = 0.0) -> None:
        self.chunks, self.then, self.pause_s = chunks, then, pause_s
        self.asked: list[tuple[str, Any, str | None]] = []
        self.closed = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        self.server = pipe.Server(self.answer)

    async def answer(self, job_id: str, op: Any, cid: str | None) -> AsyncIterator[bytes | Ended]:
        self.asked.append((job_id, op, cid))
        self.task = asyncio.current_task()
        try:
            for chunk in self.chunks:
                yield chunk
                await asyncio.sleep(self.pause_s)
            if self.then == "fault":
                raise RuntimeError("a fault in the answer")
            if self.then == "hang":
                await asyncio.Event().wait()
            ended = Ended(events=[StreamEvent(1, Token("x", 0))], state=JobState.COMPLETED)
            ended.tail = b"data: [DONE]\n\n"
            yield ended
        finally:
            self.closed.set()


async def _read_all(call: pipe.Call) -> list[bytes | Ended]:
    return [item async for item in call.items()]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, DEADLINE_S))


def test_bytes_go_through_as_written_then_the_end():
    chunks = [b"data: {\"a\": 1}\n\n", b"x" * 100_000, b""]

    async def scenario() -> None:
        worker = Worker(chunks)
        address = await worker.server.start("127.0.0.1")
        call = await pipe.Call.open(address, "job-1", {"op": 1}, "cid-1")
        items = await _read_all(call)
        assert items[:-1] == chunks
        ended = items[-1]
        assert isinstance(ended, Ended) and ended.state is JobState.COMPLETED
        assert ended.tail == b"data: [DONE]\n\n" and ended.packed is not None
        assert worker.asked == [("job-1", {"op": 1}, "cid-1")]
        worker.server.close()

    run(scenario())


def test_a_cancel_at_the_worker_is_cancelled_at_the_ingress():
    async def scenario() -> None:
        worker = Worker([b"a"], then="hang")
        address = await worker.server.start("127.0.0.1")
        call = await pipe.Call.open(address, "job-1", None, None)
        items = call.items()
        assert await anext(items) == b"a"
        while worker.task is None:
            await asyncio.sleep(0.01)
        worker.task.cancel()  # what Runs.cancel does to the task that iterates the run
        with pytest.raises(pipe.Cancelled):
            await anext(items)
        await asyncio.wait_for(worker.closed.wait(), 1)
        worker.server.close()

    run(scenario())


def test_a_fault_fails_the_answer_alone():
    async def scenario() -> None:
        worker = Worker([b"a"], then="fault")
        address = await worker.server.start("127.0.0.1")
        with pytest.raises(pipe.Failed, match="a fault in the answer"):
            await _read_all(await pipe.Call.open(address, "job-1", None, None))
        # the worker goes on answering
        worker.then = "end"
        items = await _read_all(await pipe.Call.open(address, "job-2", None, None))
        assert isinstance(items[-1], Ended)
        worker.server.close()

    run(scenario())


def test_the_ingress_going_away_stops_the_answer_at_once():
    async def scenario() -> None:
        worker = Worker([b"a"] * 10_000, pause_s=0.01)
        address = await worker.server.start("127.0.0.1")
        call = await pipe.Call.open(address, "job-1", None, None)
        items = call.items()
        assert await anext(items) == b"a"
        loop = asyncio.get_running_loop()
        gone_at = loop.time()
        call.close()
        await asyncio.wait_for(worker.closed.wait(), 1)
        assert loop.time() - gone_at < 0.5
        worker.server.close()

    run(scenario())


def test_a_worker_that_dies_mid_answer_is_broken():
    async def scenario() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        address = pipe.Address("127.0.0.1", port, b"s" * pipe.SECRET_BYTES)
        call = await pipe.Call.open(address, "job-1", None, None)
        conn, _ = await asyncio.to_thread(listener.accept)
        conn.sendall(b"B\x00\x00\x00\x02ab" + b"B\x00\x00\x00\x09abc")  # then it dies
        conn.close()
        listener.close()
        items = call.items()
        assert await anext(items) == b"ab"
        with pytest.raises(pipe.Broken):
            await anext(items)

    run(scenario())


@pytest.mark.parametrize("hello", [b"", b"wrong secret....", b"x" * 200])
def test_a_connection_without_the_secret_gets_nothing(hello):
    async def scenario() -> None:
        worker = Worker([b"a"])
        address = await worker.server.start("127.0.0.1")
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(hello)
        if not hello:
            writer.write_eof()
        assert await reader.read() == b""  # dropped, nothing said
        assert worker.asked == []
        wrong = pipe.Address(address.host, address.port, b"\x00" * pipe.SECRET_BYTES)
        with pytest.raises(pipe.Broken):
            await _read_all(await pipe.Call.open(wrong, "job-1", None, None))
        assert worker.asked == []
        worker.server.close()

    run(scenario())


def test_a_connection_that_says_nothing_is_dropped_after_the_hello_bound():
    async def scenario() -> None:
        worker = Worker([b"a"])
        worker.server = pipe.Server(worker.answer, hello_s=0.2)
        address = await worker.server.start("127.0.0.1")
        reader, _writer = await asyncio.open_connection(address.host, address.port)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        worker.server.close()

    run(scenario())
