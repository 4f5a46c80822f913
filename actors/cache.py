"""The node's model cache, in the Hugging Face hub cache layout.

``models--org--name/{blobs,snapshots,refs}``: blobs are named by their etag (sha256 for LFS
files, git sha1 otherwise), snapshots hold relative symlinks into blobs, refs map a branch
to a commit. ``huggingface_hub.scan_cache_dir`` and ``snapshot_download(local_files_only=True)``
read what rbee writes, and rbee reads what they wrote.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from actors.errors import ModelNotFound
from actors.operations import check_model_id, check_relative_path

INCOMPLETE = ".incomplete"


@dataclass(frozen=True, slots=True)
class RepoLayout:
    """Where one model's files live in the cache."""

    root: Path

    @classmethod
    def of(cls, cache_dir: Path, model: str) -> RepoLayout:
        org, name = check_model_id(model).split("/")
        return cls(Path(cache_dir) / f"models--{org}--{name}")

    def blob(self, etag: str) -> Path:
        return self.root / "blobs" / etag

    def snapshot(self, commit: str, path: str = "") -> Path:
        base = self.root / "snapshots" / commit
        return base / check_relative_path(path) if path else base

    def write_ref(self, revision: str, commit: str) -> None:
        if revision == commit:
            return
        ref = self.root / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(ref.name + INCOMPLETE)
        tmp.write_text(commit)
        os.replace(tmp, ref)

    def link(self, commit: str, path: str, etag: str) -> Path:
        """Point ``snapshots/<commit>/<path>`` at its blob (relative, as huggingface_hub does)."""
        target = self.snapshot(commit, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(self.blob(etag), target.parent)
        tmp = target.with_name(target.name + INCOMPLETE)
        tmp.unlink(missing_ok=True)
        os.symlink(relative, tmp)
        os.replace(tmp, target)
        return target


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
        ref = layout.root / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        folder = layout.snapshot(commit)
        if not folder.is_dir():
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
