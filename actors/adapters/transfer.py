"""The bytes of one file, moved from a hub to the cache so that a cancel really stops them.

huggingface_hub has no hook to stop a download half-way, so rbee moves the bytes itself
and leaves metadata and cache layout to the caller. A transfer writes ``<dest>.incomplete``
(the huggingface_hub convention) and renames it to ``dest`` only once the checksum
matched, so a final name never holds half a file. The hub is untrusted: a body must announce
its length, in identity encoding, and no file grows past the size it was listed at; while a
blob is written, the ``.locks/`` file lock ``huggingface_hub`` takes for it is held, so the
two never write one blob at once. Big files go as parallel ``Range``
requests whose progress is kept in ``<dest>.incomplete.segments``; a broken transfer keeps
its partial file and the next fetch resumes it. Writes happen in the event-loop thread, so
once ``CancelledError`` is delivered not one more byte lands on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import filelock
import httpx

from actors.core.errors import BadHubAnswer, DownloadFailed, IntegrityError

logger = logging.getLogger(__name__)

OnBytes = Callable[[int], None]

_SIDECAR_EVERY_S = 0.5
_HASH_CHUNK = 4 << 20
_LOCK_POLL_S = 0.05
_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One file to fetch: where from, where to, and what its bytes must hash to."""

    url: str
    dest: pathlib.Path  #: the final path, e.g. ``.../blobs/<etag>`` in the HF cache
    size: int | None
    sha256: str | None = None  #: checked when given (LFS files)
    git_sha1: str | None = None  #: checked when given: sha1 of ``b"blob <size>\0" + data``
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  #: sent, never shown
    max_size: int | None = None  #: with no ``size``: the most bytes the file may have
    lock: pathlib.Path | None = None  #: huggingface_hub's lock for this blob, held while writing
    within: pathlib.Path | None = None  #: the folder every file written must resolve inside


