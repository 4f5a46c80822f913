"""The fake hub speaks enough of the real protocol for huggingface_hub itself."""

from __future__ import annotations

import hashlib
import itertools
import pathlib
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from urllib.parse import quote

import httpx
import pytest
from huggingface_hub import HfApi, RepoFile, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

from tests.fakehub import FakeHub, RequestRecord

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


# -- a hostile hub ---------------------------------------------------------------------------
MiB = 1 << 20
TIMEOUT = httpx.Timeout(5.0)


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def last_get(hub: FakeHub) -> RequestRecord:
    return next(r for r in reversed(hub.requests) if r.method == "GET")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_lie_about_a_known_repo(hub: FakeHub) -> None:
    sha = "../../escape"
    hub.lie("org/tiny", sha=sha)
    api = HfApi(endpoint=hub.url, token=False)
    assert api.model_info("org/tiny").sha == sha
    assert api.model_info("org/tiny", revision="no-such-rev").sha == sha
    # the tree stays true (main's), at any revision, the lying sha included
    tree = {f.path for f in api.list_repo_tree("org/tiny", revision=sha, recursive=True)}
    assert tree == {"config.json", "weights", "weights/model.bin"}
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.get(f"{hub.url}/org/tiny/resolve/{quote(sha, safe='')}/weights/model.bin")
        assert (r.status_code, r.content, r.headers["X-Repo-Commit"]) == (200, BIG, sha)

        entry = {"type": "file", "path": "../x", "oid": "zz", "size": 3}
        hub.lie("org/tiny", tree=[entry], siblings=[{"rfilename": "/etc/passwd"}])
        (got,) = api.list_repo_tree("org/tiny", revision="whatever")
        assert isinstance(got, RepoFile)
        assert (got.path, got.blob_id, got.size) == ("../x", "zz", 3)
        info = api.model_info("org/tiny")
        assert info.sha == sha  # an earlier lie stays
        assert [s.rfilename for s in info.siblings or ()] == ["/etc/passwd"]
        r = client.get(f"{hub.url}/org/tiny/resolve/zz/..%2Fx")  # only the lie names it
        assert (r.status_code, r.content) == (200, FakeHub.LIE_BODY)
        assert r.headers["ETag"] == f'"{git_sha1(FakeHub.LIE_BODY)}"'
        r = client.get(f"{hub.url}/org/tiny/resolve/{quote(sha, safe='')}/config.json")
        assert r.content == SMALL  # what add_repo registered still serves
        r = client.get(f"{hub.url}/org/tiny/resolve/zz/nope.bin")
        assert (r.status_code, r.headers["X-Error-Code"]) == (404, "EntryNotFound")


