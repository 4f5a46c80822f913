"""The hub token never shows: not in logs, events, errors, job records, the journal or reprs."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from actors.adapters.vendors import HfVendor
from actors.core.config import Config
from tests.conftest import HUB_TOKEN
from tests.helpers import read_sse, submit


def _download(api: httpx.Client, model: str) -> tuple[str, str]:
    """Run a download to its end; its id and the raw text of its stream."""
    job_id = submit(api, {"operation": "model_download", "model": model})
    read_sse(api, f"/v1/jobs/{job_id}/stream", deadline_s=60)
    return job_id, api.get(f"/v1/jobs/{job_id}/stream").text


def _files_holding(folder: Path, needle: bytes) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:
                continue  # a socket or a file that went away meanwhile
    return found


def test_the_hub_token_is_sent_and_shown_nowhere(api, hub, hive, ray_dir):
    good, missing, corrupt = (f"org/secret-{uuid.uuid4().hex[:8]}" for _ in range(3))
    hub.add_repo(good, {"config.json": b"{}", "model.bin": b"w" * 4096})
    hub.add_repo(corrupt, {"model.bin": b"c" * 4096})
    hub.inject_corrupt(corrupt, "model.bin")
    hub.require_token(HUB_TOKEN)
    try:
        outcomes = {name: _download(api, name) for name in (good, missing, corrupt)}
        hub.require_token("another-token")  # the hub now refuses ours: a 401 on every call
        outcomes["refused"] = _download(api, good.replace("secret", "refused"))
    finally:
        hub.require_token(None)
    states = {
        name: api.get(f"/v1/jobs/{job_id}").json()["state"]
        for name, (job_id, _) in outcomes.items()
    }
    assert states == {good: "completed", missing: "failed", corrupt: "failed", "refused": "failed"}

    for job_id, stream in outcomes.values():  # events, errors and the job record
        assert HUB_TOKEN not in stream
        assert HUB_TOKEN not in api.get(f"/v1/jobs/{job_id}").text
    assert HUB_TOKEN not in api.get("/v1/jobs", params={"limit": 1000}).text

    secret = HUB_TOKEN.encode()
    assert _files_holding(Path(hive.config.state_dir), secret) == []  # the journal
    assert _files_holding(ray_dir, secret) == []  # every log of every actor and worker
    # ... and those are the logs of the actor that used the token
    assert _files_holding(ray_dir, b":actor_name:DownloadActor")

    config = hive.config
    vendor = HfVendor(config.hub.endpoint, HUB_TOKEN, config.cache_dir, config.downloads)
    for shown in (
        repr(config),
        str(config),
        repr(config.hub),
        config.model_dump_json(),
        repr(vendor),
    ):
        assert HUB_TOKEN not in shown


def test_a_token_from_the_environment_is_kept_secret() -> None:
    config = Config.load(env={"RBEE_HUB_TOKEN": "hf_fromTheEnvironment"})
    assert config.hub.token is not None
    assert config.hub.token.get_secret_value() == "hf_fromTheEnvironment"
    assert "hf_fromTheEnvironment" not in repr(config) + config.model_dump_json()