class BandwidthLimiter:
    """An async token bucket that all transfers of one :class:`Downloader` share.

    Each caller reserves its bytes on a shared schedule and sleeps until they are paid
    for, so the sum of all streams stays at ``rate_bps``; ``None`` means no limit.
    """

    def __init__(
        self, rate_bps: int | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError("rate_bps must be positive or None")
        self.rate_bps = rate_bps
        self._clock = clock
        self._next = clock()

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more bytes fit under the rate."""
        if self.rate_bps is None or nbytes <= 0:
            return
        now = self._clock()
        # No credit for idle time: a bucket that filled up while nothing ran would let a
        # burst through far above the rate the operator asked for.
        self._next = max(now, self._next) + nbytes / self.rate_bps
        if (delay := self._next - now) > 0:
            await asyncio.sleep(delay)


class Downloader:
    """Fetches files over one shared ``httpx.AsyncClient``, cancellably and resumably."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        limiter: BandwidthLimiter | None = None,
        chunk_size: int = 1 << 20,
        parallel_min_size: int = 64 << 20,
        segments: int = 4,
        retries: int = 3,
        retry_backoff_s: float = 0.2,
    ) -> None:
        self._client = client
        self._limiter = limiter or BandwidthLimiter(None)
        self._chunk_size = min(chunk_size, 1 << 20)
        self._parallel_min_size = parallel_min_size
        self._segments = max(segments, 1)
        self._retries = retries
        self._backoff = retry_backoff_s
        self._transfers: dict[pathlib.Path, _Transfer] = {}

    def in_flight(self) -> int:
        """How many transfers are running now (a deduplicated transfer counts once)."""
        return sum(1 for t in self._transfers.values() if not t.task.done())

    async def fetch(self, spec: FileSpec, on_bytes: OnBytes | None = None) -> pathlib.Path:
        """Bring ``spec.url`` to ``spec.dest`` and return ``spec.dest``.

        ``on_bytes(n)`` is called after every write with the bytes of the file now on
        disk. Concurrent fetches of one ``dest`` share a single transfer, which stops (and
        its partial file goes) only when every one of them was cancelled.

        Raises:
            DownloadFailed: the transfer broke; the partial file is kept for a resume.
            IntegrityError: the bytes did not match the checksum; nothing was kept.
        """
        while (shared := self._transfers.get(spec.dest)) is not None and shared.abandoned:
            await asyncio.wait({shared.task})  # let its cleanup finish before we reuse the name
        if spec.dest.exists():
            return spec.dest
        if shared is None:
            shared = _Transfer()
            shared.task = asyncio.create_task(self._run(spec, shared.emit))
            shared.task.add_done_callback(functools.partial(self._forget, spec.dest, shared))
            self._transfers[spec.dest] = shared
        if on_bytes is not None:
            shared.listeners.append(on_bytes)
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task)
        except asyncio.CancelledError:
            shared.waiters -= 1
            if on_bytes is not None:
                shared.listeners.remove(on_bytes)
            if shared.waiters == 0 and not shared.task.done():
                # The last one out stops the bytes and waits for their partial file to go;
                # the cancel above it bounds the wait (``running.Stop``).
                shared.abandoned = True
                shared.task.cancel()
                await asyncio.wait({shared.task})
            raise

    def _forget(
        self, dest: pathlib.Path, transfer: _Transfer, _: asyncio.Task[pathlib.Path]
    ) -> None:
        if self._transfers.get(dest) is transfer:
            del self._transfers[dest]
        if not transfer.task.cancelled():
            transfer.task.exception()  # the waiters may all be gone; mark it as seen

    async def _run(self, spec: FileSpec, emit: OnBytes) -> pathlib.Path:
        partial = _partial(spec.dest)
        try:
            check_inside(partial, spec.within)
            async with _file_lock(spec.lock, spec.within):
                if spec.dest.exists():  # another program finished it while we waited
                    return spec.dest
                spec.dest.parent.mkdir(parents=True, exist_ok=True)
                check_inside(partial, spec.within)
                await self._transfer(spec, partial, emit)
                os.replace(partial, check_inside(spec.dest, spec.within))
        except asyncio.CancelledError:
            _discard(partial)
            raise
        except DownloadFailed as exc:
            if not exc.retriable:  # nothing to resume from: keep no bytes of it
                _discard(partial)
            raise
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            _discard(partial)
            reason = exc.strerror or type(exc).__name__
            raise DownloadFailed(
                f"cannot write {spec.dest.name}: {reason}", retriable=False
            ) from exc
        _sidecar(partial).unlink(missing_ok=True)
        return spec.dest

    async def _transfer(self, spec: FileSpec, partial: pathlib.Path, emit: OnBytes) -> None:
        if spec.size is not None and spec.size >= self._parallel_min_size:
            try:
                await self._parallel(spec, spec.size, partial, emit)
                nbytes, digest = spec.size, None
            except _RangeRefused:
                logger.info("%s ignores ranges; fetching it in one stream", _where(spec.url))
                _discard(partial)
                nbytes, digest = await self._sequential(spec, partial, emit)
        else:
            nbytes, digest = await self._sequential(spec, partial, emit)
        await _verify(spec, partial, nbytes, digest)

    async def _sequential(
        self, spec: FileSpec, partial: pathlib.Path, emit: OnBytes
    ) -> tuple[int, str | None]:
        """One stream from the first missing byte; returns its length, and its digest if
        this stream saw every byte."""
        fd = _open_partial(partial)
        try:
            offset = _contiguous_prefix(partial, fd)
            if spec.size is not None and offset > spec.size:
                offset = 0
                os.ftruncate(fd, 0)
            hasher = _new_hasher(spec) if offset == 0 else None
            failures = 0
            while spec.size is None or offset < spec.size:
                try:
                    async with self._get(spec, offset) as resp:
                        if offset and resp.status_code == 200:  # the server ignored our Range
                            offset, hasher = 0, _new_hasher(spec)
                            os.ftruncate(fd, 0)
                        limit = _body_limit(spec, resp, offset)
                        async for data in resp.aiter_raw():
                            if offset + len(data) > limit:
                                raise _too_long(spec.url, limit)
                            for piece in _split(data, self._chunk_size):
                                await self._limiter.acquire(len(piece))
                                _pwrite_all(fd, piece, offset)
                                offset += len(piece)
                                if hasher is not None:
                                    hasher.update(piece)
                                emit(offset)
                    if spec.size is None or offset >= spec.size:
                        break
                    raise DownloadFailed(f"{_where(spec.url)} ended early at byte {offset}")
                except DownloadFailed as exc:
                    if isinstance(exc, _RangeRefused):
                        offset, hasher = 0, _new_hasher(spec)
                        os.ftruncate(fd, 0)
                    failures += 1
                    await self._before_retry(exc, failures)
            os.ftruncate(fd, offset)
        finally:
            os.close(fd)
        return offset, hasher.hexdigest() if hasher is not None else None

    async def _parallel(
        self, spec: FileSpec, size: int, partial: pathlib.Path, emit: OnBytes
    ) -> None:
        """Concurrent ``Range`` requests written at their offsets into one partial file."""
        fd = _open_partial(partial)
        sidecar = _sidecar(partial)
        try:
            plan = _Plan.load(sidecar, size) if os.fstat(fd).st_size == size else None
            if plan is None:
                prefix = 0 if sidecar.exists() else min(os.fstat(fd).st_size, size)
                plan = _Plan.split(size, prefix, self._segments)
                plan.save(sidecar)  # before the file grows: a full-size partial always has a plan
            os.ftruncate(fd, size)
            failed: list[DownloadFailed | OSError] = []
            try:
                async with asyncio.TaskGroup() as group:
                    for seg in plan.segments:
                        group.create_task(self._segment(spec, fd, seg, plan, sidecar, emit))
            except BaseExceptionGroup as eg:
                failed = [e for e in eg.exceptions if isinstance(e, DownloadFailed | OSError)]
                if len(failed) < len(eg.exceptions):
                    raise
            finally:
                plan.save(sidecar)
            if failed:  # one cause is enough: a refused range decides how to go on, then the
                # fatal ones (a lying hub, a full disk) before those a retry may cure
                raise min(failed, key=_precedence)
        finally:
            os.close(fd)

    async def _segment(
        self,
        spec: FileSpec,
        fd: int,
        seg: list[int],
        plan: _Plan,
        sidecar: pathlib.Path,
        emit: OnBytes,
    ) -> None:
        start, end, _ = seg
        failures = 0
        while start + seg[2] < end:
            pos = start + seg[2]
            try:
                async with self._get(spec, pos, end - 1) as resp:
                    if resp.status_code != 206 or not resp.headers.get(
                        "Content-Range", ""
                    ).startswith(f"bytes {pos}-"):
                        raise _RangeRefused(f"{_where(spec.url)} did not honour a Range")
                    _check_length(spec.url, resp, end - pos)
                    async for data in resp.aiter_raw():
                        if start + seg[2] + len(data) > end:
                            raise _too_long(spec.url, end - pos)
                        for piece in _split(data, self._chunk_size):
                            await self._limiter.acquire(len(piece))
                            _pwrite_all(fd, piece, start + seg[2])
                            seg[2] += len(piece)
                            emit(plan.on_disk())
                            plan.save(sidecar, unless_within_s=_SIDECAR_EVERY_S)
                if start + seg[2] < end:
                    raise DownloadFailed(f"{_where(spec.url)} ended early at {start + seg[2]}")
            except DownloadFailed as exc:
                if isinstance(exc, _RangeRefused):
                    raise
                failures += 1
                await self._before_retry(exc, failures)

    async def _before_retry(self, exc: DownloadFailed, failures: int) -> None:
        """Re-raise ``exc`` unless another attempt is allowed; then back off."""
        if not exc.retriable or failures > self._retries:
            raise exc
        logger.info("transfer broke (%s); retry %d of %d", exc.message, failures, self._retries)
        await asyncio.sleep(self._backoff * 2 ** max(failures - 1, 0))

    @contextlib.asynccontextmanager
    async def _get(
        self, spec: FileSpec, start: int, end: int | None = None
    ) -> AsyncIterator[httpx.Response]:
        # identity: ranges and checksums are about the stored bytes, not a compressed stream
        headers = {**spec.headers, "Accept-Encoding": "identity"}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        with transport_errors(spec.url):
            async with self._client.stream("GET", spec.url, headers=headers) as resp:
                _check_status(resp, spec.url)
                yield resp


