"""``Runs``: a cancel that comes before its job, or for a job this actor never runs; watchers
and ``batched``: each event once, the first at once, then in lists."""

from __future__ import annotations

import asyncio
import itertools
import logging
from contextlib import aclosing

import pytest

from actors.core import logs
from actors.core.events import Narration, StreamEvent, Token
from actors.core.running import Runs, Stop, batched


async def _forever(run):
    while True:
        yield Narration("test", "tick", "tick")
        await asyncio.sleep(0.01)


async def test_a_cancel_before_the_job_stops_it_as_it_starts():
    runs = Runs()
    run = await runs.cancel("j-early", Stop.within(1.0))
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
        await runs.cancel(f"j-{n}", Stop.within(1.0))
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


async def test_no_event_made_after_the_cancel_is_sent_whoever_reads_on():
    """A reader that swallows the task's cancel and asks for more (a body that makes events
    without waiting never meets that cancel) gets no event made after it: the flag."""
    runs = Runs()

    async def busy(run):
        for n in itertools.count(1):
            yield Token(text="x", index=n)  # no await between events

    got: list[StreamEvent] = []
    after_cancel: list[StreamEvent] = []

    async def reader():
        events = runs.run("j-busy", busy)
        got.append(await anext(events))
        try:
            await asyncio.sleep(10)  # as Ray does, reporting the item: the cancel lands here
        except asyncio.CancelledError:
            pass
        with pytest.raises(asyncio.CancelledError):
            after_cancel.append(await anext(events))

    reading = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    run = await runs.cancel("j-busy", Stop.within(1.0))
    await asyncio.wait_for(reading, 1.0)
    assert len(got) == 1 and after_cancel == [] and run.settled


async def test_a_cancel_waits_for_the_cleanup_until_its_deadline_and_no_longer():
    runs = Runs()
    cleaning = asyncio.Event()

    async def slow_to_clean(run):
        try:
            while True:
                yield Narration("test", "tick", "tick")
                await asyncio.sleep(0.01)
        finally:
            cleaning.set()
            await asyncio.sleep(0.5)  # a cleanup slower than the cancel's bound

    async def reader():
        async for _ in runs.run("j-slow", slow_to_clean):
            pass

    reading = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    began = loop.time()
    run = await runs.cancel("j-slow", Stop.within(0.1))
    took = loop.time() - began
    assert cleaning.is_set() and not run.settled and 0.08 <= took < 0.3, took
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reading, 2.0)
    assert run.settled


async def _events(*gaps_s: float, narrate_first: bool = False, made: list[float] | None = None):
    """A token after each gap (a narration first, if asked); ``made`` gets when each was."""
    for n, gap in enumerate(gaps_s, 1):
        await asyncio.sleep(gap)
        if made is not None:
            made.append(asyncio.get_running_loop().time())
        if narrate_first and n == 1:
            yield StreamEvent(n, Narration("test", "generate", "starting"))
            continue
        yield StreamEvent(n, Token(f"t{n}", n))


async def test_a_narration_holds_no_token_back():
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = []
    async for batch in batched(_events(0.0, 0.02, 0.2, narrate_first=True), linger_s=0.1):
        got.append((loop.time() - start, [e.id for e in batch]))
    assert got[0][1] == [1] and got[1][1] == [2]
    assert got[1][0] < 0.06  # the first token came 20 ms after the narration: sent at once


async def test_batched_sends_an_event_after_a_quiet_spell_at_once_and_then_at_most_one_list_per_linger():
    loop = asyncio.get_running_loop()
    start = loop.time()
    got: list[tuple[float, list[int]]] = []
    # One event, a burst of 20 close together, a quiet spell, one more.
    gaps = [0.0] + [0.005] * 20 + [0.3]
    made: list[float] = []
    async for batch in batched(_events(*gaps, made=made), linger_s=0.1):
        got.append((loop.time() - start, [e.id for e in batch]))
    assert [i for _, ids in got for i in ids] == list(range(1, 23))  # all, in order, once
    first_at, first = got[0]
    assert first == [1] and first_at < 0.05  # not held back for the linger
    last_at, last = got[-1]
    # after a quiet spell (however long the burst took on a busy machine): at once
    assert last == [22] and last_at - (made[-1] - start) < 0.05
    burst = [at for at, _ in got[:-1]]
    assert len(burst) <= 3  # ~0.1 s of events in at most one list per 0.1 s
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(burst))


async def test_batched_hands_on_what_it_gathered_before_a_failure():
    async def failing():
        yield StreamEvent(1, Narration("test", "tick", "one"))
        yield StreamEvent(2, Narration("test", "tick", "two"))
        raise RuntimeError("the engine died")

    got = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for batch in batched(failing(), linger_s=0.05):
            got.extend(e.id for e in batch)
    assert got == [1, 2]


async def test_a_watcher_gets_each_event_once_the_first_at_once_then_in_lists():
    runs = Runs()

    async def body(run):
        yield Narration("test", "generate", "generating")
        await asyncio.sleep(0.002)
        for n in range(40):
            yield Token(f"t{n}", n + 1)
            await asyncio.sleep(0.005)

    loop = asyncio.get_running_loop()
    seen: list[int] = []
    lists: list[float] = []

    async def watch():
        async for events in runs.watch("j-w", 6, linger_s=0.05):
            lists.append(loop.time())
            seen.extend(e.id for e in events)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.01)  # the watcher comes before the run
    started = loop.time()
    ran = [e.id async for e in runs.run("j-w", body, first_id=7)]
    await asyncio.wait_for(watcher, 5)
    assert ran == list(range(7, 48))
    assert seen == ran  # nothing lost, nothing repeated
    assert lists[0] - started < 0.03  # the narration is not held back,
    assert lists[1] - started < 0.03  # nor the first token behind it
    assert len(lists) < 20  # 40 events ~0.2 s apart: gathered, not one list each
    # Events 1-6 were the registry's before this run: a watcher that needs them is not
    # served here (it reads the registry), rather than given a stream with a hole.
    assert [e async for e in runs.watch("j-w", 0)] == []


async def test_what_a_job_logs_names_the_job_and_its_correlation_id():
    lines: list[str] = []
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    handler.addFilter(logs.with_job)
    handler.emit = lambda record: lines.append(handler.format(record))  # type: ignore[method-assign]
    logger = logging.getLogger("rbee.test-jobs")
    logger.addHandler(handler)

    async def body(run):
        logger.warning("inside the job")
        yield Narration("test", "step", "one")

    try:
        runs = Runs()

        async def one(job_id: str) -> None:
            async for _ in runs.run(job_id, body, correlation_id=f"cid-{job_id}"):
                pass

        await asyncio.gather(asyncio.create_task(one("job-a")), asyncio.create_task(one("job-b")))
        logger.warning("outside any job")
    finally:
        logger.removeHandler(handler)
    assert all("WARNING rbee.test-jobs inside the job job_id=job-" in line for line in lines[:2])
    assert {line.split("job_id=")[1] for line in lines[:2]} == {
        "job-a cid=cid-job-a",
        "job-b cid=cid-job-b",
    }
    assert lines[2].endswith("outside any job job_id=- cid=-")
