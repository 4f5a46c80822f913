import asyncio
import pickle

import pytest

from actors.core import errors
from actors.core.events import Error, Narration, Progress, Result, Token, payload
from actors.core.table import ALLOWED, EventLog, IllegalTransition, JobState, JobTable


def test_terminal_states_allow_nothing():
    for state in JobState:
        assert state.terminal == (ALLOWED[state] == frozenset())


def test_queued_can_be_cancelled_without_running():
    assert JobState.CANCELLED in ALLOWED[JobState.QUEUED]
    assert JobState.COMPLETED not in ALLOWED[JobState.QUEUED]


async def test_transitions_stamp_times_and_refuse_illegal_moves():
    table = JobTable(clock=iter(range(100)).__next__)
    record = table.create("model_list", {}, "cid-1")
    await table.transition(record.job_id, JobState.RUNNING)
    await table.transition(record.job_id, JobState.COMPLETED)
    assert (record.created_at, record.started_at, record.finished_at) == (0, 1, 2)
    with pytest.raises(IllegalTransition):
        await table.transition(record.job_id, JobState.CANCELLED)
    assert record.state is JobState.COMPLETED


def test_event_log_is_bounded_and_keeps_counting():
    log = EventLog(maxlen=3)
    for i in range(5):
        log.append(Token(text=str(i), index=i + 1))
    kept = log.after(0)
    assert [e.id for e in kept] == [3, 4, 5]
    assert payload(log.after(4)[0].event) == {"text": "4", "index": 5}
    assert [e.id for e in log.after(0, limit=2)] == [3, 4]  # a page: the oldest kept first
    assert [e.id for e in log.after(3, limit=10)] == [4, 5]
    assert log.after(5, limit=1) == []


async def test_emit_updates_record_and_is_dropped_after_terminal():
    table = JobTable()
    record = table.create("model_download", {}, "cid")
    await table.emit(record.job_id, Progress(1, 2, 3.0, None, "a"))
    await table.emit(record.job_id, Result({"ok": True}))
    await table.transition(record.job_id, JobState.RUNNING)
    await table.emit(record.job_id, Error("DOWNLOAD_FAILED", "x", True))
    await table.transition(record.job_id, JobState.FAILED)
    await table.emit(record.job_id, Narration("a", "b", "late"))
    assert len(table.events(record.job_id)) == 3
    assert record.progress["bytes_done"] == 1
    assert record.result == {"ok": True}
    assert record.error == {"code": "DOWNLOAD_FAILED", "message": "x", "retriable": True}
    events, state, _ = await table.wait_events(record.job_id, 0, poll_s=0.01)
    assert [e.event.kind for e in events] == ["progress", "result", "error"]
    assert state is JobState.FAILED


async def test_wait_events_wakes_on_new_event():
    table = JobTable()
    record = table.create("model_list", {}, "cid")

    async def later():
        await asyncio.sleep(0.05)
        await table.emit(record.job_id, Narration("t", "x", "hello"))

    task = asyncio.create_task(later())
    events, _, _ = await asyncio.wait_for(table.wait_events(record.job_id, 0, poll_s=5), 2)
    await task
    assert [payload(e.event)["message"] for e in events] == ["hello"]


async def test_list_is_newest_first_and_filters():
    table = JobTable()
    a = table.create("model_list", {}, "c")
    b = table.create("model_download", {}, "c")
    await table.transition(a.job_id, JobState.CANCELLED)
    assert [r.job_id for r in table.recent()] == [b.job_id, a.job_id]
    assert [r.job_id for r in table.recent(state=JobState.CANCELLED)] == [a.job_id]
    assert [r.job_id for r in table.recent(operation="model_download")] == [b.job_id]
    assert len(table.recent(limit=1)) == 1


@pytest.mark.parametrize(
    "error",
    [
        errors.RbeeError("boom"),
        errors.JobNotFound("no job"),
        errors.DownloadFailed("dropped"),
        errors.DownloadFailed("404", retriable=False),
        errors.IntegrityError("sha mismatch"),
        errors.UnsafePath("../x"),
        errors.JobCancelled("stop"),
    ],
)
def test_errors_survive_pickle(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert back.to_dict() == error.to_dict()


def test_illegal_transition_survives_pickle():
    exc = IllegalTransition("job-1", JobState.COMPLETED, JobState.RUNNING)
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)


def test_retriable_split():
    assert errors.DownloadFailed("x").retriable
    assert not errors.IntegrityError("x").retriable
    assert not errors.InvalidRequest("x").retriable


def test_rbee_cause_finds_wrapped_error():
    inner = errors.ModelNotFound("gone")

    class Wrapper(Exception):
        def __init__(self, cause):
            self.cause = cause

    assert errors.rbee_cause(Wrapper(inner)) is inner
    assert errors.rbee_cause(ValueError("x")) is None


async def test_the_oldest_finished_jobs_are_forgotten_past_the_cap():
    table = JobTable(retain=3)
    first = table.create("hive_list", {}, "c")
    running = table.create("hive_list", {}, "c")
    await table.transition(first.job_id, JobState.CANCELLED)
    await table.transition(running.job_id, JobState.RUNNING)
    newer = [table.create("hive_list", {}, "c") for _ in range(2)]
    assert first.job_id not in table  # finished and oldest: gone
    assert running.job_id in table  # unfinished jobs are never forgotten
    assert all(r.job_id in table for r in newer)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("MODEL_NOT_FOUND", errors.ModelNotFound),
        ("INVALID_REQUEST", errors.InvalidRequest),
        ("DOWNLOAD_FAILED", errors.DownloadFailed),
        ("INTERNAL", errors.InternalError),
        ("WORKER_DIED", errors.WorkerDied),
        ("NO_SUCH_CODE", None),
    ],
)
def test_error_class_of_a_wire_code(code, cls):
    assert errors.error_class(code) is cls
