"""The registry's journal: what survives a restart, how it stays bounded, and that nothing
in it (or wrong with its folder) keeps a registry from starting. No Ray."""

import json

from actors.core.errors import JobCancelled
from actors.core.events import Narration, Result
from actors.core.store import FILE, JobStore
from actors.core.table import JobRecord, JobState, JobTable


async def _finished(table: JobTable, store: JobStore, operation: str = "hive_list") -> JobRecord:
    record = table.create(operation, {"operation": operation}, "cid")
    store.save(record, [])
    await table.transition(record.job_id, JobState.RUNNING)
    await table.emit(record.job_id, Result({"n": 1}))
    await table.transition(record.job_id, JobState.COMPLETED)
    store.save(record, table.events(record.job_id))
    return record


def _lines(tmp_path) -> list[str]:
    return (tmp_path / FILE).read_text().splitlines()


async def test_finished_jobs_come_back_with_their_events(tmp_path):
    store, table = JobStore(tmp_path), JobTable()
    record = table.create("model_list", {"operation": "model_list"}, "cid-1")
    store.save(record, [])
    await table.transition(record.job_id, JobState.RUNNING)
    await table.emit(record.job_id, Narration("hive", "model_list", "listing"))
    await table.emit(record.job_id, Result({"models": []}))
    await table.transition(record.job_id, JobState.COMPLETED)
    store.save(record, table.events(record.job_id))

    again = JobTable()
    for saved, events in JobStore(tmp_path).load():
        again.restore(saved, events)
    back = again.get(record.job_id)
    assert back is not None and back.to_dict() == record.to_dict()
    assert [e.event.kind for e in again.events(record.job_id)] == ["narration", "result"]
    new = await again.emit(record.job_id, Narration("x", "y", "after"))
    assert new is None  # terminal jobs stay as they were


async def test_unfinished_jobs_are_failed_as_worker_died(tmp_path):
    store, table = JobStore(tmp_path), JobTable()
    record = table.create("model_download", {}, "cid")
    store.save(record, [])
    saved, events = JobStore(tmp_path).load()[0]
    assert saved["state"] == "failed"
    assert saved["error"]["code"] == "WORKER_DIED"
    assert events[-1].event.kind == "error" and events[-1].id == 1


async def test_load_compacts_and_skips_garbage(tmp_path):
    store, table = JobStore(tmp_path, keep=2), JobTable()
    for _ in range(3):
        await _finished(table, store)
    with (tmp_path / FILE).open("a") as f:
        f.write("not json\n")
    assert len(JobStore(tmp_path, keep=2).load()) == 2
    lines = (tmp_path / FILE).read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_no_state_dir_means_no_memory():
    store = JobStore(None)
    store.save(JobTable().create("hive_list", {}, "c"), [])
    assert store.load() == []


# -- bounded, durable, and never in the way of a start ----------------------------------------


async def test_every_job_within_keep_survives_and_the_journal_stays_bounded(tmp_path):
    store, table = JobStore(tmp_path, keep=5), JobTable()
    assert store.load() == []
    running = table.create("model_download", {"operation": "model_download"}, "long")
    store.save(running, [])  # a long job: its only line must outlive the compactions
    finished = []
    for _ in range(40):
        finished.append(await _finished(table, store))
        assert len(_lines(tmp_path)) <= 2 * 5
    store.close()

    back = JobStore(tmp_path, keep=5).load()
    ids = [saved["job_id"] for saved, _ in back]
    assert ids == [running.job_id, *(r.job_id for r in finished[-5:])]  # oldest first
    for (saved, events), record in zip(back[1:], finished[-5:], strict=True):
        assert saved == {**record.to_dict(), "request": record.request}
        assert [e.event.kind for e in events] == ["result"]
    assert back[0][0]["state"] == "failed" and back[0][0]["error"]["code"] == "WORKER_DIED"


