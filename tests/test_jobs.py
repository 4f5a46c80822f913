"""``Jobs`` without Ray: a plain in-process backend drives it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from actors.core.errors import DownloadFailed, JobNotFound
from actors.core.events import Narration, Progress, Result, StreamEvent, Token, pack, payload
from actors.core.jobs import Adoption, Ending, Jobs
from actors.core.table import JobState, JobTable, new_job_id


@dataclass(frozen=True)
class Op:
    operation: str
    steps: int = 3
    fail: bool = False
    delay: float = 0.0


class LocalBackend:
    """Runs each op as an async generator in this loop; stop() cancels it and waits."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.tasks: dict[str, asyncio.Task] = {}
        self.gate = asyncio.Event()
        self.handed: dict[str, list] = {}

    async def start(self, record, op, lease):
        self.started.append(record.job_id)
        self.tasks[record.job_id] = asyncio.current_task()
        for i in range(op.steps):
            await self.gate.wait()
            await asyncio.sleep(op.delay)
            yield Progress(i + 1, op.steps, 1.0, None, "f")
        if op.fail:
            raise DownloadFailed("connection reset")
        yield Result({"done": True})

    async def stop(self, record, stop, actor=None):
        self.stopped.append(record.job_id)
        if actor is not None:  # an adopted job: its actor hands over what it numbered
            return {"last_token_after_cancel_s": -0.01, "events": self.handed.get(record.job_id, [])}
        task = self.tasks.get(record.job_id)
        if task is not None:
            task.cancel()
        return {"last_write_after_cancel_s": -0.01}


