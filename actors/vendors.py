"""Where models come from: each vendor turns a ``model_download`` into a download plan.

``hf`` asks a Hugging Face hub (through ``huggingface_hub``) for the commit and its file list;
``url`` takes one plain HTTP(S) file, e.g. a GitHub release asset. rbee moves the bytes itself
(``actors.transfer``) because ``huggingface_hub`` has no cancel hook.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import httpx
import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined]

from actors.cache import RepoLayout
from actors.errors import DownloadFailed, ModelNotFound
from actors.operations import ModelDownload, check_relative_path
from actors.transfer import FileSpec


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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class HfVendor:
    """A Hugging Face hub at ``endpoint`` (the public hub or any mirror speaking its API)."""

    def __init__(self, endpoint: str, token: str | None, cache_dir: Path) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self._api = HfApi(endpoint=self.endpoint, token=token or False)
        self._cache_dir = cache_dir

    async def plan(self, op: ModelDownload) -> DownloadPlan:
        with hub_errors(op.model):
            info = await asyncio.to_thread(self._api.model_info, op.model, revision=op.revision)
            commit = info.sha or op.revision
            entries = await asyncio.to_thread(
                lambda: list(self._api.list_repo_tree(op.model, revision=commit, recursive=True))
            )
        files = [e for e in entries if isinstance(e, RepoFile)]
        for entry in files:
            check_relative_path(entry.path, "file name listed by the hub")
        chosen = list(filter_repo_objects(files, allow_patterns=op.files, key=lambda f: f.path))
        if op.files and not chosen:
            raise ModelNotFound(f"{op.model}@{commit[:12]}: no file matches {op.files}")
        layout = RepoLayout.of(self._cache_dir, op.model)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        planned = []
        for entry in chosen:
            sha256 = entry.lfs.sha256 if entry.lfs else None
            etag = sha256 or entry.blob_id
            url = hf_hub_url(op.model, entry.path, revision=commit, endpoint=self.endpoint)
            spec = FileSpec(
                url=url,
                dest=layout.blob(etag),
                size=entry.size,
                sha256=sha256,
                git_sha1=None if sha256 else entry.blob_id,
                headers=headers,
            )
            planned.append(PlannedFile(entry.path, etag, spec))
        return DownloadPlan(op.model, op.revision, commit, layout, tuple(planned))


class UrlVendor:
    """One plain file at an HTTP(S) address, cached under the model id the user chose."""

    def __init__(self, client: httpx.AsyncClient, cache_dir: Path) -> None:
        self._client = client
        self._cache_dir = cache_dir

    async def plan(self, op: ModelDownload) -> DownloadPlan:
        if not op.url:
            raise ModelNotFound("vendor 'url' needs a 'url' field")
        name = unquote(Path(urlparse(op.url).path).name)
        check_relative_path(name, "file name in the url")
        try:
            head = await self._client.head(op.url, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise DownloadFailed(f"{op.url}: {exc!r}") from exc
        if head.status_code == 404:
            raise ModelNotFound(f"{op.url}: 404 Not Found")
        if head.status_code >= 400:
            raise DownloadFailed(
                f"{op.url}: HTTP {head.status_code}", retriable=head.status_code >= 500
            )
        size = int(head.headers["content-length"]) if "content-length" in head.headers else None
        commit = hashlib.sha1(op.url.encode()).hexdigest()
        validator = head.headers.get("etag", "").strip('"').removeprefix("W/").strip('"')
        etag = hashlib.sha256(f"{op.url}\0{validator}\0{size}".encode()).hexdigest()
        layout = RepoLayout.of(self._cache_dir, op.model)
        spec = FileSpec(url=str(head.url), dest=layout.blob(etag), size=size)
        return DownloadPlan(op.model, op.revision, commit, layout, (PlannedFile(name, etag, spec),))
