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

The hub can also be hostile, to test that a client treats it as untrusted input:

* :meth:`FakeHub.lie` makes a repo's model info answer any ``sha`` and ``siblings`` and its
  tree answer any raw entry list, whatever revision (or folder) is asked. Its files resolve at
  any revision: a path registered with :meth:`FakeHub.add_repo` (at the asked revision, else
  ``main``) serves those bytes, any other path the lie lists serves :attr:`FakeHub.LIE_BODY`
  (a git blob, ETag = its git sha1), and ``X-Repo-Commit`` carries the lying sha.
* :meth:`FakeHub.inject_body` breaks the framing of a file's next GETs (see
  :data:`BodyMode`): endless chunked bodies, bodies longer than announced or than the file,
  no length at all, a gzip bomb, a stall, a redirect loop, a redirect to ``file://``.
* :meth:`FakeHub.endless_listing` makes a repo's tree endpoint page forever (``Link`` headers).
* :meth:`FakeHub.require_token` answers 401 to every request without the right bearer token.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import pathlib
import re
import select
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, BinaryIO, Literal, get_args
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

_READ_CHUNK = 1 << 20
_PACE_SLICE = 16 << 10
_HASH_CHUNK = 4 << 20
_CORRUPT = bytes(b ^ 0x5A for b in range(256))
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_DATE = "2024-01-01T00:00:00.000Z"
_EXTRA = 1 << 20  # bytes past the true body for the "longer" modes
_JUNK = b"fakehub junk\n" * 5041  # 65533 bytes (64 KiB, less a little) of what no file holds
_EXTRA_JUNK = (_JUNK * (_EXTRA // len(_JUNK) + 1))[:_EXTRA]
_LIE_BODY = b"fakehub: a path only a lie names\n"
_STALL_HEAD = 1024
_HOLD_SLICE = 0.05
_LOOP = "fakehub-loop"  # query marker of the two urls a redirect loop alternates between
_PAGE = 100  # entries per endless listing page
_BOMB_SIZE = 1 << 30
_BOMB_SEGMENT = 16 << 20
_NO_SHA = "0" * 40

BodyMode = Literal[
    "endless",  # chunked, no Content-Length: the true bytes, then junk chunks until hangup/stop
    "longer",  # Content-Length = size + 1 MiB: the true bytes then 1 MiB of junk (Range ignored)
    "longer_unannounced",  # honest Content-Length, then 1 MiB more junk, then close
    "no_length",  # no Content-Length nor chunking, ``Connection: close``: bytes, then close
    "gzip_bomb",  # Content-Encoding: gzip of 1 GiB of zeros (~1 MiB sent) (Range ignored)
    "stall",  # honest Content-Length, min(1024, length // 2) bytes, then silence until hangup/stop
    "redirect_loop",  # 302 forever, alternating between two urls of the same file
    "redirect_outside",  # 302 to file:///etc/passwd
]


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
    body: dict[tuple[str, str], tuple[BodyMode, int]] = field(default_factory=dict)  # (mode, times)
    no_head_length: set[tuple[str, str]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Lie:
    sha: str | None = None
    tree: list[Any] | None = None
    siblings: list[Any] | None = None

    def paths(self) -> set[str]:
        """Every file path the lie names (tree ``path``s and sibling ``rfilename``s)."""
        named = [e.get("path") for e in self.tree or () if isinstance(e, dict)]
        named += [s.get("rfilename") for s in self.siblings or () if isinstance(s, dict)]
        return {p for p in named if isinstance(p, str)}


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


_LIE_BLOB = _make_blob(_LIE_BODY, lfs_threshold=1024)
_bomb: bytes | None = None
_bomb_lock = threading.Lock()


def _gzip_bomb() -> bytes:
    """1 GiB of zeros as one gzip stream of about 1 MiB, built once (in about 0.3 s).

    Compressing 1 GiB takes seconds, so one 16 MiB segment is compressed after a full flush
    (which forbids back-references across it, so every later segment compresses to the same
    bytes) and repeated; the trailer is then written for the whole 1 GiB.
    """
    global _bomb
    with _bomb_lock:
        if _bomb is None:
            zeros = bytes(_BOMB_SEGMENT)
            z = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip wrapper
            head = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
            segment = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
            last_block = z.flush(zlib.Z_FINISH)[:-8]  # its own trailer counted 32 MiB only
            crc, n = 0, _BOMB_SIZE // _BOMB_SEGMENT
            for _ in range(n):
                crc = zlib.crc32(zeros, crc)
            trailer = struct.pack("<II", crc, _BOMB_SIZE & 0xFFFFFFFF)
            _bomb = head + segment * (n - 1) + last_block + trailer
        return _bomb


class FakeHub:
    """A threaded HTTP/1.1 server that answers like the Hugging Face hub.

    The socket is bound at construction, so :attr:`url` is valid at once; :meth:`start`
    begins serving and :meth:`stop` closes every connection.
    """

    PLAIN = ""  #: the ``repo_id`` under which :meth:`add_file` files take injected faults
    LIE_BODY = _LIE_BODY  #: what a lie's own paths serve (a git blob: ETag = git sha1)

    def __init__(self) -> None:
        self.throttle_bps: int | None = None
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._repos: dict[str, dict[str, _Commit]] = {}
        self._plain: dict[str, _Blob] = {}
        self._faults = _Faults()
        self._lies: dict[str, _Lie] = {}
        self._endless: dict[str, bool] = {}  # repo -> empty pages
        self._token: str | None = None
        self._stopping = threading.Event()
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
        self._stopping.set()  # endless and stalled responses end at once
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

    def inject_body(self, repo_id: str, path: str, mode: BodyMode, times: int = 1_000_000) -> None:
        """Answer the next ``times`` GETs with a hostile body or redirect (see :data:`BodyMode`).

        HEADs stay honest. Range is honoured (on the true bytes) except by ``longer`` and
        ``gzip_bomb``, which answer 200 in full. An injected status wins over this; this wins
        over an injected drop or corruption (which then wait for a later GET).
        """
        if mode not in get_args(BodyMode):
            raise ValueError(f"unknown body mode {mode!r}")
        with self._lock:
            self._faults.body[(repo_id, path)] = (mode, times)

    def hide_head_length(self, repo_id: str, path: str) -> None:
        """From now on HEADs of this file carry no Content-Length (a server that does not
        know its lengths); pair it with ``inject_body(..., "no_length")`` for the GETs."""
        with self._lock:
            self._faults.no_head_length.add((repo_id, path))

    # -- hostility -------------------------------------------------------------------------
    def lie(
        self,
        repo_id: str,
        *,
        sha: str | None = None,
        tree: list[dict[str, Any]] | None = None,
        siblings: list[dict[str, Any]] | None = None,
    ) -> None:
        """From now on answer ``sha``, the raw ``tree`` and ``siblings`` for ``repo_id``.

        Any revision then resolves (see the module docstring); ``repo_id`` need not have been
        added. ``None`` keeps that part as it was (true, or an earlier lie). The lists are
        copied, and sent as they are.
        """
        tree, siblings = json.loads(json.dumps([tree, siblings]))
        with self._lock:
            lie = self._lies.get(repo_id, _Lie())
            self._lies[repo_id] = replace(
                lie,
                sha=lie.sha if sha is None else sha,
                tree=lie.tree if tree is None else tree,
                siblings=lie.siblings if siblings is None else siblings,
            )

    def endless_listing(self, repo_id: str, *, empty_pages: bool = False) -> None:
        """Make every tree page of ``repo_id`` link a next page, forever, at any revision.

        Page ``n`` holds 100 files ``f/<n>/<i>.bin`` (40-hex oid, size 1), or nothing if
        ``empty_pages``; the next page is ``?cursor=<n+1>``. This wins over a lying tree.
        """
        with self._lock:
            self._endless[repo_id] = empty_pages

    def require_token(self, token: str | None) -> None:
        """Answer 401 to every request without ``Authorization: Bearer <token>``; ``None``: off."""
        with self._lock:
            self._token = token

    def _authorized(self, h: _Handler) -> bool:
        with self._lock:
            token = self._token
        return token is None or h.headers.get("Authorization") == f"Bearer {token}"

    def _take_faults(
        self, key: tuple[str, str]
    ) -> tuple[int | None, BodyMode | None, int | None, bool]:
        """``(status, body mode, drop after, corrupt)`` for one GET, each counted as used."""
        with self._lock:
            f = self._faults
            if (entry := f.status.get(key)) is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del f.status[key]
                return entry[0], None, None, False
            if (body := f.body.get(key)) is not None:
                if body[1] <= 1:
                    del f.body[key]
                else:
                    f.body[key] = (body[0], body[1] - 1)
                return None, body[0], None, False
            drop = None
            if (entry := f.drop.get(key)) is not None:
                drop = entry[0]
                entry[1] -= 1
                if entry[1] <= 0:
                    del f.drop[key]
            corrupt = f.corrupt.get(key, 0) > 0
            if corrupt:
                f.corrupt[key] -= 1
            return None, None, drop, corrupt

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
        if not self._authorized(h):
            self._error(h, 401, "Unauthorized", "Invalid credentials in Authorization header")
        elif h.command not in ("GET", "HEAD"):
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
            if commit is None and repo_id in self._lies:  # a liar answers any revision
                commit = (revs or {}).get("main", _Commit(_NO_SHA, {}))
        if commit is None and revs is None:
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
        with self._lock:
            lie, empty_pages = self._lies.get(repo_id, _Lie()), self._endless.get(repo_id)
        if tail[0] == "tree" and empty_pages is not None:
            return self._listing_page(h, query, empty_pages)
        if tail[0] == "tree" and lie.tree is not None:
            return self._json(h, 200, lie.tree)
        if (commit := self._lookup(h, repo_id, tail[1])) is None:
            return None
        if tail[0] == "revision" and len(tail) == 2:
            info = _model_info(repo_id, commit)
            if lie.sha is not None:
                info["sha"] = lie.sha
            if lie.siblings is not None:
                info["siblings"] = lie.siblings
            return self._json(h, 200, info)
        if tail[0] == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(h, 200, _tree(commit, "/".join(tail[2:]), recursive))
        return self._error(h, 404, "NotFound", "no such route")

    def _listing_page(self, h: _Handler, query: dict[str, list[str]], empty: bool) -> None:
        cursor = query.get("cursor", ["0"])[0]
        page = int(cursor) if cursor.isdigit() else 0
        entries = [
            {
                "type": "file",
                "path": f"f/{page}/{i}.bin",
                "oid": hashlib.sha1(f"{page}/{i}".encode()).hexdigest(),
                "size": 1,
            }
            for i in range(0 if empty else _PAGE)
        ]
        next_query = urlencode({**query, "cursor": [str(page + 1)]}, doseq=True)
        link = f'<{self.url}{urlsplit(h.path).path}?{next_query}>; rel="next"'
        self._json(h, 200, entries, {"Link": link})

    def _resolve(self, h: _Handler, repo_id: str, rev: str, path: str) -> None:
        if (commit := self._lookup(h, repo_id, rev)) is None:
            return
        blob = commit.files.get(path)
        sha = commit.sha
        with self._lock:
            lie = self._lies.get(repo_id)
        if lie is not None:
            sha = commit.sha if lie.sha is None else lie.sha
            known = commit.files.keys() | lie.paths()
            if path not in known:  # a revision with a "/" the client left unquoted
                full = f"{rev}/{path}"
                path = max((p for p in known if full.endswith(f"/{p}")), key=len, default=path)
            blob = commit.files.get(path, _LIE_BLOB if path in known else None)
        if blob is None:
            self._error(h, 404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
            return
        headers = {"X-Repo-Commit": sha}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(blob.size)}
        self._send_blob(h, blob, (repo_id, path), headers)

    # -- responses -------------------------------------------------------------------------
    def _start(self, h: _Handler, status: int, headers: dict[str, str], length: int | None) -> int:
        """Log, then send the status line and headers (no Content-Length if ``length`` is
        ``None``); returns the log slot."""
        records, idx = self._log(
            RequestRecord(
                h.command, unquote(urlsplit(h.path).path), h.headers.get("Range"), status, 0
            )
        )
        h.log_slot = (records, idx)
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        if length is not None:
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

    def _json(
        self, h: _Handler, status: int, obj: Any, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(obj).encode()
        self._start(h, status, {"Content-Type": "application/json", **(headers or {})}, len(body))
        self._body(h, body)

    def _body(self, h: _Handler, body: bytes) -> None:
        if h.command != "HEAD":
            h.wfile.write(body)
            h.sent = len(body)

    def _send_blob(
        self, h: _Handler, blob: _Blob, key: tuple[str, str], headers: dict[str, str]
    ) -> None:
        looping = parse_qs(urlsplit(h.path).query).get(_LOOP)
        status_fault, mode, drop, corrupt = (
            self._take_faults(key)
            if h.command == "GET" and not looping
            else (None, None, None, False)
        )
        if status_fault is not None:
            return self._error(h, status_fault, "Injected", "injected failure")
        headers = {
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            **headers,
        }
        if looping or mode is not None:
            return self._send_hostile(h, blob, mode or "redirect_loop", headers)
        if (span := self._span(h, blob, headers)) is None:
            return None
        status, start, length = span
        if h.command == "HEAD" and key in self._faults.no_head_length:
            self._start(h, status, {**headers, "Connection": "close"}, None)
            h.close_connection = True
            return None
        self._start(h, status, headers, length)
        if h.command == "GET":
            self._stream(h, blob, start, length, drop, corrupt)
        return None

    def _span(
        self, h: _Handler, blob: _Blob, headers: dict[str, str]
    ) -> tuple[int, int, int] | None:
        """``(status, start, length)`` the Range asks for (adds Content-Range to ``headers``);
        ``None`` once a 416 went out."""
        start, end, status = 0, blob.size - 1, 200
        if (wanted := _parse_range(h.headers.get("Range"), blob.size)) is not None:
            if wanted == (-1, -1):
                headers["Content-Range"] = f"bytes */{blob.size}"
                self._error(h, 416, "RangeNotSatisfiable", "bad range", headers)
                return None
            (start, end), status = wanted, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        return status, start, end - start + 1

    def _send_hostile(
        self, h: _Handler, blob: _Blob, mode: BodyMode, headers: dict[str, str]
    ) -> None:
        """Answer one GET as ``mode`` says (and any request for a redirect loop's urls)."""
        if mode == "redirect_loop":  # the plain url goes to "a", "a" to "b", "b" to "a"...
            here = parse_qs(urlsplit(h.path).query).get(_LOOP, [""])[0]
            there = urlencode({_LOOP: "b" if here == "a" else "a"})
            location = f"{self.url}{urlsplit(h.path).path}?{there}"
            self._start(h, 302, {**headers, "Location": location}, 0)
        elif mode == "redirect_outside":
            self._start(h, 302, {**headers, "Location": "file:///etc/passwd"}, 0)
        elif mode == "gzip_bomb":
            bomb = _gzip_bomb()
            self._start(h, 200, {**headers, "Content-Encoding": "gzip"}, len(bomb))
            self._send(h, bomb)
        elif mode == "longer":
            self._start(h, 200, headers, blob.size + _EXTRA)
            for piece in _pieces(blob, 0, blob.size):
                self._send(h, piece)
            self._send(h, _EXTRA_JUNK)
        elif (span := self._span(h, blob, headers)) is not None:
            status, start, length = span
            if mode == "endless":
                self._start(h, status, {**headers, "Transfer-Encoding": "chunked"}, None)
                for piece in _pieces(blob, start, length):
                    self._send(h, piece, chunked=True)
                while not self._stopping.is_set():  # the socket blocks: no spinning
                    self._send(h, _JUNK, chunked=True)
                raise _Dropped
            if mode == "stall":
                self._start(h, status, headers, length)
                for piece in _pieces(blob, start, min(_STALL_HEAD, length // 2)):
                    self._send(h, piece)
                self._hold(h)
                raise _Dropped
            self._start(
                h,
                status,
                {**headers, "Connection": "close"} if mode == "no_length" else headers,
                None if mode == "no_length" else length,
            )
            for piece in _pieces(blob, start, length):
                self._send(h, piece)
            if mode == "longer_unannounced":
                self._send(h, _EXTRA_JUNK)
            h.close_connection = True

    def _send(self, h: _Handler, data: bytes | memoryview, *, chunked: bool = False) -> None:
        """Write body bytes (as one chunk if ``chunked``), counting them as sent."""
        view = memoryview(data)
        for i in range(0, len(view), len(_JUNK)):
            piece = view[i : i + len(_JUNK)]
            if chunked:
                h.connection.sendall(b"".join((b"%x\r\n" % len(piece), piece, b"\r\n")))
            else:
                h.connection.sendall(piece)
            h.sent += len(piece)

    def _hold(self, h: _Handler) -> None:
        """Send nothing until the client hangs up or the hub stops."""
        conn = h.connection
        while not self._stopping.wait(_HOLD_SLICE):
            if select.select([conn], [], [], 0)[0]:
                try:
                    if not conn.recv(1, socket.MSG_PEEK):
                        return  # the client hung up
                except OSError:
                    return

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


def _pieces(blob: _Blob, start: int, length: int) -> Iterator[bytes | memoryview]:
    """The blob's bytes ``[start, start + length)``, at most 1 MiB at a time."""
    if isinstance(blob.data, bytes):
        view = memoryview(blob.data)[start : start + length]
        for i in range(0, len(view), _READ_CHUNK):
            yield view[i : i + _READ_CHUNK]
        return
    with blob.data.open("rb") as f:
        f.seek(start)
        while length > 0 and (chunk := f.read(min(_READ_CHUNK, length))):
            length -= len(chunk)
            yield chunk


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
