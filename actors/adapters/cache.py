"""The node's model cache, in the Hugging Face hub cache layout.

``models--org--name/{blobs,snapshots,refs}``: blobs are named by their etag (sha256 for LFS
files, git sha1 otherwise), snapshots hold relative symlinks into blobs, refs map a branch
to a commit. ``huggingface_hub.scan_cache_dir`` and ``snapshot_download(local_files_only=True)``
read what rbee writes, and rbee reads what they wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from actors.adapters.transfer import check_inside
from actors.core.errors import BadHubAnswer, ModelNotFound
from actors.core.operations import check_model_id, check_relative_path

INCOMPLETE = ".incomplete"

_COMMIT = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  #: git blob sha1, or an LFS file's sha256


def is_commit(value: str) -> bool:
    """Whether ``value`` is a commit id as git writes it (40 lowercase hex digits)."""
    return _COMMIT.fullmatch(value) is not None


def check_commit(commit: object, what: str = "commit id") -> str:
    """A commit id as git writes it, or ``BadHubAnswer``."""
    if not isinstance(commit, str) or not is_commit(commit):
        raise BadHubAnswer(f"the hub sent {what} {_shown(commit)}: not 40 hex digits")
    return commit


def check_etag(etag: object, what: str = "blob id", digits: int | None = None) -> str:
    """A blob name: a git sha1 or a sha256 (``digits`` long when given), in lowercase hex,
    or ``BadHubAnswer``."""
    if (
        not isinstance(etag, str)
        or not _ETAG.fullmatch(etag)
        or (digits is not None and len(etag) != digits)
    ):
        kind = {40: "a sha1", 64: "a sha256"}.get(digits or 0, "a sha1 or sha256")
        raise BadHubAnswer(f"the hub sent {what} {_shown(etag)}: not {kind} in hex")
    return etag


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:117]}..."


@dataclass(frozen=True, slots=True)
class RepoLayout:
    """Where one model's files live in the cache.

    Every path it hands out or writes is checked to stay inside ``cache``, symlinks
    resolved: whatever a hub sends, nothing rbee creates, links or replaces lands outside.
    """

    root: Path
    cache: Path  #: the cache folder, resolved

    @classmethod
    def of(cls, cache_dir: Path, model: str) -> RepoLayout:
        org, name = check_model_id(model).split("/")
        return cls(Path(cache_dir) / f"models--{org}--{name}", Path(os.path.realpath(cache_dir)))

    def inside(self, path: Path) -> Path:
        """``path``, once the folder it is in resolves to a place inside the cache."""
        return check_inside(path, self.cache)

    def blob(self, etag: str) -> Path:
        return self.root / "blobs" / check_etag(etag)

    def lock(self, etag: str) -> Path:
        """The lock ``huggingface_hub`` takes around this blob (``.locks/models--…/<etag>.lock``)."""
        return self.cache / ".locks" / self.root.name / f"{check_etag(etag)}.lock"

    def snapshot(self, commit: str, path: str = "") -> Path:
        base = self.root / "snapshots" / check_commit(commit)
        return base / check_relative_path(path) if path else base

    def ref(self, revision: str) -> Path:
        return self.root / "refs" / check_relative_path(revision, "revision")

    def write_ref(self, revision: str, commit: str) -> None:
        if revision == commit:
            return
        ref = self.inside(self.ref(revision))
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.inside(_temporary(ref))
        tmp.write_text(commit)
        os.replace(tmp, self.inside(ref))

    def link(self, commit: str, path: str, etag: str) -> Path:
        """Point ``snapshots/<commit>/<path>`` at its blob (relative, as huggingface_hub does)."""
        target = self.inside(self.snapshot(commit, path))
        target.parent.mkdir(parents=True, exist_ok=True)
        self.inside(target)  # again: the folders exist now, whatever links they hold
        relative = os.path.relpath(self.blob(etag), target.parent)
        tmp = _temporary(target)
        os.symlink(relative, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return target


def _temporary(path: Path) -> Path:
    """A name beside ``path`` that no file of a repository can have taken."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{INCOMPLETE}")


class Catalog:
    """What models a node holds, read from its cache."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def list(self) -> list[dict[str, Any]]:
        try:
            info = scan_cache_dir(self.cache_dir)
        except CacheNotFound:
            return []
        return sorted(
            (_describe(repo) for repo in info.repos if repo.repo_type == "model"),
            key=lambda m: m["model"],
        )

    def get(self, model: str) -> dict[str, Any]:
        check_model_id(model)
        for entry in self.list():
            if entry["model"] == model:
                return entry
        raise ModelNotFound(f"model {model!r} is not in this hive's cache")

    def delete(self, model: str) -> dict[str, Any]:
        entry = self.get(model)
        shutil.rmtree(RepoLayout.of(self.cache_dir, model).root)
        return {"model": model, "deleted": True, "size_on_disk": entry["size_on_disk"]}

    def local_path(self, model: str, revision: str = "main") -> Path:
        """The snapshot folder of a downloaded model (what an engine loads)."""
        layout = RepoLayout.of(self.cache_dir, model)
        ref = layout.ref(revision)
        commit = ref.read_text().strip() if ref.is_file() else revision
        try:
            folder = layout.inside(layout.snapshot(commit))
        except BadHubAnswer:
            folder = None
        if folder is None or not folder.is_dir():
            raise ModelNotFound(f"model {model!r} at {revision!r} is not in this hive's cache")
        return folder


def _describe(repo: Any) -> dict[str, Any]:
    revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
    return {
        "model": repo.repo_id,
        "size_on_disk": repo.size_on_disk,
        "nb_files": repo.nb_files,
        "last_modified": repo.last_modified,
        "revisions": [
            {
                "commit": rev.commit_hash,
                "refs": sorted(rev.refs),
                "files": sorted(
                    ({"path": _relative(f, rev), "size": f.size_on_disk} for f in rev.files),
                    key=lambda f: f["path"],
                ),
            }
            for rev in revisions
        ],
    }


def _relative(file: Any, rev: Any) -> str:
    return Path(file.file_path).relative_to(rev.snapshot_path).as_posix()
