"""A ``model_download`` job: plan with a vendor, move the bytes, link the snapshot, report.

``ModelDownloads.run`` is an async generator of typed events; the ``DownloadActor`` exposes it
as a Ray streaming call. Progress covers the whole job and comes at least every heartbeat.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from actors.adapters.downloads_progress import ProgressMeter
from actors.adapters.transfer import Downloader, resumable_bytes
from actors.adapters.vendors import DownloadPlan, PlannedFile, Vendor
from actors.core.errors import DownloadFailed, InvalidRequest
from actors.core.events import Event, Narration, Progress, Result, StreamEvent
from actors.core.operations import ModelDownload
from actors.core.running import Run, Runs, Stop

ACTOR = "download"


class ModelDownloads:
    """Runs download jobs on one node and cancels them on request."""

    def __init__(
        self,
        downloader: Downloader,
        vendors: Mapping[str, Vendor],
        *,
        heartbeat_s: float = 0.5,
        files_at_once: int = 4,
        deadline_s: float | None = None,
        clock: Callable[[], float] = time.time,
        count_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self._downloader = downloader
        self._vendors = vendors
        self._heartbeat_s = heartbeat_s
        self._deadline_s = deadline_s
        self._files_at_once = files_at_once
        self._count_bytes = count_bytes or (lambda n: None)
        self._runs = Runs(clock=clock)

    async def run(
        self, job_id: str, op: ModelDownload, correlation_id: str | None = None, first_id: int = 1
    ) -> AsyncIterator[StreamEvent]:
        async for event in self._runs.run(
            job_id, lambda run: self._run(run, op, correlation_id), first_id, correlation_id
        ):
            yield event

    def watch(self, job_id: str, after: int) -> AsyncIterator[list[StreamEvent]]:
        return self._runs.watch(job_id, after)

    async def cancel(self, job_id: str, stop: Stop) -> dict[str, Any]:
        """Stop a job's transfer and wait until its partial files are gone (by
        ``stop.deadline``).

        Returns when the last byte was written relative to the cancel (seconds; negative
        means before it), so callers can report and measure the guarantee.
        """
        run = await self._runs.cancel(job_id, stop)
        return {"last_write_after_cancel_s": run.output_after_cancel_s(), "cleaned_up": run.settled}

    async def _run(
        self, run: Run, op: ModelDownload, correlation_id: str | None
    ) -> AsyncGenerator[Event, None]:
        def say(action: str, message: str) -> Narration:
            return Narration(ACTOR, action, message, correlation_id=correlation_id)

        vendor = self._vendors.get(op.vendor)
        if vendor is None:
            raise InvalidRequest(f"unknown vendor {op.vendor!r}")
        yield say("plan", f"resolving {op.model}@{op.revision} ({op.vendor})")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._deadline_s or float("inf"))
        try:
            async with asyncio.timeout_at(deadline if self._deadline_s else None):
                plan = await vendor.plan(op)
        except TimeoutError:
            raise self._late() from None
        yield say(
            "plan_ready",
            f"{op.model}@{plan.commit[:12]}: {len(plan.files)} files, {plan.bytes_total} bytes",
        )
        meter = ProgressMeter(plan.bytes_total, clock=time.monotonic)
        fetching = asyncio.create_task(self._fetch_all(plan, meter, run))
        try:
            while not fetching.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise self._late()
                await asyncio.wait({fetching}, timeout=min(self._heartbeat_s, left))
                yield _progress(meter)
            fetching.result()
        finally:
            if not fetching.done():
                fetching.cancel()
                await asyncio.gather(fetching, return_exceptions=True)
        _link(plan)
        final = _progress(meter)
        yield final
        yield say("done", f"{op.model}@{plan.commit[:12]} is in the cache")
        yield Result(_result(plan, final))

    def _late(self) -> DownloadFailed:
        return DownloadFailed(
            f"the download did not finish within {self._deadline_s:g} s (downloads.deadline_s)"
        )

    async def _fetch_all(self, plan: DownloadPlan, meter: ProgressMeter, run: Run) -> None:
        slots = asyncio.Semaphore(self._files_at_once)

        async def one(planned: PlannedFile) -> None:
            async with slots:

                def on_bytes(n: int) -> None:
                    self._runs.touch(run)
                    if moved := meter.update(planned.path, n):
                        self._count_bytes(moved)

                # What an earlier attempt left is on disk already, not moved by this job.
                meter.update(planned.path, resumable_bytes(planned.spec.dest))
                await self._downloader.fetch(planned.spec, on_bytes)
                meter.finish(planned.path, planned.spec.size)

        tasks = [asyncio.create_task(one(planned)) for planned in plan.files]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _link(plan: DownloadPlan) -> None:
    """The snapshot's links and the revision's ref, once every blob is in."""
    try:
        for planned in plan.files:
            plan.layout.link(plan.commit, planned.path, planned.etag)
        plan.layout.write_ref(plan.revision, plan.commit)
    except OSError as exc:
        raise DownloadFailed(
            f"cannot link {plan.model}@{plan.commit[:12]} in the cache: {exc}", retriable=False
        ) from exc


def _progress(meter: ProgressMeter) -> Progress:
    rate = meter.rate_bps()
    return Progress(
        bytes_done=meter.done,
        bytes_total=meter.total,
        rate_bps=round(rate, 1),
        eta_s=meter.eta_s(rate),
        file=meter.current_file,
    )


def _result(plan: DownloadPlan, final: Progress) -> dict[str, object]:
    return {
        "model": plan.model,
        "revision": plan.revision,
        "commit": plan.commit,
        "path": str(plan.layout.snapshot(plan.commit)),
        "files": [f.path for f in plan.files],
        "bytes_total": final.bytes_total,
    }
