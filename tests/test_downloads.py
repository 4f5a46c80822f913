"""model_download end to end: real Ray, the real Serve app, a real HTTP fake hub."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download

from tests.helpers import job, read_sse, submit, wait_for, wait_state

MiB = 1 << 20


def _repo(hub, files: dict[str, bytes]) -> str:
    repo = f"org/m-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo, files)
    return repo


def _blobs(cache_dir: Path, repo: str) -> list[Path]:
    folder = cache_dir / f"models--{repo.replace('/', '--')}" / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_full_download_lands_where_huggingface_hub_reads_it(api, hub, cache_dir):
    files = {
        "config.json": b'{"model_type": "llama"}',
        "weights/model.safetensors": os.urandom(3 * MiB + 17),
        "README.md": b"# tiny\n",
    }
    repo = _repo(hub, files)
    job_id = submit(
        api, {"operation": "model_download", "model": repo}, **{"X-Correlation-Id": "dl-1"}
    )
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=60)
    assert stream.sentinel == "[DONE]"
    progress = stream.of("progress")
    assert progress and progress[-1]["bytes_done"] == progress[-1]["bytes_total"] == sum(
        len(v) for v in files.values()
    )
    assert all(
        {"bytes_done", "bytes_total", "rate_bps", "eta_s", "file"} <= set(p) for p in progress
    )
    assert all(n["correlation_id"] == "dl-1" for n in stream.of("narration"))
    result = stream.of("result")[0]
    assert result["model"] == repo and sorted(result["files"]) == sorted(files)
    record = job(api, job_id)
    assert record["state"] == "completed" and record["result"] == result

    folder = snapshot_download(repo, cache_dir=cache_dir, local_files_only=True)
    for name, data in files.items():
        assert (Path(folder) / name).read_bytes() == data
    cached = {r.repo_id: r for r in scan_cache_dir(cache_dir).repos}
    assert cached[repo].nb_files == len(files)
    assert not [p for p in _blobs(cache_dir, repo) if p.name.endswith(".incomplete")]


def test_globs_pick_files_and_catalog_ops(api, hub, cache_dir):
    repo = _repo(hub, {"a.json": b"{}", "b.bin": b"x" * 2048, "sub/c.json": b"[]"})
    job_id = submit(api, {"operation": "model_download", "model": repo, "files": ["*.json"]})
    assert read_sse(api, f"/v1/jobs/{job_id}/stream").sentinel == "[DONE]"
    got = wait_state(api, submit(api, {"operation": "model_get", "model": repo}), "completed")
    paths = [f["path"] for f in got["result"]["revisions"][0]["files"]]
    assert paths == ["a.json", "sub/c.json"]
    listed = wait_state(api, submit(api, {"operation": "model_list"}), "completed")
    assert repo in [m["model"] for m in listed["result"]["models"]]
    deleted = wait_state(
        api, submit(api, {"operation": "model_delete", "model": repo}), "completed"
    )
    assert deleted["result"]["deleted"] is True
    assert not (cache_dir / f"models--{repo.replace('/', '--')}").exists()


def test_no_matching_glob_is_model_not_found(api, hub):
    repo = _repo(hub, {"a.json": b"{}"})
    job_id = submit(api, {"operation": "model_download", "model": repo, "files": ["*.gguf"]})
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream")
    assert stream.of("error")[0]["code"] == "MODEL_NOT_FOUND"


def test_resume_after_a_dropped_connection_fetches_only_the_missing_bytes(api, hub, cache_dir):
    data = os.urandom(2 * MiB)
    repo = _repo(hub, {"model.bin": data})
    hub.inject_drop(repo, "model.bin", after_bytes=MiB + 5)
    job_id = submit(api, {"operation": "model_download", "model": repo})
    assert read_sse(api, f"/v1/jobs/{job_id}/stream").sentinel == "[DONE]"
    gets = [r for r in hub.requests if r.method == "GET" and f"{repo}/resolve/" in r.path]
    assert len(gets) == 2
    assert gets[1].range == f"bytes={MiB + 5}-"
    blob = _blobs(cache_dir, repo)[0]
    assert blob.read_bytes() == data


def test_a_corrupted_file_fails_the_job_and_is_not_kept(api, hub, cache_dir):
    repo = _repo(hub, {"model.bin": os.urandom(MiB)})
    hub.inject_corrupt(repo, "model.bin")
    job_id = submit(api, {"operation": "model_download", "model": repo})
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream")
    error = stream.of("error")[-1]
    assert error["code"] == "DOWNLOAD_FAILED" and error["retriable"] is False
    assert stream.sentinel.startswith("[ERROR]")
    assert job(api, job_id)["state"] == "failed"
    assert _blobs(cache_dir, repo) == []


def test_two_jobs_for_the_same_files_share_one_transfer(api, hub, cache_dir):
    data = os.urandom(2 * MiB)
    repo = _repo(hub, {"model.bin": data})
    hub.throttle_bps = 4 * MiB
    try:
        first = submit(api, {"operation": "model_download", "model": repo})
        wait_for(lambda: (job(api, first)["progress"] or {}).get("bytes_done", 0) > 0)
        second = submit(api, {"operation": "model_download", "model": repo})
        for job_id in (first, second):
            assert read_sse(api, f"/v1/jobs/{job_id}/stream").sentinel == "[DONE]"
    finally:
        hub.throttle_bps = None
    assert hub.count("GET", f"{repo}/resolve/") == 1
    assert (
        hashlib.sha256(_blobs(cache_dir, repo)[0].read_bytes()).digest()
        == hashlib.sha256(data).digest()
    )


def test_two_watchers_see_the_same_stream(api, hub):
    repo = _repo(hub, {"model.bin": os.urandom(MiB)})
    hub.throttle_bps = 2 * MiB
    try:
        job_id = submit(api, {"operation": "model_download", "model": repo})
        seen = {}

        def watch(name):
            seen[name] = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=60)

        threads = [threading.Thread(target=watch, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(70)
    finally:
        hub.throttle_bps = None
    assert seen["a"].events == seen["b"].events
    assert seen["a"].sentinel == seen["b"].sentinel == "[DONE]"
    assert len(seen["a"].of("progress")) >= 2


def test_progress_heartbeat_at_least_every_second(api, hub):
    repo = _repo(hub, {"model.bin": os.urandom(3 * MiB)})
    hub.throttle_bps = MiB
    try:
        job_id = submit(api, {"operation": "model_download", "model": repo})
        stamps: list[float] = []

        def stamp(event):
            if event["event"] == "progress":
                stamps.append(time.monotonic())

        read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=60, on_event=stamp)
    finally:
        hub.throttle_bps = None
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(stamps) >= 3
    assert max(gaps) < 1.5


def test_a_file_name_from_the_hub_that_leaves_the_cache_is_refused(api, hub, cache_dir):
    repo = _repo(hub, {"ok.json": b"{}", "../../escape.txt": b"pwned"})
    job_id = submit(api, {"operation": "model_download", "model": repo})
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream")
    error = stream.of("error")[-1]
    assert error["code"] == "DOWNLOAD_FAILED" and error["retriable"] is False
    assert "../../escape.txt" in error["message"]  # says what the hub sent
    assert not list(cache_dir.parent.rglob("escape.txt"))


def test_url_vendor_downloads_a_plain_file(api, hub, cache_dir):
    data = os.urandom(100_000)
    url = hub.add_file(f"asset-{uuid.uuid4().hex[:6]}.bin", data)
    job_id = submit(
        api, {"operation": "model_download", "model": "local/asset", "vendor": "url", "url": url}
    )
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream")
    assert stream.sentinel == "[DONE]", stream.events
    path = Path(stream.of("result")[0]["path"]) / url.rsplit("/", 1)[1]
    assert path.read_bytes() == data


def test_resume_after_the_download_actor_died(api, hub, cache_dir):
    """kill -9 of the DownloadActor mid-transfer: the job fails WORKER_DIED (retriable), its
    stream ends [ERROR], the partial file stays, and the next download resumes from it."""
    import signal

    from actors.naming import download_name
    from tests.helpers import pid_of

    data = os.urandom(3 * MiB)
    repo = _repo(hub, {"model.bin": data})
    hub.throttle_bps = MiB
    try:
        first = submit(api, {"operation": "model_download", "model": repo})
        wait_for(lambda: (job(api, first)["progress"] or {}).get("bytes_done", 0) >= MiB)
        hives = wait_state(api, submit(api, {"operation": "hive_list"}), "completed")
        hive_id = hives["result"]["hives"][0]["hive_id"]
        os.kill(pid_of(download_name(hive_id)), signal.SIGKILL)
        died = read_sse(api, f"/v1/jobs/{first}/stream", deadline_s=30)
    finally:
        hub.throttle_bps = None
    assert died.sentinel is not None and died.sentinel.startswith("[ERROR]")
    error = died.of("error")[-1]
    assert error["code"] == "WORKER_DIED" and error["retriable"] is True
    assert job(api, first)["state"] == "failed"
    partial = [p for p in _blobs(cache_dir, repo) if p.name.endswith(".incomplete")]
    assert len(partial) == 1
    kept = partial[0].stat().st_size
    assert kept >= MiB

    second = submit(api, {"operation": "model_download", "model": repo})
    assert read_sse(api, f"/v1/jobs/{second}/stream", deadline_s=60).sentinel == "[DONE]"
    last_get = [r for r in hub.requests if r.method == "GET" and f"{repo}/resolve/" in r.path][-1]
    assert last_get.range == f"bytes={kept}-"
    assert [p.read_bytes() == data for p in _blobs(cache_dir, repo)] == [True]


def test_a_download_submitted_while_its_actor_restarts_waits_for_it(api, hub):
    """kill -9 of an idle DownloadActor, and a download at once: Ray is bringing the actor
    back (it answers "restarting"); the job runs on the new one instead of failing."""
    import signal

    from actors.naming import download_name
    from tests.helpers import pid_of

    hives = wait_state(api, submit(api, {"operation": "hive_list"}), "completed")
    name = download_name(hives["result"]["hives"][0]["hive_id"])
    for _ in range(3):
        wait_for(lambda: _alive_pid(name) is not None, timeout=60)
        repo = _repo(hub, {"model.bin": os.urandom(64 * 1024)})
        os.kill(pid_of(name), signal.SIGKILL)
        job_id = submit(api, {"operation": "model_download", "model": repo})
        assert read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=60).sentinel == "[DONE]"
        assert job(api, job_id)["state"] == "completed"


def _alive_pid(name: str) -> int | None:
    from tests.helpers import pid_of

    try:
        return pid_of(name)
    except AssertionError:
        return None


@pytest.mark.parametrize("first", ["rbee", "huggingface_hub"])
def test_huggingface_hub_and_rbee_fetch_one_blob_into_one_cache_at_once(api, hub, cache_dir, first):
    """Both take the blob's ``.locks/`` lock: whichever writes, the other waits and uses it."""
    data = os.urandom(12 * MiB)  # over parallel_min_size: rbee pre-sizes a partial for ranges
    repo = _repo(hub, {"model.safetensors": data})
    digest = hashlib.sha256(data).hexdigest()
    theirs: dict[str, object] = {}

    def huggingface_hub_download() -> None:
        try:
            theirs["path"] = hf_hub_download(
                repo, "model.safetensors", cache_dir=cache_dir, endpoint=hub.url
            )
        except Exception as exc:  # reported by the assertion below
            theirs["error"] = exc

    other = threading.Thread(target=huggingface_hub_download)
    hub.throttle_bps = 4 * MiB  # each response at most 4 MiB/s: both run for seconds
    try:
        if first == "rbee":
            job_id = submit(api, {"operation": "model_download", "model": repo})
            wait_for(lambda: (job(api, job_id)["progress"] or {}).get("bytes_done", 0) > 0)
            other.start()
        else:
            other.start()
            wait_for(lambda: hub.count("GET", f"{repo}/resolve/") > 0)
            job_id = submit(api, {"operation": "model_download", "model": repo})
        stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=60)
        other.join(60)
    finally:
        hub.throttle_bps = None
    assert not other.is_alive() and "error" not in theirs, theirs
    assert stream.sentinel == "[DONE]", stream.events
    ours = Path(stream.of("result")[0]["path"]) / "model.safetensors"
    for path in (ours, Path(str(theirs["path"]))):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert [p.name for p in _blobs(cache_dir, repo)] == [digest]  # one blob, no partial left
    # Only one of the two moved the bytes: the other found the blob done under the lock.
    sent = sum(
        r.body_bytes_sent
        for r in hub.requests
        if f"{repo}/resolve/" in r.path and r.method == "GET"
    )
    assert sent < 2 * len(data)
