"""Where models come from: each vendor turns a ``model_download`` into a download plan.

``hf`` asks a Hugging Face hub (through ``huggingface_hub``) for the commit and its file list;
``url`` takes one plain HTTP(S) file, e.g. a GitHub release asset. rbee moves the bytes itself
(``actors.adapters.transfer``) because ``huggingface_hub`` has no cancel hook.

Whatever a hub answers is checked before it names a path: commit ids and blob ids must be
hex of their length, file paths relative and inside the snapshot, sizes whole numbers. A
hub's API answers go through :func:`hub_client_factory`'s client, which bounds how long a
silent connection is waited for, how big one answer may be and how many pages one listing
may take (``huggingface_hub`` itself waits forever and follows ``Link`` pages endlessly).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

import httpx
import httpx2
from huggingface_hub import HfApi, hf_hub_url, set_client_factory
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined]

from actors.adapters.cache import RepoLayout, check_commit, check_etag, is_commit
from actors.adapters.transfer import FileSpec, content_length, transport_errors
from actors.core.config import DownloadConfig
from actors.core.errors import (
    BadHubAnswer,
    DownloadFailed,
    InvalidRequest,
    ModelNotFound,
    UnsafePath,
)
from actors.core.operations import ModelDownload, check_relative_path

T = TypeVar("T")

_NAME_MAX = 255  #: bytes in one path component, as most filesystems allow
_PATH_MAX = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_FILE_SIZE = 1 << 50
_HUB_RETRIES = 5  #: huggingface_hub's http_backoff tries a request this many times more


@dataclass(frozen=True, slots=True)
class PlannedFile:
    path: str  #: inside the repository
    etag: str  #: the blob's name in the cache
    spec: FileSpec


@dataclass(frozen=True, slots=True)
class DownloadPlan:
    model: str
    revision: str
    commit: str
    layout: RepoLayout
    files: tuple[PlannedFile, ...]

    @property
    def bytes_total(self) -> int:
        return sum(f.spec.size or 0 for f in self.files)


class Vendor(Protocol):
    async def plan(self, op: ModelDownload) -> DownloadPlan: ...


@contextmanager
def hub_errors(model: str) -> Iterator[None]:
    """Translate ``huggingface_hub``/``httpx`` errors into rbee's, at the border."""
    try:
        yield
    except (
        httpx.TooManyRedirects,
        httpx.UnsupportedProtocol,
        httpx2.TooManyRedirects,
        httpx2.UnsupportedProtocol,
    ) as exc:
        raise BadHubAnswer(f"{model}: the hub redirected badly: {_first_line(exc)}") from exc
    except (
        RepositoryNotFoundError,
        RevisionNotFoundError,
        GatedRepoError,
        EntryNotFoundError,
    ) as exc:
        raise ModelNotFound(f"{model}: {type(exc).__name__}: {_first_line(exc)}") from exc
    except HfHubHTTPError as exc:
        raise DownloadFailed(f"{model}: the hub answered {_first_line(exc)}") from exc
    except (httpx.HTTPError, httpx2.HTTPError) as exc:  # huggingface_hub 2.x speaks httpx2
        raise DownloadFailed(f"{model}: cannot reach the hub: {exc!r}") from exc
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # answers it cannot parse
        raise BadHubAnswer(
            f"{model}: the hub's answer makes no sense: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class HfVendor:
    """A Hugging Face hub at ``endpoint`` (the public hub or any mirror speaking its API).

    ``huggingface_hub`` has one HTTP client per process: making a vendor makes it the bounded
    one of :func:`hub_client_factory` (rbee moves file bytes itself; only API calls use it).
    """

    def __init__(
        self,
        endpoint: str,
        token: str | None,
        cache_dir: Path,
        limits: DownloadConfig | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self._api = HfApi(endpoint=self.endpoint, token=token or False)
        self._cache_dir = cache_dir
        self._limits = limits or DownloadConfig()
        set_client_factory(hub_client_factory(self._limits))

    def __repr__(self) -> str:
        return f"HfVendor({self.endpoint!r})"  # never the token

    async def plan(self, op: ModelDownload) -> DownloadPlan:
        # every request counts: pages, and the redirects and retries huggingface_hub makes
        limits = self._limits
        slack = limits.max_redirects + _HUB_RETRIES
        with hub_errors(op.model):
            info = await asyncio.to_thread(
                _within_pages,
                _Pages(1 + slack, limits.max_api_bytes),
                self._api.model_info,
                op.model,
                revision=op.revision,
            )
            commit = check_commit(info.sha, "commit id")
            if is_commit(op.revision) and op.revision != commit:
                raise BadHubAnswer(f"asked for commit {op.revision}, the hub answered {commit}")
            pages = _Pages(limits.max_listing_pages + slack, limits.max_api_bytes)
            files = await asyncio.to_thread(_within_pages, pages, self._files, op.model, commit)
        chosen = list(filter_repo_objects(files, allow_patterns=op.files, key=lambda f: f.path))
        if op.files and not chosen:
            raise ModelNotFound(f"{op.model}@{commit[:12]}: no file matches {op.files}")
        layout = RepoLayout.of(self._cache_dir, op.model)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        planned = []
        for entry in chosen:
            sha256 = check_etag(entry.lfs.sha256, "LFS sha256", 64) if entry.lfs else None
            etag = sha256 or check_etag(entry.blob_id, f"blob id of {entry.path!r}", 40)
            url = hf_hub_url(op.model, entry.path, revision=commit, endpoint=self.endpoint)
            spec = FileSpec(
                url=url,
                dest=layout.inside(layout.blob(etag)),
                size=entry.size,
                sha256=sha256,
                git_sha1=None if sha256 else etag,
                headers=headers,
                lock=layout.lock(etag),
                within=layout.cache,
            )
            planned.append(PlannedFile(entry.path, etag, spec))
        return DownloadPlan(op.model, op.revision, commit, layout, tuple(planned))

    def _files(self, model: str, commit: str) -> list[RepoFile]:
        """The listing of ``commit``, every entry checked, at most ``max_files`` files."""
        files: dict[str, RepoFile] = {}
        for entry in self._api.list_repo_tree(model, revision=commit, recursive=True):
            if not isinstance(entry, RepoFile):
                continue
            _check_listed(entry)
            if entry.path in files:
                raise BadHubAnswer(f"the hub listed {entry.path!r} twice")
            files[entry.path] = entry
            if len(files) > self._limits.max_files:
                raise BadHubAnswer(
                    f"the hub listed more than {self._limits.max_files} files "
                    "(downloads.max_files)"
                )
        for path in files:
            parent = path.rpartition("/")[0]
            while parent:
                if parent in files:
                    raise BadHubAnswer(f"the hub listed {parent!r} as a file and as a folder")
                parent = parent.rpartition("/")[0]
        return list(files.values())


def _check_listed(entry: RepoFile) -> None:
    """One listed file: a path that stays in the snapshot, a size that is a size."""
    path = entry.path
    try:
        if not isinstance(path, str) or _CONTROL.search(path):
            raise UnsafePath(f"{path!r} has control characters")
        check_relative_path(path, "listed file")
    except UnsafePath as exc:
        raise BadHubAnswer(f"the hub listed a file the snapshot cannot hold: {exc.message}") from None
    if len(path.encode()) > _PATH_MAX or any(len(p.encode()) > _NAME_MAX for p in path.split("/")):
        raise BadHubAnswer(f"the hub listed a file name too long to store: {path[:80]!r}...")
    size = entry.size
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_FILE_SIZE:
        raise BadHubAnswer(f"the hub listed {path!r} with size {size!r}")
    if entry.lfs is not None and entry.lfs.size != size:
        raise BadHubAnswer(f"the hub listed {path!r} at {size} bytes and its LFS at {entry.lfs.size}")


class _Pages:
    """How many more requests one planning step may make, and how big each answer may be."""

    def __init__(self, left: int, max_bytes: int) -> None:
        self.left, self.max_bytes = left, max_bytes

    def charge(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise BadHubAnswer("the hub's listing does not end (downloads.max_listing_pages)")


_PAGES: contextvars.ContextVar[_Pages | None] = contextvars.ContextVar("rbee_pages", default=None)


def _within_pages(pages: _Pages, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)`` within ``pages``: so many requests, so big an answer each.

    Runs in a worker thread with its own copy of the context, so the budget is this call's.
    """
    _PAGES.set(pages)
    return call(*args, **kwargs)


class _Capped(httpx2.SyncByteStream):
    """A response body that raises once it grew past ``limit`` bytes."""

    def __init__(self, inner: Iterable[bytes], limit: int, url: str) -> None:
        self._inner, self._limit, self._url = inner, limit, url

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise BadHubAnswer(
                    f"{self._url.split('?')[0]} answered more than {self._limit} bytes "
                    "(downloads.max_api_bytes)"
                )
            yield chunk

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _Guarded(httpx2.BaseTransport):
    """Within a page budget (rbee's planning calls): charges each request to it and caps
    each answer's size. Other calls of the process pass through."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        pages = _PAGES.get()
        if pages is None:
            return self._inner.handle_request(request)
        pages.charge()
        response = self._inner.handle_request(request)
        response.stream = _Capped(response.stream, pages.max_bytes, str(request.url))  # type: ignore[arg-type]
        return response

    def close(self) -> None:
        self._inner.close()


def hub_client_factory(limits: DownloadConfig) -> Callable[[], httpx2.Client]:
    """What to give ``huggingface_hub.set_client_factory`` in a process that plans
    downloads: a client that waits ``stall_s`` for a silent hub (huggingface_hub's own waits
    forever) and follows ``max_redirects``; within a plan, pages and answer sizes are bounded."""
    from huggingface_hub.utils._http import hf_request_event_hook  # its user agent, request ids

    def build() -> httpx2.Client:
        return httpx2.Client(
            transport=_Guarded(httpx2.HTTPTransport()),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
            max_redirects=limits.max_redirects,
            timeout=httpx2.Timeout(limits.stall_s),
        )

    return build


class UrlVendor:
    """One plain file at an HTTP(S) address, cached under the model id the user chose."""

    def __init__(
        self, client: httpx.AsyncClient, cache_dir: Path, limits: DownloadConfig | None = None
    ) -> None:
        self._client = client
        self._cache_dir = cache_dir
        self._max_bytes = (limits or DownloadConfig()).url_max_bytes

    async def plan(self, op: ModelDownload) -> DownloadPlan:
        if not op.url:
            raise ModelNotFound("vendor 'url' needs a 'url' field")
        name = unquote(Path(urlparse(op.url).path).name)
        check_relative_path(name, "file name in the url")
        commit = hashlib.sha1(op.url.encode()).hexdigest()
        layout = RepoLayout.of(self._cache_dir, op.model)
        ref = layout.ref(op.revision)
        if ref.is_file() and ref.read_text().strip() != commit:
            raise InvalidRequest(
                f"{op.model}@{op.revision} already holds another download (a hub's or another "
                "url's); the url vendor does not replace it: delete the model or pick another id"
            )
        with transport_errors(op.url):
            head = await self._client.head(op.url, follow_redirects=True)
        if head.status_code == 404:
            raise ModelNotFound(f"{op.url}: 404 Not Found")
        if head.status_code >= 400:
            raise DownloadFailed(
                f"{op.url}: HTTP {head.status_code}", retriable=head.status_code >= 500
            )
        size = content_length(str(head.url), head)
        if size is None and self._max_bytes is None:
            raise DownloadFailed(
                f"{op.url} does not say how long it is; set downloads.url_max_bytes to take "
                "files of unknown length",
                retriable=False,
            )
        if size is not None and self._max_bytes is not None and size > self._max_bytes:
            raise DownloadFailed(
                f"{op.url} is {size} bytes, over downloads.url_max_bytes ({self._max_bytes})",
                retriable=False,
            )
        validator = head.headers.get("etag", "").strip('"').removeprefix("W/").strip('"')
        etag = hashlib.sha256(f"{op.url}\0{validator}\0{size}".encode()).hexdigest()
        spec = FileSpec(
            url=str(head.url),
            dest=layout.inside(layout.blob(etag)),
            size=size,
            max_size=self._max_bytes,
            lock=layout.lock(etag),
            within=layout.cache,
        )
        return DownloadPlan(op.model, op.revision, commit, layout, (PlannedFile(name, etag, spec),))

