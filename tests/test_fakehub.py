"""The fake hub speaks enough of the real protocol for huggingface_hub itself."""

from __future__ import annotations

import hashlib
import pathlib
import time
from collections.abc import Iterator

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from tests.fakehub import FakeHub

SMALL = b'{"hidden_size": 64}'
BIG = bytes(range(256)) * 8192  # 2 MiB, LFS


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        hub.add_repo("org/tiny", {"config.json": SMALL, "weights/model.bin": BIG})
        yield hub


def test_snapshot_download_fetches_every_file(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    folder = pathlib.Path(snapshot_download("org/tiny", endpoint=hub.url, cache_dir=tmp_path))
    assert (folder / "config.json").read_bytes() == SMALL
    assert (folder / "weights" / "model.bin").read_bytes() == BIG
    blobs = {p.name for p in (tmp_path / "models--org--tiny" / "blobs").iterdir()}
    assert hashlib.sha256(BIG).hexdigest() in blobs
    assert hashlib.sha1(b"blob %d\0" % len(SMALL) + SMALL).hexdigest() in blobs
    assert hub.count("HEAD", "/resolve/") == 2


def test_hf_hub_download_and_api(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    path = hf_hub_download("org/tiny", "weights/model.bin", endpoint=hub.url, cache_dir=tmp_path)
    assert pathlib.Path(path).read_bytes() == BIG
    api = HfApi(endpoint=hub.url, token="t")
    info = api.model_info("org/tiny", revision="main")
    assert api.model_info("org/tiny", revision=info.sha).sha == info.sha
    tree = {f.path: f for f in api.list_repo_tree("org/tiny", revision=info.sha, recursive=True)}
    assert tree["weights/model.bin"].lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/tiny", "nope.txt", endpoint=hub.url, cache_dir=tmp_path)


def test_range_drop_and_throttle(hub: FakeHub) -> None:
    url = f"{hub.url}/org/tiny/resolve/main/weights/model.bin"
    with httpx.Client() as client:
        r = client.get(url, headers={"Range": "bytes=100-299"})
        assert (r.status_code, r.content) == (206, BIG[100:300])
        assert r.headers["Content-Range"] == f"bytes 100-299/{len(BIG)}"

        hub.inject_drop("org/tiny", "weights/model.bin", after_bytes=5000)
        got = bytearray()
        with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", url) as r:
            for chunk in r.iter_bytes():
                got += chunk
        assert bytes(got) == BIG[:5000]

        hub.throttle_bps = 4 << 20
        t0 = time.monotonic()
        r = client.get(url, headers={"Range": f"bytes=0-{(1 << 20) - 1}"})
        elapsed = time.monotonic() - t0
    assert r.content == BIG[: 1 << 20]
    assert 0.2 <= elapsed < 1.0  # 1 MiB at 4 MiB/s is 0.25 s