async def test_a_torn_or_corrupt_line_never_keeps_the_registry_from_starting(tmp_path, caplog):
    store, table = JobStore(tmp_path), JobTable()
    good = await _finished(table, store)
    whole = (tmp_path / FILE).read_bytes().splitlines()[-1]
    entry = json.loads(whole)
    with (tmp_path / FILE).open("ab") as f:
        for bad in (
            b"not json",
            b"\xff\xfe\x00 not utf-8",
            b"[]",
            b'{"record": {}, "events": []}',
            json.dumps({**entry, "record": {**entry["record"], "state": "exploded"}}).encode(),
            json.dumps({**entry, "record": {**entry["record"], "created_at": "x"}}).encode(),
            json.dumps({**entry, "events": [[1, "result"]]}).encode(),
            json.dumps({**entry, "events": "nope"}).encode(),
        ):
            f.write(bad + b"\n")
        f.write(whole[: len(whole) // 2])  # a write the process did not live to finish

    store = JobStore(tmp_path)
    back = store.load()
    assert [saved["job_id"] for saved, _ in back] == [good.job_id]
    assert sum("is not a job line" in r.getMessage() for r in caplog.records) == 9
    later = await _finished(JobTable(), store)  # appends after the rewrite are whole lines
    store.close()
    assert [s["job_id"] for s, _ in JobStore(tmp_path).load()] == [good.job_id, later.job_id]


def test_an_unusable_state_dir_leaves_the_registry_without_memory(tmp_path, caplog):
    taken = tmp_path / "a-file"
    taken.write_text("")
    store = JobStore(taken)
    assert store.load() == [] and store.path is None
    store.save(JobTable().create("hive_list", {}, "c"), [])  # a no-op, not an error
    assert "will not remember its jobs" in caplog.text


def test_a_disk_error_on_save_is_logged_not_raised(tmp_path, caplog):
    store = JobStore(tmp_path)
    store.load()
    (tmp_path / FILE).unlink()
    (tmp_path / FILE).mkdir()  # every append now fails
    for _ in range(3):
        store.save(JobTable().create("hive_list", {}, "c"), [])
    assert caplog.text.count("cannot write the job journal") == 1


def test_one_registry_at_a_time_per_state_dir(tmp_path, caplog):
    first = JobStore(tmp_path)
    first.load()
    second = JobStore(tmp_path, lock_wait_s=0.2)
    assert second.load() == [] and second.path is None
    assert "another rbee registry is using" in caplog.text
    first.close()
    third = JobStore(tmp_path, lock_wait_s=0.2)
    third.load()
    assert third.path == tmp_path / FILE
    third.close()


async def test_settle_ends_the_unfinished_jobs_of_a_registry_that_went_away(tmp_path):
    store, table = JobStore(tmp_path), JobTable()
    done = await _finished(table, store)
    running = table.create("infer", {"operation": "infer"}, "c")
    store.save(running, [])
    ended = JobStore(tmp_path).settle(JobState.CANCELLED, JobCancelled("rbee shut down"))
    assert ended == [running.job_id]
    back = {saved["job_id"]: (saved, events) for saved, events in JobStore(tmp_path).load()}
    assert back[done.job_id][0]["state"] == "completed"
    saved, events = back[running.job_id]
    assert saved["state"] == "cancelled" and saved["error"]["code"] == "CANCELLED"
    assert saved["finished_at"] is not None and events[-1].event.kind == "error"


async def test_a_forgotten_job_stays_forgotten_across_loads_and_compactions(tmp_path, caplog):
    store, table = JobStore(tmp_path, keep=2), JobTable()
    kept, gone = await _finished(table, store), await _finished(table, store)
    assert table.forget(gone.job_id) and table.get(gone.job_id) is None
    store.forget(gone.job_id)
    assert json.loads(_lines(tmp_path)[-1]) == {"forget": gone.job_id}

    loaded = [saved["job_id"] for saved, _ in JobStore(tmp_path, keep=2).load()]
    assert loaded == [kept.job_id] and "not a job line" not in caplog.text
    # The load rewrote the journal: the forgotten job's lines are gone with the one that
    # forgot it, and jobs saved after it compact as any.
    assert all(gone.job_id not in line for line in _lines(tmp_path))
    store = JobStore(tmp_path, keep=2)
    store.load()
    more = [await _finished(table, store) for _ in range(4)]
    store.forget(more[-1].job_id)
    store.forget(more[-1].job_id)  # (twice: one line)
    store.close()  # (its lock: one registry at a time)
    back = [saved["job_id"] for saved, _ in JobStore(tmp_path, keep=2).load()]
    assert more[-1].job_id not in back and back == [m.job_id for m in more[1:3]]


async def test_a_job_is_forgotten_only_once_it_has_finished():
    table = JobTable()
    record = table.create("model_download", {}, "cid")
    assert not table.forget(record.job_id) and table.get(record.job_id) is not None
    assert not table.forget("job-none")
    await table.transition(record.job_id, JobState.CANCELLED)
    assert table.forget(record.job_id)
    assert record.job_id in table.changes(0, 100).forgotten


async def test_a_tokens_frames_come_back_with_it(tmp_path):
    """A background response's stream is replayed from its tokens' frames after a restart."""
    from actors.core.events import Token

    store, table = JobStore(tmp_path), JobTable()
    record = table.create("infer", {}, "cid")
    store.save(record, [])
    await table.transition(record.job_id, JobState.RUNNING)
    await table.emit(record.job_id, Token("a", 1, wire="event: x\\ndata: {}\\n\\n"))
    await table.emit(record.job_id, Token("b", 2))
    await table.transition(record.job_id, JobState.COMPLETED)
    store.save(record, table.events(record.job_id))
    (_, events), = JobStore(tmp_path).load()
    assert [(e.event.text, e.event.wire) for e in events] == [("a", "event: x\\ndata: {}\\n\\n"), ("b", None)]
