import json

from actors.core import JobState, JobTable
from actors.events import Narration, Result
from actors.store import FILE, JobStore


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
    assert [e.kind for e in again.events(record.job_id)] == ["narration", "result"]
    new = await again.emit(record.job_id, Narration("x", "y", "after"))
    assert new is None  # terminal jobs stay as they were


async def test_unfinished_jobs_are_failed_as_worker_died(tmp_path):
    store, table = JobStore(tmp_path), JobTable()
    record = table.create("model_download", {}, "cid")
    store.save(record, [])
    saved, events = JobStore(tmp_path).load()[0]
    assert saved["state"] == "failed"
    assert saved["error"]["code"] == "WORKER_DIED"
    assert events[-1].kind == "error" and events[-1].seq == 1


def test_load_compacts_and_skips_garbage(tmp_path):
    store, table = JobStore(tmp_path, keep=2), JobTable()
    for _ in range(3):
        store.save(table.create("hive_list", {}, "c"), [])
    with (tmp_path / FILE).open("a") as f:
        f.write("not json\n")
    assert len(JobStore(tmp_path, keep=2).load()) == 2
    lines = (tmp_path / FILE).read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_no_state_dir_means_no_memory():
    store = JobStore(None)
    store.save(JobTable().create("hive_list", {}, "c"), [])
    assert store.load() == []
