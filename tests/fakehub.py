"""A real HTTP fake of the Hugging Face hub, for tests and benchmarks.

It speaks the part of the hub protocol that ``huggingface_hub`` and rbee use, over real
sockets on 127.0.0.1, so code under test runs its ordinary HTTP path::

    with FakeHub() as hub:
        sha = hub.add_repo("org/tiny", {"config.json": b"{}", "model.bin": big_path})
        hf_hub_download("org/tiny", "model.bin", endpoint=hub.url, cache_dir=tmp)

Routes: ``GET /api/models/<repo>[/revision/<rev>]`` (model info), ``GET
/api/models/<repo>/tree/<rev>[/<dir>]`` (listing), ``HEAD|GET /<repo>/resolve/<rev>/<path>``
(files, with ``Range``), ``HEAD|GET /files/<name>`` (plain files). Faults are injected per
file; a plain file added with :meth:`FakeHub.add_file` is addressed as ``(FakeHub.PLAIN,
name)``. Every request is logged as a :class:`RequestRecord`.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import pathlib
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

_READ_CHUNK = 1 << 20
_PACE_SLICE = 16 << 10
_HASH_CHUNK = 4 << 20
_CORRUPT = bytes(b ^ 0x5A for b in range(256))
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_DATE = "2024-01-01T00:00:00.000Z"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the hub saw it; ``body_bytes_sent`` is final once the response ended."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes_sent: int


@dataclass(frozen=True, slots=True)
class _Blob:
    data: bytes | pathlib.Path
    size: int
    etag: str
    lfs: bool


@dataclass(frozen=True, slots=True)
class _Commit:
    sha: str
    files: dict[str, _Blob]


@dataclass(slots=True)
class _Faults:
    drop: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # key -> [after, times]
    corrupt: dict[tuple[str, str], int] = field(default_factory=dict)
    status: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # key -> [status, times]


class _Dropped(Exception):
    """Raised inside a handler to cut the connection mid-body on purpose."""


def _digest(data: bytes | pathlib.Path, algo: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algo, prefix)
    if isinstance(data, bytes):
        h.update(data)
        return h.hexdigest()
    with data.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _make_blob(data: bytes | pathlib.Path, lfs_threshold: int) -> _Blob:
    size = len(data) if isinstance(data, bytes) else data.stat().st_size
    if size >= lfs_threshold:
        return _Blob(data, size, _digest(data, "sha256"), lfs=True)
    return _Blob(data, size, _digest(data, "sha1", b"blob %d\0" % size), lfs=False)


class FakeHub:
    """A threaded HTTP/1.1 server that answers like the Hugging Face hub.

    The socket is bound at construction, so :attr:`url` is valid at once; :meth:`start`
    begins serving and :meth:`stop` closes every connection.
    """

    PLAIN = ""  #: the ``repo_id`` under which :meth:`add_file` files take injected faults

    def __init__(self) -> None:
        self.throttle_bps: int | None = None
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._repos: dict[str, dict[str, _Commit]] = {}
        self._plain: dict[str, _Blob] = {}
        self._faults = _Faults()
        self._conns: set[socket.socket] = set()
        self._server = _Server(self)
        self._thread: threading.Thread | None = None
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeHub:
        """Serve in a daemon thread; returns ``self``."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fakehub",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut every open connection."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- content ---------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | pathlib.Path],
        *,
        revision: str = "main",
        lfs_threshold: int = 1024,
    ) -> str:
        """Publish ``files`` as ``revision`` of ``repo_id``; returns the commit sha.

        Files of ``lfs_threshold`` bytes or more are LFS (ETag = sha256), smaller ones plain
        git blobs (ETag = git blob sha1). A :class:`pathlib.Path` is served from disk.
        Older commits stay reachable by their sha, as on the real hub.
        """
        blobs = {path: _make_blob(data, lfs_threshold) for path, data in files.items()}
        manifest = json.dumps(
            [repo_id, revision, sorted((p, b.etag, b.size) for p, b in blobs.items())]
        )
        commit = _Commit(hashlib.sha1(manifest.encode()).hexdigest(), blobs)
        with self._lock:
            revs = self._repos.setdefault(repo_id, {})
            revs[revision] = commit
            revs[commit.sha] = commit
        return commit.sha

    def add_file(self, name: str, data: bytes | pathlib.Path) -> str:
        """Serve ``data`` at ``/files/<name>`` (ETag = sha256); returns its url."""
        blob = _make_blob(data, lfs_threshold=0)
        with self._lock:
            self._plain[name] = blob
        return f"{self.url}/files/{name}"

    # -- faults ----------------------------------------------------------------------------
    def inject_drop(self, repo_id: str, path: str, after_bytes: int, times: int = 1) -> None:
        """Cut the connection after ``after_bytes`` body bytes on the next ``times`` GETs."""
        with self._lock:
            self._faults.drop[(repo_id, path)] = [after_bytes, times]

    def inject_corrupt(self, repo_id: str, path: str, times: int = 1_000_000) -> None:
        """Serve wrong bytes of the right length on the next ``times`` GETs."""
        with self._lock:
            self._faults.corrupt[(repo_id, path)] = times

    def inject_status(self, repo_id: str, path: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` GETs with ``status`` and no file."""
        with self._lock:
            self._faults.status[(repo_id, path)] = [status, times]

    def _take_faults(self, key: tuple[str, str]) -> tuple[int | None, int | None, bool]:
        with self._lock:
            f = self._faults
            if (entry := f.status.get(key)) is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del f.status[key]
                return entry[0], None, False
            drop = None
            if (entry := f.drop.get(key)) is not None:
                drop = entry[0]
                entry[1] -= 1
                if entry[1] <= 0:
                    del f.drop[key]
            corrupt = f.corrupt.get(key, 0) > 0
            if corrupt:
                f.corrupt[key] -= 1
            return None, drop, corrupt

    # -- request log -----------------------------------------------------------------------
    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """How many logged requests match ``method`` and contain ``path_contains``."""
        with self._lock:
            records = list(self.requests)
        return sum(
            1
            for r in records
            if (method is None or r.method == method)
            and (path_contains is None or path_contains in r.path)
        )

    def clear_log(self) -> None:
        """Forget every logged request (responses still in flight log into the old list)."""
        with self._lock:
            self.requests = []

    def _log(self, record: RequestRecord) -> tuple[list[RequestRecord], int]:
        with self._lock:
            self.requests.append(record)
            return self.requests, len(self.requests) - 1

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- routing ---------------------------------------------------------------------------
    def _route(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        # Split before unquoting: the hub quotes revisions with safe="", so "refs%2Fpr%2F1"
        # is one segment.
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        if h.command not in ("GET", "HEAD"):
            self._error(h, 404, "NotFound", "no such route")
        elif segs[:2] == ["api", "models"] and len(segs) > 2:
            self._api(h, segs[2:], parse_qs(split.query))
        elif segs[0] == "files" and len(segs) > 1:
            with self._lock:
                blob = self._plain.get("/".join(segs[1:]))
            if blob is None:
                self._error(h, 404, "EntryNotFound", "no such file")
            else:
                self._send_blob(h, blob, (self.PLAIN, "/".join(segs[1:])), {})
        elif len(segs) > 3 and segs[2] == "resolve":
            self._resolve(h, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        elif len(segs) > 2 and segs[1] == "resolve":
            self._resolve(h, segs[0], segs[2], "/".join(segs[3:]))
        else:
            self._error(h, 404, "NotFound", "no such route")

    def _lookup(self, h: _Handler, repo_id: str, rev: str) -> _Commit | None:
        with self._lock:
            revs = self._repos.get(repo_id)
            commit = revs.get(rev) if revs is not None else None
        if revs is None:
            self._error(h, 404, "RepoNotFound", f"Repository {repo_id} not found")
        elif commit is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _api(self, h: _Handler, rest: list[str], query: dict[str, list[str]]) -> None:
        for n in (2, 1):
            if (len(rest) > n and rest[n] in ("revision", "tree")) or len(rest) == n:
                repo_id, tail = "/".join(rest[:n]), rest[n:]
                break
        else:
            return self._error(h, 404, "NotFound", "no such route")
        if not tail:
            tail = ["revision", "main"]
        if len(tail) < 2:
            return self._error(h, 404, "NotFound", "no such route")
        if (commit := self._lookup(h, repo_id, tail[1])) is None:
            return None
        if tail[0] == "revision" and len(tail) == 2:
            return self._json(h, 200, _model_info(repo_id, commit))
        if tail[0] == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(h, 200, _tree(commit, "/".join(tail[2:]), recursive))
        return self._error(h, 404, "NotFound", "no such route")

    def _resolve(self, h: _Handler, repo_id: str, rev: str, path: str) -> None:
        if (commit := self._lookup(h, repo_id, rev)) is None:
            return
        blob = commit.files.get(path)
        if blob is None:
            self._error(
                h, 404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit.sha}
            )
            return
        headers = {"X-Repo-Commit": commit.sha}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(blob.size)}
        self._send_blob(h, blob, (repo_id, path), headers)

    # -- responses -------------------------------------------------------------------------
    def _start(self, h: _Handler, status: int, headers: dict[str, str], length: int) -> int:
        """Log, then send the status line and headers; returns the log slot."""
        records, idx = self._log(
            RequestRecord(
                h.command, unquote(urlsplit(h.path).path), h.headers.get("Range"), status, 0
            )
        )
        h.log_slot = (records, idx)
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        return idx

    def _error(
        self,
        h: _Handler,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        all_headers = {
            "Content-Type": "application/json",
            "X-Error-Code": code,
            "X-Error-Message": message,
            **(headers or {}),
        }
        self._start(h, status, all_headers, len(body))
        self._body(h, body)

    def _json(self, h: _Handler, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self._start(h, status, {"Content-Type": "application/json"}, len(body))
        self._body(h, body)

    def _body(self, h: _Handler, body: bytes) -> None:
        if h.command != "HEAD":
            h.wfile.write(body)
            h.sent = len(body)

    def _send_blob(
        self, h: _Handler, blob: _Blob, key: tuple[str, str], headers: dict[str, str]
    ) -> None:
        status_fault, drop, corrupt = (
            self._take_faults(key) if h.command == "GET" else (None, None, False)
        )
        if status_fault is not None:
            return self._error(h, status_fault, "Injected", "injected failure")
        headers = {
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            **headers,
        }
        start, end, status = 0, blob.size - 1, 200
        if (wanted := _parse_range(h.headers.get("Range"), blob.size)) is not None:
            if wanted == (-1, -1):
                headers["Content-Range"] = f"bytes */{blob.size}"
                return self._error(h, 416, "RangeNotSatisfiable", "bad range", headers)
            (start, end), status = wanted, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        length = end - start + 1
        self._start(h, status, headers, length)
        if h.command == "GET":
            self._stream(h, blob, start, length, drop, corrupt)

    def _stream(
        self, h: _Handler, blob: _Blob, start: int, length: int, drop: int | None, corrupt: bool
    ) -> None:
        limit = length if drop is None else min(length, drop)
        src: BinaryIO | None = None if isinstance(blob.data, bytes) else blob.data.open("rb")
        pace = _Pacer(self)
        try:
            while h.sent < limit:
                offset, n = start + h.sent, min(_READ_CHUNK, limit - h.sent)
                if src is not None and not corrupt and self.throttle_bps is None:
                    h.sent += h.connection.sendfile(src, offset, n)
                    continue
                if src is None:
                    chunk = memoryview(blob.data)[offset : offset + n]  # type: ignore[arg-type]
                else:
                    src.seek(offset)
                    chunk = memoryview(src.read(n))
                if corrupt:
                    chunk = memoryview(bytes(chunk).translate(_CORRUPT))
                step = _PACE_SLICE if self.throttle_bps is not None else len(chunk)
                for i in range(0, len(chunk), step):
                    piece = chunk[i : i + step]
                    h.connection.sendall(piece)
                    h.sent += len(piece)
                    pace.after(len(piece))
        finally:
            if src is not None:
                src.close()
        if h.sent < length:
            raise _Dropped


class _Pacer:
    """Sleeps so the bytes of one response leave at most at the hub's current throttle."""

    def __init__(self, hub: FakeHub) -> None:
        self._hub = hub
        self._rate: int | None = None
        self._t0 = 0.0
        self._bytes = 0

    def after(self, n: int) -> None:
        rate = self._hub.throttle_bps
        if rate != self._rate:  # the throttle changed: restart the schedule from now
            self._rate, self._t0, self._bytes = rate, time.monotonic(), 0
        if rate is None:
            return
        self._bytes += n
        delay = self._t0 + self._bytes / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive; ``None`` to ignore the header; ``(-1, -1)`` if unsatisfiable."""
    if value is None or (m := _RANGE.fullmatch(value.strip())) is None:
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return (-1, -1)
    return start, end


def _model_info(repo_id: str, commit: _Commit) -> dict[str, Any]:
    siblings = []
    for path, blob in sorted(commit.files.items()):
        sib: dict[str, Any] = {"rfilename": path, "size": blob.size}
        if blob.lfs:
            sib["lfs"] = {"sha256": blob.etag, "size": blob.size, "pointerSize": 134}
        else:
            sib["blobId"] = blob.etag
        siblings.append(sib)
    return {
        "_id": commit.sha[:24],
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split("/")[0] if "/" in repo_id else None,
        "sha": commit.sha,
        "lastModified": _DATE,
        "createdAt": _DATE,
        "private": False,
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "spaces": [],
        "usedStorage": sum(b.size for b in commit.files.values()),
    }


def _tree(commit: _Commit, under: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = f"{under.strip('/')}/" if under.strip("/") else ""
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for path, blob in sorted(commit.files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        if not recursive and "/" in rest:
            folders.add(prefix + rest.split("/")[0])
            continue
        if recursive:
            parts = rest.split("/")[:-1]
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
        entry: dict[str, Any] = {"type": "file", "path": path, "size": blob.size}
        if blob.lfs:
            git_pointer = hashlib.sha1(f"lfs {blob.etag}".encode()).hexdigest()
            entry |= {
                "oid": git_pointer,
                "lfs": {"oid": blob.etag, "size": blob.size, "pointerSize": 134},
            }
        else:
            entry["oid"] = blob.etag
        entries.append(entry)
    folder_entries = [
        {"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()}
        for p in sorted(folders)
    ]
    return folder_entries + entries


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 512

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError | _Dropped):
            return  # a client that went away, or a drop we injected: not news
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    sent = 0
    log_slot: tuple[list[RequestRecord], int] | None = None

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.hub._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.hub._track(self.connection, add=False)
        try:
            super().finish()
        except OSError:
            pass

    def handle_one_request(self) -> None:
        self.sent, self.log_slot = 0, None
        try:
            super().handle_one_request()
        except (OSError, _Dropped):
            self.close_connection = True
        finally:
            if self.log_slot is not None:
                records, idx = self.log_slot
                with self.server.hub._lock:
                    old = records[idx]
                    records[idx] = RequestRecord(
                        old.method, old.path, old.range, old.status, self.sent
                    )

    def _dispatch(self) -> None:
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True  # a request body we will not read
        self.server.hub._route(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass
