"""A plain Ray driver of its own that uses rbee through ``serve.get_app_handle("rbee")``
(no HTTP): ``python handle_driver.py <gcs address> <repo> <slow repo>``. Prints one JSON
object of what it saw; ``tests/test_handles.py`` judges it."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray import serve

from actors.core.errors import RbeeError, rbee_cause
from actors.core.events import Progress, Result, StreamEvent
from actors.core.table import new_job_id


async def error_of(call: Callable[[], Awaitable[Any]]) -> str:
    try:
        await call()
    except Exception as exc:
        cause = rbee_cause(exc)
        return type(cause).__name__ if isinstance(cause, RbeeError) else repr(exc)
    return "no error"


async def main() -> None:
    """Inside an event loop, as a handle must be where Serve's throughput-optimized mode
    (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) is set; it works the same without it."""
    address, repo, slow = sys.argv[1:4]
    ray.init(address=address, log_to_driver=False)
    rbee = serve.get_app_handle("rbee")
    stream = rbee.options(stream=True).stream
    seen: dict[str, Any] = {}

    job_id = await rbee.submit.remote({"operation": "model_download", "model": repo})
    items = [item async for item in stream.remote(job_id)]
    seen["typed"] = all(isinstance(i, StreamEvent) for i in items)
    seen["ids"] = [i.id for i in items]
    seen["kinds"] = sorted({type(i.event).__name__ for i in items})
    seen["result"] = items[-1].event.value if isinstance(items[-1].event, Result) else None
    seen["record"] = await rbee.job.remote(job_id)
    seen["listed"] = job_id in [j["job_id"] for j in await rbee.jobs.remote(limit=20)]
    seen["resumed"] = [i.id async for i in stream.remote(job_id, 2)]
    seen["run"] = await rbee.run.remote({"operation": "model_get", "model": repo})

    job_id = await rbee.submit.remote({"operation": "model_download", "model": slow})
    progress = 0
    try:
        async for item in stream.remote(job_id):
            if isinstance(item.event, Progress) and item.event.bytes_done > 0 and not progress:
                progress = item.event.bytes_done
                await rbee.cancel.remote(job_id)
        seen["cancel"] = "the stream ended without an error"
    except Exception as exc:
        seen["cancel"] = type(rbee_cause(exc)).__name__
    seen["cancelled_state"] = (await rbee.job.remote(job_id))["state"]
    seen["cancel_again"] = await error_of(lambda: rbee.cancel.remote(job_id, wait=True))

    async def drain(job_id: str) -> None:
        async for _ in stream.remote(job_id):
            pass

    never = new_job_id()
    bad = {"operation": "model_download", "model": repo, "typo": 1}
    absent = {"operation": "model_get", "model": "org/absent"}
    seen["errors"] = {
        "job": await error_of(lambda: rbee.job.remote(never)),
        "stream": await error_of(lambda: drain(never)),
        "submit": await error_of(lambda: rbee.submit.remote(bad)),
        "jobs": await error_of(lambda: rbee.jobs.remote(state="sleeping")),
        "run": await error_of(lambda: rbee.run.remote(absent)),
        "cancel": await error_of(lambda: rbee.cancel.remote(never)),
        "cancel_wait": await error_of(lambda: rbee.cancel.remote(never, wait=True)),
        "cancel_malformed": await error_of(lambda: rbee.cancel.remote("job-never")),
    }
    print(json.dumps(seen))


if __name__ == "__main__":
    asyncio.run(main())
