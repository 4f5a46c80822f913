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
        errors.UnknownError("newer", code="QUOTA_NEXT_YEAR", param="n", retriable=True),
    ],
)
def test_errors_survive_pickle(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert back.to_dict() == error.to_dict()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("MODEL_NOT_FOUND", errors.ModelNotFound),
        ("INVALID_REQUEST", errors.InvalidRequest),
        ("WORKER_DIED", errors.WorkerDied),
        ("INTERNAL", errors.InternalError),
        ("QUOTA_NEXT_YEAR", errors.UnknownError),
    ],
)
def test_a_wire_error_becomes_its_class_in_one_place(code, cls):
    error = errors.error_from(code, "why", retriable=True, param="model")
    assert type(error) is cls
    assert error.to_dict() == {"code": code, "message": "why", "retriable": True, "param": "model"}


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


# -- the jobs board (``GET /v1/jobs/watch``) ------------------------------------------------


async def test_the_board_starts_whole_then_gives_each_changed_job_once():
    table = JobTable()
    a = table.create("model_download", {"model": "org/a", "hive_id": "h1"}, "c")
    b = table.create("infer", {"model": "org/b", "max_tokens": 8}, "c")
    whole = table.changes(None, limit=10)
    assert whole.reset and [r["job_id"] for r in whole.rows] == [b.job_id, a.job_id]
    assert whole.rows[1]["model"] == "org/a" and whole.rows[1]["hive_id"] == "h1"
    assert whole.rows[0]["max_tokens"] == 8 and "result" not in whole.rows[0]

    await table.transition(a.job_id, JobState.RUNNING)
    await table.emit(a.job_id, Progress(1, 4, 1.0, 3.0, "f"))
    await table.emit(a.job_id, Progress(2, 4, 1.0, 2.0, "f"))
    await table.transition(b.job_id, JobState.RUNNING)
    await table.emit(b.job_id, Token("x", 3))
    table.cancel_requested(b.job_id)
    await table.emit(b.job_id, Narration("w", "step", "a line"))  # not on the board
    since = table.changes(whole.seq, limit=10)
    assert not since.reset and since.seq > whole.seq
    assert [r["job_id"] for r in since.rows] == [a.job_id, b.job_id]  # each once, oldest change first
    assert since.rows[0]["progress"]["bytes_done"] == 2 and since.rows[0]["state"] == "running"
    assert since.rows[1]["tokens"] == 3 and since.rows[1]["cancel_requested"] is True
    assert table.changes(since.seq, limit=10).rows == []


async def test_a_board_watcher_waits_for_a_change_and_a_lost_one_starts_over():
    table = JobTable()
    job = table.create("hive_list", {}, "c")
    seq = table.changes(None, limit=10).seq
    started = asyncio.get_running_loop().time()
    assert (await table.wait_changes(seq, limit=10, poll_s=0.05)).rows == []
    assert asyncio.get_running_loop().time() - started >= 0.04

    waiting = asyncio.create_task(table.wait_changes(seq, limit=10, poll_s=5))
    await asyncio.sleep(0.01)
    await table.transition(job.job_id, JobState.CANCELLED)
    changed = await asyncio.wait_for(waiting, 1)
    assert [r["state"] for r in changed.rows] == ["cancelled"]
    # An id from before a restart (ahead of this table) is answered with the whole board.
    assert table.changes(changed.seq + 100, limit=10).reset


async def test_the_board_tells_of_forgotten_jobs():
    table = JobTable(retain=1)
    first = table.create("hive_list", {}, "c")
    await table.transition(first.job_id, JobState.CANCELLED)
    seq = table.changes(None, limit=10).seq
    second = table.create("hive_list", {}, "c")
    since = table.changes(seq, limit=10)
    assert since.forgotten == [first.job_id]
    assert [r["job_id"] for r in since.rows] == [second.job_id]


def test_a_board_position_of_another_table_gets_the_whole_board():
    table, other = JobTable(), JobTable()
    table.create("hive_list", {}, "c")
    seq = table.changes(None, limit=10).seq
    assert not table.changes(seq, limit=10, epoch=table.epoch).reset
    assert table.changes(seq, limit=10, epoch=other.epoch).reset


async def test_an_empty_board_is_waited_on_not_sent_again():
    table = JobTable()
    first = table.changes(None, limit=10)
    assert first.reset and first.rows == [] and first.seq == 0
    again = await table.wait_changes(first.seq, limit=10, poll_s=0.01, epoch=first.epoch)
    assert not again.reset


def test_a_board_row_takes_max_tokens_from_an_openai_request_too():
    table = JobTable()
    chat = {"model": "m", "messages": [], "max_completion_tokens": 7, "max_tokens": 9}
    rows = [
        table.row(table.create("infer", request, "c").job_id)["max_tokens"]
        for request in (
            {"model": "m", "openai": {"api": "chat", "request": chat}},
            {"model": "m", "openai": {"api": "completions", "request": {"max_tokens": 5}}},
            {"model": "m", "openai": {"api": "completions", "request": {"max_tokens": "5"}}},
            {"model": "m", "max_tokens": True},
            {"model": "m", "max_tokens": 3},
        )
    ]
    assert rows == [7, 5, None, None, 3]
