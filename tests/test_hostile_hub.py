"""A hub that lies (ids, paths, sizes, bodies, redirects, listings, silence) against the real
server: every case ends ``failed`` with ``DOWNLOAD_FAILED`` in bounded time, nothing lands
outside the cache, no file grows past its listed size, and the server keeps serving."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakehub import FakeHub
from tests.helpers import read_sse, submit

DATA = b"tiny weights " * 100  # 1300 bytes: a plain git blob on the fake hub
LISTED = len(DATA)


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file(path: str, *, oid: Any = None, size: Any = LISTED) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": size, "oid": oid or _git_sha1(DATA)}


def _lfs(path: str, *, sha256: Any = None, size: Any = LISTED) -> dict[str, Any]:
    sha = sha256 or hashlib.sha256(DATA).hexdigest()
    lfs = {"oid": sha, "size": size, "pointerSize": 134}
    return {"type": "file", "path": path, "size": size, "oid": "0" * 40, "lfs": lfs}


Setup = Callable[[FakeHub, str], None]


def _tree(*entries: dict[str, Any]) -> Setup:
    return lambda hub, repo: hub.lie(repo, tree=list(entries))


def _sha(sha: Any) -> Setup:
    return lambda hub, repo: hub.lie(repo, sha=sha)


def _body(mode: str) -> Setup:
    return lambda hub, repo: hub.inject_body(repo, "model.bin", mode)


def _listing(empty_pages: bool) -> Setup:
    return lambda hub, repo: hub.endless_listing(repo, empty_pages=empty_pages)


CASES: dict[str, tuple[Setup, str]] = {
    # what the hub says, and a piece of the message that must say what it sent
    "commit id with ../": (_sha("../../../escape-commit"), "../../../escape-commit"),
    "commit id not hex": (_sha("zz" * 20), "zzzz"),
    "commit id too short": (_sha("abc123"), "abc123"),
    "no commit id": (_sha(""), "commit id"),
    "blob id with ../": (_tree(_file("model.bin", oid="../../escape-blob")), "escape-blob"),
    "blob id not hex": (_tree(_file("model.bin", oid="g" * 40)), "gggg"),
    "lfs sha256 with /": (_tree(_lfs("model.bin", sha256="a/" * 32)), "a/a/"),
    "lfs sha256 of a sha1's length": (_tree(_lfs("model.bin", sha256="a" * 40)), "sha256"),
    "blob id that is not the bytes'": (_tree(_file("model.bin", oid="f" * 40)), "checksum"),
    "path with ..": (_tree(_file("../../escape-path.bin")), "escape-path.bin"),
    "path inside then out": (_tree(_file("a/../../escape-path2.bin")), "escape-path2.bin"),
    "absolute path": (_tree(_file("/tmp/escape-abs.bin")), "/tmp/escape-abs.bin"),
    "path with NUL": (_tree(_file("model\x00.bin")), "model"),
    "path with a newline": (_tree(_file("model\n.bin")), "model"),
    "path with a backslash": (_tree(_file("..\\..\\escape-bs.bin")), "escape-bs.bin"),
    "a file and a folder of one name": (
        _tree(_file("model.bin"), _file("model.bin/inner.bin")),
        "model.bin",
    ),
    "a name too long to store": (_tree(_file("n" * 300 + ".bin")), "too long"),
    "size listed smaller than the body": (_tree(_file("model.bin", size=11)), "11"),
    "size not a number": (_tree(_file("model.bin", size="11")), "size"),
    "negative size": (_tree(_file("model.bin", size=-1)), "size"),
    "endless chunked body": (_body("endless"), "Content-Length"),
    "body longer than its length": (_body("longer"), "announced"),
    "longer than announced": (_body("longer_unannounced"), ""),
    "body with no length": (_body("no_length"), "Content-Length"),
    "gzip bomb": (_body("gzip_bomb"), "gzip"),
    "redirect loop": (_body("redirect_loop"), "redirect"),
    "redirect to a file url": (_body("redirect_outside"), "redirect"),
    "endless listing": (_listing(False), "listed more than"),
    "endless empty listing pages": (_listing(True), "does not end"),
    "stalled connection": (_body("stall"), "ReadTimeout"),
}
#: cases where the hub's bytes are honest after all (h11 stops at Content-Length)
SUCCEEDS = {"longer than announced"}


def _outside_names(root: Path) -> list[Path]:
    return [p for p in root.rglob("*escape*")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_lying_hub_fails_the_download_cleanly(api, hub, hive, cache_dir, case):
    setup, says = CASES[case]
    repo = f"org/hostile-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo, {"model.bin": DATA})
    setup(hub, repo)
    started = time.monotonic()
    job_id = submit(api, {"operation": "model_download", "model": repo})
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=45)
    took = time.monotonic() - started

    if case in SUCCEEDS:
        assert stream.sentinel == "[DONE]", stream.events
    else:
        assert stream.sentinel is not None and stream.sentinel.startswith("[ERROR]"), stream
        error = stream.of("error")[-1]
        assert error["code"] == "DOWNLOAD_FAILED", error
        assert says in error["message"], error["message"]
        # a silent hub may wake up; a hub that lies will lie again
        assert error["retriable"] is (case == "stalled connection"), error
        record = api.get(f"/v1/jobs/{job_id}").json()
        assert record["state"] == "failed" and record["error"]["code"] == "DOWNLOAD_FAILED"
    assert took < 40, f"{case} took {took:.1f}s to end"
    if case == "stalled connection":  # waited stall_s each time, retried, then gave up
        assert hub.count("GET", f"{repo}/resolve/") == 1 + hive.config.downloads.retries

    root = cache_dir.parent  # the session's temporary tree: the cache and its neighbours
    assert _outside_names(root) == []
    assert not list((root / "etc").glob("*")) if (root / "etc").exists() else True
    folder = cache_dir / f"models--{repo.replace('/', '--')}"
    for path in folder.rglob("*") if folder.exists() else ():
        if path.is_file() and not path.is_symlink():
            assert path.stat().st_size <= LISTED, f"{path} grew past its listed size"
    for path in folder.rglob("*") if folder.exists() else ():
        if path.is_symlink():
            assert Path(os.path.realpath(path)).is_relative_to(cache_dir.resolve())
    assert api.get("/health").status_code == 200


def test_the_server_still_downloads_after_every_lie(api, hub, cache_dir):
    repo = f"org/honest-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo, {"model.bin": DATA})
    job_id = submit(api, {"operation": "model_download", "model": repo})
    stream = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=30)
    assert stream.sentinel == "[DONE]"
    path = Path(stream.of("result")[0]["path"]) / "model.bin"
    assert path.read_bytes() == DATA


def test_a_commit_asked_for_must_be_the_commit_answered(api, hub):
    repo = f"org/switch-{uuid.uuid4().hex[:8]}"
    commit = hub.add_repo(repo, {"model.bin": DATA})
    hub.lie(repo, sha="e" * 40)
    job_id = submit(api, {"operation": "model_download", "model": repo, "revision": commit})
    error = read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=30).of("error")[-1]
    assert error["code"] == "DOWNLOAD_FAILED" and "e" * 40 in error["message"]


def test_url_vendor_needs_a_length_and_keeps_the_refs_of_a_hub_model(api, hub, cache_dir):
    url = hub.add_file(f"nolength-{uuid.uuid4().hex[:6]}.bin", DATA)
    hub.inject_body(FakeHub.PLAIN, url.rsplit("/", 1)[1], "no_length")
    hub.hide_head_length(FakeHub.PLAIN, url.rsplit("/", 1)[1])
    op = {"operation": "model_download", "model": "local/nolength", "vendor": "url", "url": url}
    error = read_sse(api, f"/v1/jobs/{submit(api, op)}/stream").of("error")[-1]
    assert error["code"] == "DOWNLOAD_FAILED" and "url_max_bytes" in error["message"]

    repo = f"org/fromhub-{uuid.uuid4().hex[:8]}"
    commit = hub.add_repo(repo, {"model.bin": DATA})
    assert (
        read_sse(
            api, f"/v1/jobs/{submit(api, {'operation': 'model_download', 'model': repo})}/stream"
        ).sentinel
        == "[DONE]"
    )
    ref = cache_dir / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    assert ref.read_text() == commit
    plain = hub.add_file(f"other-{uuid.uuid4().hex[:6]}.bin", b"not the hub's model")
    op = {"operation": "model_download", "model": repo, "vendor": "url", "url": plain}
    error = read_sse(api, f"/v1/jobs/{submit(api, op)}/stream").of("error")[-1]
    assert error["code"] == "INVALID_REQUEST" and "does not replace" in error["message"]
    assert ref.read_text() == commit
