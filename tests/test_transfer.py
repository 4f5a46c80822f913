"""The byte transfer against a real fake hub: resume, retries, integrity, cancel, dedupe."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import pathlib
import pickle
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import filelock
import httpx
import pytest

from actors.adapters.transfer import BandwidthLimiter, Downloader, FileSpec
from actors.core.errors import BadHubAnswer, DownloadFailed, IntegrityError
from tests.fakehub import FakeHub

REPO = "org/tiny"
DATA = hashlib.sha256(b"seed").digest() * 65536  # 2 MiB of non-repeating-looking bytes
SMALL = b'{"vocab_size": 32}'


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        hub.add_repo(REPO, {"model.bin": DATA, "config.json": SMALL})
        yield hub


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def lfs_spec(hub: FakeHub, tmp_path: pathlib.Path, data: bytes = DATA) -> FileSpec:
    etag = hashlib.sha256(data).hexdigest()
    return FileSpec(
        url=f"{hub.url}/{REPO}/resolve/main/model.bin",
        dest=tmp_path / "blobs" / etag,
        size=len(data),
        sha256=etag,
    )


def partial_of(spec: FileSpec) -> pathlib.Path:
    return spec.dest.with_name(spec.dest.name + ".incomplete")


def ranges(hub: FakeHub) -> list[str | None]:
    return [r.range for r in hub.requests if r.method == "GET"]


async def test_fetch_lands_under_final_name_only_when_complete(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    spec = lfs_spec(hub, tmp_path)
    seen: list[int] = []

    def on_bytes(n: int) -> None:
        assert not spec.dest.exists()
        assert partial_of(spec).stat().st_size == n
        seen.append(n)

    assert await Downloader(client).fetch(spec, on_bytes) == spec.dest
    assert spec.dest.read_bytes() == DATA
    assert not partial_of(spec).exists()
    assert seen == sorted(seen) and seen[-1] == len(DATA)
    assert ranges(hub) == [None]


async def test_small_file_checked_with_git_sha1(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    oid = hashlib.sha1(b"blob %d\0" % len(SMALL) + SMALL).hexdigest()
    spec = FileSpec(
        url=f"{hub.url}/{REPO}/resolve/main/config.json",
        dest=tmp_path / oid,
        size=len(SMALL),
        git_sha1=oid,
    )
    assert (await Downloader(client).fetch(spec)).read_bytes() == SMALL

    bad = FileSpec(url=spec.url, dest=tmp_path / "bad", size=len(SMALL), git_sha1="0" * 40)
    with pytest.raises(IntegrityError):
        await Downloader(client).fetch(bad)


async def test_existing_dest_makes_no_request(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    spec = lfs_spec(hub, tmp_path)
    spec.dest.parent.mkdir(parents=True)
    spec.dest.write_bytes(DATA)
    assert await Downloader(client).fetch(spec) == spec.dest
    assert hub.count() == 0


async def test_plain_url_without_size_or_checksum(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    url = hub.add_file("weights.gguf", DATA[:5000])
    path = await Downloader(client).fetch(FileSpec(url=url, dest=tmp_path / "w", size=None))
    assert path.read_bytes() == DATA[:5000]


async def test_resumes_an_existing_partial_with_range(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    spec = lfs_spec(hub, tmp_path)
    spec.dest.parent.mkdir(parents=True)
    partial_of(spec).write_bytes(DATA[:700_000])
    seen: list[int] = []
    await Downloader(client).fetch(spec, seen.append)
    assert spec.dest.read_bytes() == DATA
    assert ranges(hub) == ["bytes=700000-"]
    assert seen[0] > 700_000 and seen[-1] == len(DATA)


async def test_dropped_connection_is_retried_from_the_bytes_on_disk(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    hub.inject_drop(REPO, "model.bin", after_bytes=300_000, times=2)
    spec = lfs_spec(hub, tmp_path)
    await Downloader(client, retry_backoff_s=0.01).fetch(spec)
    assert spec.dest.read_bytes() == DATA
    assert ranges(hub) == [None, "bytes=300000-", "bytes=600000-"]


async def test_exhausted_retries_keep_the_partial_for_a_later_resume(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    hub.inject_drop(REPO, "model.bin", after_bytes=100_000)
    spec = lfs_spec(hub, tmp_path)
    with pytest.raises(DownloadFailed) as caught:
        await Downloader(client, retries=0).fetch(spec)
    assert caught.value.retriable and not isinstance(caught.value, IntegrityError)
    assert isinstance(caught.value.__cause__, httpx.TransportError)
    assert pickle.loads(pickle.dumps(caught.value)).retriable
    assert partial_of(spec).stat().st_size == 100_000 and not spec.dest.exists()

    await Downloader(client).fetch(spec)
    assert spec.dest.read_bytes() == DATA
    assert ranges(hub) == [None, "bytes=100000-"]


async def test_server_errors_are_retried_then_reported(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    hub.inject_status(REPO, "model.bin", 500, times=10)
    with pytest.raises(DownloadFailed) as caught:
        await Downloader(client, retries=2, retry_backoff_s=0.01).fetch(lfs_spec(hub, tmp_path))
    assert caught.value.retriable
    assert hub.count("GET") == 3

    hub.inject_status(REPO, "model.bin", 503, times=1)
    await Downloader(client, retry_backoff_s=0.01).fetch(lfs_spec(hub, tmp_path))


async def test_missing_file_is_not_retried(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    spec = FileSpec(url=f"{hub.url}/{REPO}/resolve/main/nope.bin", dest=tmp_path / "x", size=10)
    with pytest.raises(DownloadFailed) as caught:
        await Downloader(client).fetch(spec)
    assert not caught.value.retriable
    assert hub.count("GET") == 1


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("resumed", [False, True])
async def test_wrong_bytes_raise_integrity_error_and_keep_nothing(
    hub: FakeHub,
    client: httpx.AsyncClient,
    tmp_path: pathlib.Path,
    parallel: bool,
    resumed: bool,
) -> None:
    hub.inject_corrupt(REPO, "model.bin")
    spec = lfs_spec(hub, tmp_path)
    if resumed:
        spec.dest.parent.mkdir(parents=True)
        partial_of(spec).write_bytes(DATA[:1000])
    downloader = Downloader(client, parallel_min_size=1 if parallel else 1 << 30)
    with pytest.raises(IntegrityError) as caught:
        await downloader.fetch(spec)
    assert not caught.value.retriable
    assert not spec.dest.exists() and not partial_of(spec).exists()
    assert list(spec.dest.parent.iterdir()) == []


async def test_big_files_go_as_parallel_ranges(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    spec = lfs_spec(hub, tmp_path)
    seen: list[int] = []
    await Downloader(client, parallel_min_size=1 << 20, segments=4).fetch(spec, seen.append)
    assert spec.dest.read_bytes() == DATA
    quarter = len(DATA) // 4
    assert sorted(ranges(hub), key=lambda r: int(r.split("=")[1].split("-")[0])) == [
        f"bytes={i * quarter}-{(i + 1) * quarter - 1}" for i in range(4)
    ]
    assert seen == sorted(seen) and seen[-1] == len(DATA)
    assert list(spec.dest.parent.iterdir()) == [spec.dest]


async def test_parallel_transfer_resumes_from_its_sidecar(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    hub.inject_drop(REPO, "model.bin", after_bytes=200_000, times=4)
    spec = lfs_spec(hub, tmp_path)
    downloader = Downloader(client, parallel_min_size=1 << 20, segments=4, retries=0)
    with pytest.raises(DownloadFailed):
        await downloader.fetch(spec)
    sidecar = partial_of(spec).with_name(partial_of(spec).name + ".segments")
    plan = json.loads(sidecar.read_text())
    assert plan["size"] == len(DATA) and any(done > 0 for _, _, done in plan["segments"])
    hub.clear_log()

    await downloader.fetch(spec)
    assert spec.dest.read_bytes() == DATA
    expected = {f"bytes={a + done}-{b - 1}" for a, b, done in plan["segments"] if a + done < b}
    assert set(ranges(hub)) == expected
    assert not sidecar.exists()


@pytest.mark.parametrize("parallel", [False, True])
async def test_cancel_stops_writing_at_once_and_removes_the_partial(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path, parallel: bool
) -> None:
    hub.throttle_bps = 1 << 20
    spec = lfs_spec(hub, tmp_path)
    calls: list[tuple[float, int]] = []
    downloader = Downloader(client, parallel_min_size=1 if parallel else 1 << 30)
    started = asyncio.Event()

    def on_bytes(n: int) -> None:
        calls.append((time.monotonic(), n))
        if n >= 200_000:
            started.set()

    task = asyncio.create_task(downloader.fetch(spec, on_bytes))
    await started.wait()
    size_at_cancel = partial_of(spec).stat().st_size
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not partial_of(spec).exists() and not spec.dest.exists()
    assert downloader.in_flight() == 0
    await asyncio.sleep(0.3)
    assert not partial_of(spec).exists()
    assert all(t <= cancelled_at + 0.5 for t, _ in calls)
    assert all(n <= size_at_cancel for t, n in calls if t >= cancelled_at)
    assert list(spec.dest.parent.iterdir()) == []


async def test_concurrent_fetches_of_one_file_share_one_transfer(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    spec = lfs_spec(hub, tmp_path)
    downloader = Downloader(client)
    first: list[int] = []
    second: list[int] = []
    paths = await asyncio.gather(
        downloader.fetch(spec, first.append), downloader.fetch(spec, second.append)
    )
    assert paths == [spec.dest, spec.dest]
    assert first[-1] == second[-1] == len(DATA)
    assert hub.count("GET") == 1


async def test_a_shared_transfer_stops_only_when_every_waiter_cancelled(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    hub.throttle_bps = 8 << 20
    spec = lfs_spec(hub, tmp_path)
    downloader = Downloader(client)
    seen: list[int] = []
    flowing = asyncio.Event()

    def on_bytes(n: int) -> None:
        seen.append(n)
        flowing.set()

    leaver = asyncio.create_task(downloader.fetch(spec))
    stayer = asyncio.create_task(downloader.fetch(spec, on_bytes))
    await flowing.wait()
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    assert downloader.in_flight() == 1
    assert await stayer == spec.dest
    assert spec.dest.read_bytes() == DATA and hub.count("GET") == 1

    other = lfs_spec(hub, tmp_path / "other")
    tasks = [asyncio.create_task(downloader.fetch(other, seen.append)) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert downloader.in_flight() == 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert downloader.in_flight() == 0 and not partial_of(other).exists()


async def test_all_bytes_pass_the_shared_bandwidth_limit(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    downloader = Downloader(client, limiter=BandwidthLimiter(4 << 20))
    started = time.monotonic()
    await downloader.fetch(lfs_spec(hub, tmp_path))
    assert time.monotonic() - started >= 0.4  # 2 MiB at 4 MiB/s is 0.5 s


async def test_limiter_paces_by_its_clock() -> None:
    now = [100.0]
    limiter = BandwidthLimiter(1000, clock=lambda: now[0])
    started = time.monotonic()
    await limiter.acquire(50)  # 50 ms owed
    assert time.monotonic() - started >= 0.04
    now[0] += 10  # idle time earns no burst
    started = time.monotonic()
    await limiter.acquire(20)
    assert time.monotonic() - started >= 0.015


# -- a hostile or full disk, a shared cache -------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 1 MiB tmpfs: a real ENOSPC half-way through a 2 MiB file."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    assert mounted.returncode == 0, f"cannot mount a small tmpfs: {mounted.stderr!r}"
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("parallel", [False, True])
async def test_a_full_disk_fails_the_file_and_keeps_nothing(
    hub: FakeHub, client: httpx.AsyncClient, small_disk: pathlib.Path, parallel: bool
) -> None:
    spec = lfs_spec(hub, small_disk)
    downloader = Downloader(client, parallel_min_size=1 if parallel else 1 << 30)
    with pytest.raises(DownloadFailed) as failed:
        await downloader.fetch(spec)
    assert not isinstance(failed.value, IntegrityError)
    assert failed.value.retriable is False and "No space left" in failed.value.message
    assert list(spec.dest.parent.iterdir()) == []  # the partial went, the disk is free again
    assert downloader.in_flight() == 0


async def test_a_link_planted_under_the_partial_name_is_not_followed(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    spec = lfs_spec(hub, tmp_path / "cache")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    spec.dest.parent.mkdir(parents=True)
    partial_of(spec).symlink_to(victim)
    with pytest.raises(DownloadFailed) as failed:
        await Downloader(client).fetch(spec)
    assert failed.value.retriable is False
    assert victim.read_bytes() == b"keep me"
    assert not spec.dest.exists()


async def test_a_folder_that_resolves_outside_is_refused_before_any_request(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (cache / "models--org--tiny").mkdir(parents=True)
    (cache / "models--org--tiny" / "blobs").symlink_to(outside)
    spec = dataclasses.replace(lfs_spec(hub, cache / "models--org--tiny"), within=cache, lock=None)
    with pytest.raises(BadHubAnswer, match="outside"):
        await Downloader(client).fetch(spec)
    assert list(outside.iterdir()) == []
    assert ranges(hub) == []


async def test_the_huggingface_hub_lock_is_held_while_writing(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    lock_path = (
        tmp_path / ".locks" / "models--org--tiny" / f"{hashlib.sha256(DATA).hexdigest()}.lock"
    )
    spec = dataclasses.replace(lfs_spec(hub, tmp_path), lock=lock_path, within=tmp_path)
    held = filelock.FileLock(lock_path)
    lock_path.parent.mkdir(parents=True)
    with held:  # another program (huggingface_hub) is writing this blob
        task = asyncio.create_task(Downloader(client).fetch(spec))
        await asyncio.sleep(0.5)
        assert not task.done() and ranges(hub) == []  # we wait for it, cancellably
    assert await asyncio.wait_for(task, 10) == spec.dest
    assert spec.dest.read_bytes() == DATA

    # Once the other program has finished the blob, nothing is fetched again.
    hub.clear_log()
    with held:
        task = asyncio.create_task(Downloader(client).fetch(spec))
        await asyncio.sleep(0.2)
    assert await asyncio.wait_for(task, 10) == spec.dest and ranges(hub) == []


async def test_waiting_for_the_lock_is_cancellable(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    lock_path = tmp_path / "held.lock"
    spec = dataclasses.replace(lfs_spec(hub, tmp_path), lock=lock_path)
    with filelock.FileLock(lock_path):
        task = asyncio.create_task(Downloader(client).fetch(spec))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
    assert ranges(hub) == [] and not partial_of(spec).exists()


def test_file_spec_never_shows_its_headers() -> None:
    spec = FileSpec(
        url="http://hub/x",
        dest=pathlib.Path("x"),
        size=1,
        headers={"Authorization": "Bearer s3cr3t"},
    )
    assert "s3cr3t" not in repr(spec) and "s3cr3t" not in str(spec)