@dataclass(eq=False, slots=True)
class _Transfer:
    """One running transfer and the fetches waiting on it."""

    task: asyncio.Task[pathlib.Path] = field(init=False)
    listeners: list[OnBytes] = field(default_factory=list)
    waiters: int = 0
    abandoned: bool = False  #: every waiter was cancelled; cleanup under way

    def emit(self, on_disk: int) -> None:
        for listener in list(self.listeners):
            listener(on_disk)


def _precedence(exc: DownloadFailed | OSError) -> int:
    if isinstance(exc, _RangeRefused):
        return 0
    return 2 if isinstance(exc, DownloadFailed) and exc.retriable else 1


class _RangeRefused(DownloadFailed):
    """The server would not serve the byte range we asked for."""


class _Plan:
    """The segments of a parallel transfer: ``[start, end, committed]`` each, ``end`` exclusive."""

    def __init__(self, size: int, segments: list[list[int]]) -> None:
        self.size, self.segments, self._saved_at = size, segments, time.monotonic()

    @classmethod
    def split(cls, size: int, prefix: int, count: int) -> _Plan:
        rest = size - prefix
        count = min(count, rest) if rest > 0 else 0
        bounds = [prefix + rest * i // count for i in range(count + 1)] if count else []
        return cls(size, [[a, b, 0] for a, b in itertools.pairwise(bounds)])

    @classmethod
    def load(cls, sidecar: pathlib.Path, size: int) -> _Plan | None:
        try:
            data = json.loads(sidecar.read_text())
            segments = [[int(a), int(b), int(c)] for a, b, c in data["segments"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if data.get("size") != size or any(not 0 <= c <= b - a for a, b, c in segments):
            return None
        return cls(size, segments)

    def on_disk(self) -> int:
        return self.size - sum(b - a - c for a, b, c in self.segments)

    def save(self, sidecar: pathlib.Path, *, unless_within_s: float = 0.0) -> None:
        if time.monotonic() - self._saved_at < unless_within_s:
            return
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"size": self.size, "segments": self.segments}))
            os.replace(tmp, sidecar)  # a crash mid-write must not leave a torn plan
        except OSError:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half plan behind
            raise
        self._saved_at = time.monotonic()


