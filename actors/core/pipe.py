"""A worker's answers as bytes on a connection of their own: the last hop of the one road
from the engine to the socket.

Each item of a Ray streaming call is an object of its own, made, reported to its owner,
counted and freed at both ends: for a stream of small chunks that was most of what the
ingress spent, and a good part of the worker's. Here the ingress opens a connection to the
worker that answers (one per request), sends the request, and reads frames:

- ``B``: bytes, as the worker wrote them (vLLM's chunks, never parsed on the way);
- ``E``: how the answer ended (``running.Ended``, pickled), the last frame;
- ``C``: the answer was cancelled (by job id, through the registry), the last frame;
- ``F``: the answer failed at the worker (a fault, not the worker's death), the last frame.

A connection that closes before its last frame is a worker that died. The ingress closing
its end stops the answer (vLLM aborts the request at once).

The worker listens on its node's address (loopback under a Ray of our own). A connection
must start with the worker's secret, which only the registry's routes carry: any other is
dropped before a byte of it is read as a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import pickle
import secrets
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from actors.core.running import Ended

log = logging.getLogger("rbee.pipe")

_HEAD = struct.Struct("!cI")  # the kind of a frame, the length of what follows
SECRET_BYTES = 16
HELLO_S = 5.0
"""How long a connection may take to send its secret and request."""
MAX_REQUEST = 64 << 20
"""The largest request a worker reads (an OpenAI body is at most a few MB)."""

Answer = Callable[[str, Any, str | None], AsyncGenerator[bytes | Ended, None]]


class Cancelled(Exception):
    """The answer was cancelled at the worker (``C``)."""


class Failed(Exception):
    """The answer failed at the worker, which goes on (``F``, with what went wrong)."""


class Broken(Exception):
    """The connection closed before the answer's last frame: the worker died, or refused."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where a worker takes answers: what the ingress needs to ask it."""

    host: str
    port: int
    secret: bytes


class Server:
    """The worker's end: ``answer(job_id, op, correlation_id)`` for each connection."""

    def __init__(self, answer: Answer, *, hello_s: float = HELLO_S) -> None:
        self._answer = answer
        self._hello_s = hello_s
        self._secret = secrets.token_bytes(SECRET_BYTES)
        self._server: asyncio.Server | None = None
        self._address: Address | None = None

    async def start(self, host: str) -> Address:
        """Listen on ``host``, on a port of the system's choosing."""
        self._server = await asyncio.start_server(self._serve, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self._address = Address(host, port, self._secret)
        return self._address

    @property
    def address(self) -> Address:
        if self._address is None:
            raise RuntimeError("the worker takes no answers before it is loaded")
        return self._address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(self._request(reader), self._hello_s)
        except (OSError, EOFError, TimeoutError, ValueError, pickle.UnpicklingError) as exc:
            log.warning("a connection that sent no request was dropped: %r", exc)
            writer.transport.abort()
            return
        abandoned = asyncio.Event()
        pump = asyncio.ensure_future(self._pump(request, writer, abandoned))
        gone = asyncio.ensure_future(reader.read(1))  # the ingress closed its end
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not gone.done():  # all is written: the ingress closes first (no TIME_WAIT here)
                await asyncio.wait({gone}, timeout=self._hello_s)
        finally:
            gone.cancel()
            if not pump.done():  # nobody reads any more: the answer stops
                abandoned.set()
                pump.cancel()
            try:
                await pump
            except asyncio.CancelledError:
                if _cancelling():
                    raise
            if abandoned.is_set():
                writer.transport.abort()
            else:
                writer.close()  # once what is written has gone (a ``C`` frame included)

    async def _request(self, reader: asyncio.StreamReader) -> tuple[str, Any, str | None]:
        secret = await reader.readexactly(SECRET_BYTES)
        if not hmac.compare_digest(secret, self._secret):
            raise ValueError("a wrong secret")
        kind, size = _HEAD.unpack(await reader.readexactly(_HEAD.size))
        if kind != b"R" or size > MAX_REQUEST:
            raise ValueError(f"a frame {kind!r} of {size} bytes where a request was due")
        job_id, op, correlation_id = pickle.loads(await reader.readexactly(size))
        return str(job_id), op, correlation_id

    async def _pump(
        self,
        request: tuple[str, Any, str | None],
        writer: asyncio.StreamWriter,
        abandoned: asyncio.Event,
    ) -> None:
        """Write the answer's items as frames. A cancel of this task is either the
        connection's end (``abandoned``: nobody reads) or the run's cancel by job id (the
        task that iterates a run is the one ``Runs.cancel`` stops), which is told (``C``)."""
        items = self._answer(*request)
        try:
            async with contextlib.aclosing(items):
                async for item in items:
                    if isinstance(item, bytes):
                        _frame(writer, b"B", item)
                        await writer.drain()
                    else:
                        _frame(writer, b"E", pickle.dumps(item, pickle.HIGHEST_PROTOCOL))
                        await writer.drain()
                        item.handed = True  # the ingress tells the registry, not the worker
        except asyncio.CancelledError:
            if not abandoned.is_set():  # the run stopped, as its cancel asked: said
                _frame(writer, b"C", b"")
            raise
        except ConnectionError as exc:
            log.info("the ingress went away mid-answer: %r", exc)
        except Exception as exc:  # a fault here, not the worker's death: the job fails alone
            log.exception("an answer failed")
            _frame(writer, b"F", repr(exc).encode())


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _frame(writer: asyncio.StreamWriter, kind: bytes, data: bytes) -> None:
    writer.write(_HEAD.pack(kind, len(data)) + data)


class Call:
    """The ingress's end of one answer: ``items()`` its bytes, then its ``Ended``;
    ``close()`` (any number of times) stops it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, address: Address, job_id: str, op: Any, correlation_id: str | None) -> Call:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        request = pickle.dumps((job_id, op, correlation_id), pickle.HIGHEST_PROTOCOL)
        writer.write(address.secret + _HEAD.pack(b"R", len(request)) + request)
        return cls(reader, writer)

    async def items(self) -> AsyncIterator[bytes | Ended]:
        reader = self._reader
        try:
            while True:
                kind, size = _HEAD.unpack(await reader.readexactly(_HEAD.size))
                data = await reader.readexactly(size) if size else b""
                if kind == b"B":
                    yield data
                elif kind == b"E":
                    ended = pickle.loads(data)
                    if not isinstance(ended, Ended):
                        raise Broken(f"the worker ended with {type(ended).__name__}")
                    yield ended
                    return
                elif kind == b"C":
                    raise Cancelled("the job was cancelled")
                elif kind == b"F":
                    raise Failed(data.decode(errors="replace"))
                else:
                    raise Broken(f"a frame {kind!r} from the worker")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise Broken("the worker's connection closed mid-answer") from exc
        finally:
            self.close()

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.transport.abort()


__all__ = ["Address", "Broken", "Call", "Cancelled", "Failed", "Server"]