def test_a_lie_whose_download_succeeds(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    body = FakeHub.LIE_BODY
    sha = "ab" * 20
    tree = [{"type": "file", "path": "a/b.bin", "oid": git_sha1(body), "size": len(body)}]
    hub.lie("org/ghost", sha=sha, tree=tree)  # a repo never added
    api = HfApi(endpoint=hub.url, token=False)
    info = api.model_info("org/ghost", revision="v9")
    assert (info.sha, info.siblings) == (sha, [])
    assert [f.path for f in api.list_repo_tree("org/ghost", recursive=True)] == ["a/b.bin"]
    path = hf_hub_download("org/ghost", "a/b.bin", endpoint=hub.url, cache_dir=tmp_path)
    assert pathlib.Path(path).read_bytes() == body
    assert pathlib.Path(path).parent.parent.name == sha
    with httpx.Client(timeout=TIMEOUT) as client:  # a revision with an unquoted "/"
        r = client.get(f"{hub.url}/org/ghost/resolve/refs/pr/1/a/b.bin")
        assert (r.status_code, r.content) == (200, body)


def test_inject_body_endless(hub: FakeHub) -> None:
    url = hub.add_file("endless.bin", BIG)
    hub.inject_body(FakeHub.PLAIN, "endless.bin", "endless")
    with httpx.Client(timeout=TIMEOUT) as client:
        assert client.head(url).headers["Content-Length"] == str(len(BIG))  # HEAD is honest
        got = bytearray()
        with client.stream("GET", url) as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in r.headers
            for chunk in r.iter_raw():
                got += chunk
                if len(got) > len(BIG) + 4 * MiB:
                    break
        assert got[: len(BIG)] == BIG
        # the client went away: the hub noticed and ended the response
        wait_for(lambda: last_get(hub).body_bytes_sent > len(BIG) + 4 * MiB)
        with client.stream("GET", url, headers={"Range": "bytes=10-19"}) as r:
            assert r.status_code == 206
            assert next(r.iter_raw())[:10] == BIG[10:20]


def test_inject_body_longer(hub: FakeHub) -> None:
    url = f"{hub.url}/org/tiny/resolve/main/weights/model.bin"
    hub.inject_body("org/tiny", "weights/model.bin", "longer", times=1)
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.get(url, headers={"Range": "bytes=0-9"})  # Range ignored
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(len(BIG) + MiB)
        assert r.headers["X-Linked-Size"] == str(len(BIG))
        assert len(r.content) == len(BIG) + MiB and r.content[: len(BIG)] == BIG
        wait_for(lambda: last_get(hub).body_bytes_sent == len(BIG) + MiB)
        assert client.get(url).content == BIG  # times=1: honest again


def test_inject_body_longer_unannounced(hub: FakeHub) -> None:
    hub.inject_body("org/tiny", "config.json", "longer_unannounced")
    with socket.create_connection(("127.0.0.1", int(hub.url.rsplit(":", 1)[1])), 5) as s:
        s.sendall(b"GET /org/tiny/resolve/main/config.json HTTP/1.1\r\nHost: hub\r\n\r\n")
        data = bytearray()
        while (chunk := s.recv(1 << 16)) and len(data) < 4 * MiB:
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert f"Content-Length: {len(SMALL)}".encode() in head
    assert body[: len(SMALL)] == SMALL and len(body) == len(SMALL) + MiB  # then it closed
    url = f"{hub.url}/org/tiny/resolve/main/config.json"
    for headers, answer in (({}, (200, SMALL)), ({"Range": "bytes=2-5"}, (206, SMALL[2:6]))):
        # a client each: the junk left on a kept-alive connection breaks its next response
        with httpx.Client(timeout=TIMEOUT) as client:
            r = client.get(url, headers=headers)
            assert (r.status_code, r.content) == answer  # h11 stops at Content-Length


def test_inject_body_no_length(hub: FakeHub) -> None:
    url = f"{hub.url}/org/tiny/resolve/main/weights/model.bin"
    hub.inject_body("org/tiny", "weights/model.bin", "no_length")
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.get(url)
        assert "Content-Length" not in r.headers and "Transfer-Encoding" not in r.headers
        assert (r.headers["Connection"], r.content) == ("close", BIG)
        r = client.get(url, headers={"Range": "bytes=100-199"})
        assert (r.status_code, r.content) == (206, BIG[100:200])


def test_inject_body_gzip_bomb(hub: FakeHub) -> None:
    url = f"{hub.url}/org/tiny/resolve/main/config.json"
    hub.inject_body("org/tiny", "config.json", "gzip_bomb")
    with httpx.Client(timeout=TIMEOUT) as client:
        raw = bytearray()
        with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            length = int(r.headers["Content-Length"])
            assert length < 4 * MiB
            for chunk in r.iter_raw():
                raw += chunk
                assert len(raw) <= length
    assert len(raw) == length
    assert struct.unpack("<I", raw[-4:])[0] == 1 << 30  # gzip's ISIZE: 1 GiB
    out = zlib.decompressobj(31).decompress(bytes(raw[: 64 << 10]), 16 * MiB)
    assert out == bytes(16 * MiB)  # 64 KiB in, 16 MiB (and counting) out


def test_inject_body_stall(hub: FakeHub) -> None:
    hub.inject_body("org/tiny", "weights/model.bin", "stall")
    hub.inject_body("org/tiny", "config.json", "stall")
    stalled = [("weights/model.bin", BIG[:1024]), ("config.json", SMALL[: len(SMALL) // 2])]
    with httpx.Client(timeout=httpx.Timeout(5.0, read=0.3)) as client:
        for path, head in stalled:
            got = bytearray()
            with client.stream("GET", f"{hub.url}/org/tiny/resolve/main/{path}") as r:
                assert r.headers["Content-Length"] == r.headers.get("X-Linked-Size", "19")
                with pytest.raises(httpx.ReadTimeout):
                    for chunk in r.iter_raw():
                        got += chunk
            assert bytes(got) == head
            sent = len(head)  # the client hung up: the hub stopped holding the connection
            wait_for(lambda: last_get(hub).body_bytes_sent == sent)  # noqa: B023


def test_inject_body_redirects(hub: FakeHub) -> None:
    url = f"{hub.url}/org/tiny/resolve/main/config.json"
    hub.inject_body("org/tiny", "config.json", "redirect_loop")
    with httpx.Client(timeout=TIMEOUT) as client:
        assert client.head(url).status_code == 200
        r1 = client.get(url)
        assert r1.status_code == 302
        r2 = client.get(r1.headers["Location"])
        r3 = client.get(r2.headers["Location"])
        assert r2.status_code == r3.status_code == 302
        assert r2.headers["Location"] != r1.headers["Location"] == r3.headers["Location"]
    before = hub.count("GET")
    with httpx.Client(timeout=TIMEOUT, follow_redirects=True, max_redirects=5) as client:
        with pytest.raises(httpx.TooManyRedirects):
            client.get(url)
        assert hub.count("GET") - before == 6

        url = f"{hub.url}/org/tiny/resolve/main/weights/model.bin"
        hub.inject_body("org/tiny", "weights/model.bin", "redirect_outside", times=2)
        with pytest.raises(httpx.UnsupportedProtocol):
            client.get(url)
        r = client.get(url, follow_redirects=False)
        assert (r.status_code, r.headers["Location"]) == (302, "file:///etc/passwd")
        assert client.get(url).content == BIG
    with pytest.raises(ValueError, match="body mode"):
        hub.inject_body("org/tiny", "config.json", "sideways")  # type: ignore[arg-type]


def test_endless_listing(hub: FakeHub) -> None:
    hub.endless_listing("org/tiny")
    api = HfApi(endpoint=hub.url, token=False)
    files = list(itertools.islice(api.list_repo_tree("org/tiny", recursive=True), 300))
    assert [f.path for f in files[:2]] == ["f/0/0.bin", "f/0/1.bin"]
    assert files[-1].path == "f/2/99.bin" and len({f.path for f in files}) == 300
    assert all(
        isinstance(f, RepoFile) and re.fullmatch("[0-9a-f]{40}", f.blob_id) and f.size == 1
        for f in files
    )
    assert hub.count("GET", "/tree/") == 3

    hub.endless_listing("org/tiny", empty_pages=True)
    url = f"{hub.url}/api/models/org/tiny/tree/main?recursive=true"
    with httpx.Client(timeout=TIMEOUT) as client:
        for _ in range(10):
            r = client.get(url)
            assert r.json() == []
            url = r.links["next"]["url"]
    assert url.startswith(hub.url) and "cursor=10" in url and "recursive=true" in url
    assert hub.count("GET", "/tree/") == 13


def test_require_token(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    token = "hf_s3cret"
    hub.require_token(token)
    file_url = hub.add_file("plain.bin", SMALL)
    info_url = f"{hub.url}/api/models/org/tiny"
    with httpx.Client(timeout=TIMEOUT) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": token}):
            for url in (info_url, file_url):
                r = client.get(url, headers=headers)
                assert (r.status_code, r.headers["X-Error-Code"]) == (401, "Unauthorized")
                assert set(r.json()) == {"error"}
                assert token not in r.text and token not in str(r.headers)
        good = {"Authorization": f"Bearer {token}"}
        assert client.get(file_url, headers=good).content == SMALL
    assert HfApi(endpoint=hub.url, token=token).model_info("org/tiny").id == "org/tiny"
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=hub.url, token="nope").model_info("org/tiny")
    assert refused.value.response.status_code == 401
    assert not isinstance(refused.value, RepositoryNotFoundError)
    path = hf_hub_download(
        "org/tiny", "config.json", endpoint=hub.url, cache_dir=tmp_path, token=token
    )
    assert pathlib.Path(path).read_bytes() == SMALL
    assert token not in repr(hub.requests)
    hub.require_token(None)
    assert HfApi(endpoint=hub.url, token=False).model_info("org/tiny").id == "org/tiny"


def test_stop_is_prompt_with_hostile_responses_in_flight() -> None:
    threads_before = set(threading.enumerate())
    with ExitStack() as stack:
        client = stack.enter_context(httpx.Client(timeout=httpx.Timeout(5.0, read=2.0)))
        with FakeHub() as hub:
            hub.add_repo("org/tiny", {"config.json": SMALL, "weights/model.bin": BIG})
            hub.inject_body("org/tiny", "weights/model.bin", "endless")
            hub.inject_body("org/tiny", "config.json", "stall")
            streams = []
            for path in ("weights/model.bin", "config.json"):
                url = f"{hub.url}/org/tiny/resolve/main/{path}"
                r = stack.enter_context(client.stream("GET", url))
                chunks = r.iter_raw()
                next(chunks)  # a response is in flight
                streams.append(chunks)
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 1.0
        for chunks in streams:  # both connections were cut
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                for i, _ in enumerate(chunks):
                    assert i < 10_000, "still streaming after stop"
        assert time.monotonic() - t0 < 2.0
    deadline = t0 + 1.0
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(max(deadline - time.monotonic(), 0.0))
        assert not thread.is_alive(), f"{thread.name} outlived the hub"