def check_inside(path: pathlib.Path, folder: pathlib.Path | None) -> pathlib.Path:
    """``path``, once the folder holding it resolves (symlinks and all) inside ``folder``.

    Raises:
        BadHubAnswer: it would not; whatever named the path (a hub) is not to be trusted.
    """
    if folder is None:
        return path
    root = os.path.realpath(folder)
    if path.name in ("", ".", "..") or os.path.commonpath(
        [os.path.realpath(path.parent), root]
    ) != root:
        raise BadHubAnswer(f"{path} would resolve outside {root}")
    return path


@contextlib.asynccontextmanager
async def _file_lock(path: pathlib.Path | None, within: pathlib.Path | None) -> AsyncIterator[None]:
    """Hold the file lock at ``path`` (as ``huggingface_hub`` takes it), waiting cancellably."""
    if path is None:
        yield
        return
    check_inside(path, within).parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path, mode=0o664)
    while True:
        try:
            lock.acquire(timeout=0)
            break
        except filelock.Timeout:
            await asyncio.sleep(_LOCK_POLL_S)
    try:
        yield
    finally:
        lock.release()


def _open_partial(partial: pathlib.Path) -> int:
    # O_NOFOLLOW: a link planted under the partial's name must not redirect our writes
    return os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)


def resumable_bytes(dest: pathlib.Path) -> int:
    """The bytes of ``dest`` already on disk from an earlier, broken transfer (0 if none)."""
    try:
        return _partial(dest).stat().st_size
    except OSError:
        return 0


def _partial(dest: pathlib.Path) -> pathlib.Path:
    return dest.with_name(dest.name + ".incomplete")


def _sidecar(partial: pathlib.Path) -> pathlib.Path:
    return partial.with_name(partial.name + ".segments")


def _discard(partial: pathlib.Path) -> None:
    partial.unlink(missing_ok=True)
    _sidecar(partial).unlink(missing_ok=True)


def _contiguous_prefix(partial: pathlib.Path, fd: int) -> int:
    """Bytes at the head of ``partial`` known good; cuts off whatever a parallel plan left."""
    sidecar = _sidecar(partial)
    if not sidecar.exists():
        return os.fstat(fd).st_size
    plan = _Plan.load(sidecar, os.fstat(fd).st_size)
    prefix = 0
    if plan is not None:  # everything before the first unfinished segment is on disk
        first = min(plan.segments, default=[plan.size, plan.size, 0])
        prefix = first[0] + first[2]
    os.ftruncate(fd, prefix)
    sidecar.unlink(missing_ok=True)
    return prefix


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _split(data: bytes, limit: int) -> Iterator[bytes]:
    """``data`` in pieces of at most ``limit`` bytes, so no single write runs long."""
    for i in range(0, len(data), limit):
        yield data[i : i + limit]