async def _until(predicate, timeout=2.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.fixture
def backend():
    return LocalBackend()


@pytest.fixture
def jobs(backend):
    return Jobs(JobTable(), backend, limits={"download": 1}, cleanup_s=1.0)


async def test_a_job_runs_to_completion(jobs, backend):
    backend.gate.set()
    record = jobs.submit(Op("download"), {}, "cid")
    await _until(lambda: record.state.terminal)
    assert record.state is JobState.COMPLETED
    assert record.result == {"done": True}
    assert record.progress["bytes_done"] == 3


async def test_errors_fail_the_job_with_their_code(jobs, backend):
    backend.gate.set()
    record = jobs.submit(Op("download", fail=True), {}, "cid")
    await _until(lambda: record.state.terminal)
    assert record.state is JobState.FAILED
    assert record.error == {
        "code": "DOWNLOAD_FAILED",
        "message": "connection reset",
        "retriable": True,
    }


async def test_the_limit_queues_and_a_cancelled_queued_job_never_starts(jobs, backend):
    first = jobs.submit(Op("download"), {}, "cid")
    second = jobs.submit(Op("download"), {}, "cid")
    await _until(lambda: first.state is JobState.RUNNING)
    await asyncio.sleep(0.02)
    assert second.state is JobState.QUEUED
    assert await jobs.cancel(second.job_id, "cancel-cid") is True
    assert second.state is JobState.CANCELLED and second.started_at is None
    backend.gate.set()
    await _until(lambda: first.state.terminal)
    await asyncio.sleep(0.02)
    assert backend.started == [first.job_id]
    kinds = [e.event.kind for e in jobs.table.events(second.job_id)]
    assert kinds == ["narration", "narration", "error"]
    cancel, complete, error = jobs.table.events(second.job_id)
    assert (payload(cancel.event)["action"], payload(complete.event)["action"]) == ("cancel", "cancel_complete")
    assert payload(cancel.event)["correlation_id"] == payload(complete.event)["correlation_id"] == "cancel-cid"
    assert payload(error.event)["code"] == "CANCELLED"


async def test_cancel_of_a_running_job_stops_the_backend(jobs, backend):
    record = jobs.submit(Op("download", steps=100), {}, "cid")
    await _until(lambda: record.state is JobState.RUNNING)
    assert await jobs.cancel(record.job_id) is True
    assert backend.stopped == [record.job_id]
    assert record.state is JobState.CANCELLED
    complete = [
        e for e in jobs.table.events(record.job_id) if payload(e.event).get("action") == "cancel_complete"
    ]
    assert "last byte written -10 ms after the cancel" in payload(complete[0].event)["message"]
    assert payload(jobs.table.events(record.job_id)[-1].event)["code"] == "CANCELLED"


async def test_concurrent_cancels_share_one_and_later_ones_say_finished(jobs, backend):
    record = jobs.submit(Op("download", steps=100), {}, "cid")
    await _until(lambda: record.state is JobState.RUNNING)
    results = await asyncio.gather(*(jobs.cancel(record.job_id) for _ in range(5)))
    assert results == [True] * 5
    assert backend.stopped == [record.job_id]
    assert await jobs.cancel(record.job_id) is False
    actions = [payload(e.event).get("action") for e in jobs.table.events(record.job_id)]
    assert actions.count("cancel") == 1 and actions.count("cancel_complete") == 1


async def test_cancel_of_unknown_job_raises_and_logs(jobs, caplog):
    with pytest.raises(JobNotFound):
        await jobs.cancel("job-missing", "cid-x")
    (line,) = [r for r in caplog.records if "unknown job" in r.getMessage()]
    assert line.rbee_job == "job_id=job-missing cid=cid-x"  # the tail of the line


async def test_no_event_after_the_terminal_one(jobs, backend):
    record = jobs.submit(Op("download", steps=100, delay=0.01), {}, "cid")
    backend.gate.set()
    await _until(lambda: record.progress is not None)
    assert await jobs.cancel(record.job_id) is True
    count = len(jobs.table.events(record.job_id))
    await asyncio.sleep(0.05)
    assert len(jobs.table.events(record.job_id)) == count
    assert jobs.table.events(record.job_id)[-1].event.kind == "error"


async def test_a_stop_that_hangs_still_ends_the_job(backend):
    async def hang(record, stop, actor=None):
        await asyncio.sleep(30)

    backend.stop = hang
    jobs = Jobs(JobTable(), backend, cleanup_s=0.1)
    record = jobs.submit(Op("download", steps=100), {}, "cid")
    await _until(lambda: record.state is JobState.RUNNING)
    assert await jobs.cancel(record.job_id) is True
    message = [
        payload(e.event)["message"] for e in jobs.table.events(record.job_id) if e.event.kind == "narration"
    ][-1]
    assert "did not confirm" in message
    assert record.state is JobState.CANCELLED


async def test_a_cancel_ends_the_job_within_its_one_bound_whatever_answers_late(backend):
    """The actor confirms late and the job's last events never come: the actor's wait and
    the wait for those events share the one deadline (``cleanup_s``), not a bound each."""
    seen = []

    async def late(record, stop, actor=None):
        seen.append(stop)
        await asyncio.sleep(0.15)
        return {"last_write_after_cancel_s": 0.0, "cleaned_up": False}

    backend.stop = late  # the drive stays blocked on its gate: no last events ever come
    jobs = Jobs(JobTable(), backend, cleanup_s=0.2)
    record = jobs.submit(Op("download", steps=100), {}, "cid")
    await _until(lambda: record.state is JobState.RUNNING)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await jobs.cancel(record.job_id) is True
    took = loop.time() - began
    assert record.state is JobState.CANCELLED and 0.15 <= took < 0.3, took
    (stop,) = seen
    assert abs(stop.deadline - stop.accepted_at - 0.2) < 1e-6
    message = [
        payload(e.event)["message"] for e in jobs.table.events(record.job_id) if e.event.kind == "narration"
    ][-1]
    assert "its cleanup had not ended by the deadline" in message


async def test_narration_passes_through(jobs, backend):
    async def talk(record, op, lease):
        yield Narration("a", "b", "hello")

    backend.start = talk
    record = jobs.submit(Op("other"), {}, "cid")
    await _until(lambda: record.state.terminal)
    assert record.state is JobState.COMPLETED
    assert payload(jobs.table.events(record.job_id)[0].event)["message"] == "hello"


# -- jobs the ingress gave straight to a worker (``adopt``, ``close``) --------------------


def _adoption(job_id: str, actor: str = "rbee:worker:w") -> Adoption:
    return Adoption(job_id, {"operation": "infer", "model": "m"}, "cid", actor, 1.0)


async def test_an_adopted_job_runs_on_its_actor_and_ends_with_its_events(jobs, backend):
    job_id = new_job_id()
    record = await jobs.adopt(_adoption(job_id))
    assert record.state is JobState.RUNNING and backend.started == []  # nothing here drives it
    assert record.created_at == 1.0
    events = [StreamEvent(1, Token("a", 1)), StreamEvent(2, Result({"text": "a"}))]
    await jobs.close(Ending(job_id, pack(events), JobState.COMPLETED))
    assert record.state is JobState.COMPLETED and record.result == {"text": "a"}
    assert [e.id for e in jobs.table.events(job_id)] == [1, 2]
    await jobs.close(Ending(job_id, [], JobState.FAILED))  # a second word changes nothing
    assert record.state is JobState.COMPLETED


async def test_an_end_with_its_adoption_is_recorded_where_the_adoption_never_came(jobs):
    """A registry that restarted while the job ran hears only of its end."""
    job_id = new_job_id()
    events = pack([StreamEvent(1, Result({"text": ""}))])
    await jobs.close(Ending(job_id, events, JobState.COMPLETED, _adoption(job_id)))
    assert jobs.get(job_id).state is JobState.COMPLETED
    assert await jobs.adopt(_adoption(job_id)) is None  # a late adoption: no-op


async def test_a_workers_end_that_comes_before_the_adoption_ends_the_job_when_it_comes(jobs):
    """The worker's word and the ingress's come by different roads: the end may be first."""
    job_id = new_job_id()
    gone = pack([StreamEvent(1, Token("a", 1))])
    await jobs.close(Ending(job_id, gone, JobState.CANCELLED))  # the client left at once
    assert job_id not in jobs.table
    await jobs.adopt(_adoption(job_id))
    record = jobs.get(job_id)
    assert record.state is JobState.CANCELLED and record.error["code"] == "CANCELLED"
    assert next(e.event.kind for e in jobs.table.events(job_id)) == "token"


async def test_a_cancel_of_an_adopted_job_takes_its_events_from_the_actor(jobs, backend):
    job_id = new_job_id()
    await jobs.adopt(_adoption(job_id))
    backend.handed[job_id] = pack([StreamEvent(1, Token("a", 1)), StreamEvent(2, Token("b", 2))])
    assert await jobs.cancel(job_id) is True
    kinds = [(e.id, e.event.kind) for e in jobs.table.events(job_id)]
    assert kinds[:2] == [(1, "token"), (2, "token")]
    assert [k for _, k in kinds[2:]] == ["narration", "narration", "error"]  # cancel, complete
    assert [i for i, _ in kinds] == list(range(1, 6))
    # The actor's own word of the end, after: the job keeps the registry's.
    await jobs.close(Ending(job_id, [], JobState.CANCELLED))
    assert jobs.get(job_id).state is JobState.CANCELLED


async def test_a_client_gone_ends_an_adopted_job_cancelled_with_the_cancel_narration(jobs):
    job_id = new_job_id()
    await jobs.adopt(_adoption(job_id))
    await jobs.close(Ending(job_id, pack([StreamEvent(1, Token("a", 1))]), JobState.CANCELLED))
    record = jobs.get(job_id)
    assert record.state is JobState.CANCELLED and record.error["code"] == "CANCELLED"
    actions = [e.event.action for e in jobs.table.events(job_id) if e.event.kind == "narration"]
    assert actions == ["cancel", "cancel_complete"]


async def test_the_adopted_jobs_of_a_dead_actor_fail_worker_died(jobs):
    ids = [new_job_id() for _ in range(3)]
    for job_id, actor in zip(ids, ("rbee:worker:a", "rbee:worker:a", "rbee:worker:b"), strict=True):
        await jobs.adopt(_adoption(job_id, actor))
    await jobs.actor_gone("rbee:worker:a")
    states = [jobs.get(j).state for j in ids]
    assert states == [JobState.FAILED, JobState.FAILED, JobState.RUNNING]
    assert jobs.get(ids[0]).error == {"code": "WORKER_DIED", "message": "rbee:worker:a died while running the job", "retriable": True}
