"""An OpenAI (or Anthropic) request answered straight from the worker that runs it: the one
road from the engine to the socket.

The ingress hands the request to the worker (no registry on the way) and writes what comes
back: vLLM's chunks, as vLLM's server wrote them, gathered into one ``bytes`` per
``linger_s`` (the first at once). The last item is always ``Ended``: the stream's tail (the
frames after the last token: OpenAI's usage chunk and ``[DONE]``, Anthropic's closing
events, as vLLM writes them), or the whole answer of a request that is
not streamed (``Result``), or its refusal (``Error``), with the job's events and how it
ended. The ingress tells the registry before it writes the tail: a client that has the
whole answer finds the job over. The job's events are numbered in the worker's run as any
job's (watchers follow them live, a cancel by job id stops it).

A run that ends without handing its ``Ended`` over (the client went away, a cancel) is
reported by the worker itself (``InferenceActor._answer``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from actors.adapters.engine import EngineWorker
from actors.core.errors import RbeeError
from actors.core.events import Error, Result, StreamEvent, Token
from actors.core.operations import Infer
from actors.core.running import Ended, batched
from actors.core.table import JobState


async def answer(
    worker: EngineWorker,
    job_id: str,
    op: Infer,
    correlation_id: str | None,
    linger_s: float,
    ended: Ended,
) -> AsyncGenerator[bytes | Ended, None]:
    """The request's answer, as the ingress writes it (see the module's text)."""
    events = worker.run(job_id, op, correlation_id, direct=True)
    tail: list[str] = []
    try:
        async for batch in batched(events, linger_s=linger_s):
            ended.events += batch
            out: list[str] = []
            for item in batch:
                event = item.event
                if isinstance(event, Token) and event.wire is not None:
                    out.append(event.wire)
                elif isinstance(event, Result) and "answer" in event.value:
                    ended.answer = event  # a whole answer: the ingress writes it as JSON
                elif isinstance(event, Result):
                    tail.append(str(event.value.get("tail") or ""))
            if out and not tail:
                yield "".join(out).encode()
            elif out:
                tail[:0] = out
        ended.state = JobState.COMPLETED
    except (asyncio.CancelledError, GeneratorExit):  # a cancel, or nobody reads any more
        ended.state = JobState.CANCELLED
        raise
    except RbeeError as exc:
        error = Error(**exc.to_dict())
        last = ended.events[-1].id if ended.events else 0
        ended.events.append(StreamEvent(last + 1, error))
        ended.answer = error
    ended.tail = "".join(tail).encode()
    yield ended  # the pipe marks it handed once the ingress has it (``core.pipe``)


__all__ = ["Ended", "answer"]