def _new_hasher(spec: FileSpec) -> Any:
    if spec.sha256 is not None:
        return hashlib.sha256()
    if spec.git_sha1 is not None and spec.size is not None:
        return hashlib.sha1(b"blob %d\0" % spec.size)
    return None


async def _verify(spec: FileSpec, partial: pathlib.Path, actual: int, digest: str | None) -> None:
    if spec.size is not None and actual != spec.size:
        raise IntegrityError(f"{_where(spec.url)}: got {actual} bytes, expected {spec.size}")
    expected = spec.sha256 or spec.git_sha1
    if expected is None:
        return
    if digest is None:
        algo, head = ("sha256", b"") if spec.sha256 else ("sha1", b"blob %d\0" % actual)
        stop = threading.Event()
        try:
            digest = await asyncio.to_thread(_hash_file, partial, algo, head, stop)
        finally:
            stop.set()  # a cancelled await leaves the thread running; tell it to quit
    if digest != expected.lower():
        raise IntegrityError(f"{_where(spec.url)}: checksum {digest} != expected {expected}")


def _hash_file(path: pathlib.Path, algo: str, head: bytes, stop: threading.Event) -> str:
    hasher = hashlib.new(algo, head)
    with path.open("rb") as f:
        while not stop.is_set() and (chunk := f.read(_HASH_CHUNK)):
            hasher.update(chunk)
    return hasher.hexdigest()


def _body_limit(spec: FileSpec, resp: httpx.Response, offset: int) -> int:
    """The most bytes the file may reach with this body; refuses a body that cannot fit."""
    if spec.size is not None:
        _check_length(spec.url, resp, spec.size - offset)
        return spec.size
    if spec.max_size is None:
        return _UNLIMITED
    declared = _declared_length(spec.url, resp)
    if declared is not None and offset + declared > spec.max_size:
        raise _too_long(spec.url, spec.max_size)
    return spec.max_size


def _check_length(url: str, resp: httpx.Response, expected: int) -> None:
    """A body of a listed size must say so: identity encoding, ``Content-Length: expected``."""
    declared = _declared_length(url, resp)
    if declared is None:
        raise BadHubAnswer(f"{_where(url)} sent a body with no Content-Length ({expected} expected)")
    if declared != expected:
        raise BadHubAnswer(
            f"{_where(url)} announced {declared} bytes where {expected} were listed"
        )


def _declared_length(url: str, resp: httpx.Response) -> int | None:
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadHubAnswer(f"{_where(url)} sent a {encoding!r}-encoded body; identity was asked")
    return content_length(url, resp)


def content_length(url: str, resp: httpx.Response) -> int | None:
    """The ``Content-Length`` a server sent, None if it sent none; ``BadHubAnswer`` if it is
    not a plain number of sane size."""
    raw = resp.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isascii() or not raw.strip().isdigit() or len(raw.strip()) > 18:
        raise BadHubAnswer(f"{_where(url)} sent Content-Length {raw[:40]!r}")
    return int(raw)


def _too_long(url: str, limit: int) -> BadHubAnswer:
    return BadHubAnswer(f"{_where(url)} sent more than the {limit} bytes the file may have")


def _check_status(resp: httpx.Response, url: str) -> None:
    if (code := resp.status_code) in (200, 206):
        return
    if code == 416:
        raise _RangeRefused(f"{_where(url)} refused the range we asked for (416)")
    retriable = code >= 500 or code in (408, 429)
    raise DownloadFailed(f"{_where(url)} answered {code}", retriable=retriable)


@contextlib.contextmanager
def transport_errors(url: str) -> Iterator[None]:
    """Raise httpx's failures as ours: the network's retriable, the server's misdeeds not."""
    try:
        yield
    except (httpx.TooManyRedirects, httpx.UnsupportedProtocol) as exc:
        raise BadHubAnswer(f"{_where(url)} redirected badly: {exc}") from exc
    except httpx.TransportError as exc:
        raise DownloadFailed(
            f"transfer from {_where(url)} broke: {type(exc).__name__}: {exc}"
        ) from exc
    except httpx.HTTPError as exc:
        raise DownloadFailed(
            f"transfer from {_where(url)} failed: {type(exc).__name__}: {exc}", retriable=False
        ) from exc


def _where(url: str) -> str:
    """The url without its query, which may carry a signature."""
    return url.split("?", 1)[0]
