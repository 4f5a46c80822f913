"""``Runs``: a cancel that comes before its job, or for a job this actor never runs."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from actors.events import Narration
from actors.running import Runs


async def _forever(run):
    while True:
        yield Narration("test", "tick", "tick")
        await asyncio.sleep(0.01)


async def test_a_cancel_before_the_job_stops_it_as_it_starts():
    runs = Runs()
    run = await runs.cancel("j-early")
    assert run.cancelled_at is not None
    assert len(runs) == 0  # an early cancel is not a running job
    seen = []
    with pytest.raises(asyncio.CancelledError):
        async for event in runs.run("j-early", _forever):
            seen.append(event)
    assert seen == [] and len(runs) == 0


async def test_early_cancels_are_bounded_and_never_count_as_running():
    runs = Runs(remember=10)
    for n in range(1000):
        await runs.cancel(f"j-{n}")
    assert len(runs) == 0
    # The oldest were forgotten: that job runs; the newest still stops at once.
    got = []
    async with aclosing(runs.run("j-0", _forever)) as events:
        async for event in events:
            got.append(event)
            if len(got) == 3:
                break
    assert len(got) == 3
    with pytest.raises(asyncio.CancelledError):
        async for _ in runs.run("j-999", _forever):
            pass
