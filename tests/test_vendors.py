"""Vendors turn a model_download into a checked plan (no Ray: a real fake hub, real httpx)."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from actors.adapters.transfer import Downloader
from actors.adapters.vendors import HfVendor, UrlVendor
from actors.core.config import DownloadConfig
from actors.core.errors import BadHubAnswer, DownloadFailed
from actors.core.operations import ModelDownload
from tests.fakehub import FakeHub

DATA = b"x" * 1000


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        yield hub


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, follow_redirects=True) as client:
        yield client


def _url_op(url: str) -> ModelDownload:
    return ModelDownload(operation="model_download", model="local/file", vendor="url", url=url)


def _lengthless(hub: FakeHub, name: str) -> str:
    url = hub.add_file(name, DATA)
    hub.inject_body(FakeHub.PLAIN, name, "no_length")
    hub.hide_head_length(FakeHub.PLAIN, name)
    return url


async def test_url_without_a_length_needs_a_configured_cap(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    url = _lengthless(hub, "a.bin")
    with pytest.raises(DownloadFailed, match="url_max_bytes") as refused:
        await UrlVendor(client, tmp_path).plan(_url_op(url))
    assert refused.value.retriable is False

    plan = await UrlVendor(client, tmp_path, DownloadConfig(url_max_bytes=4096)).plan(_url_op(url))
    spec = plan.files[0].spec
    assert spec.size is None and spec.max_size == 4096
    assert (await Downloader(client).fetch(spec)).read_bytes() == DATA


async def test_url_body_past_the_cap_is_cut_off_and_removed(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    url = _lengthless(hub, "b.bin")
    plan = await UrlVendor(client, tmp_path, DownloadConfig(url_max_bytes=100)).plan(_url_op(url))
    with pytest.raises(BadHubAnswer, match="more than the 100 bytes"):
        await Downloader(client).fetch(plan.files[0].spec)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 100] == []


async def test_url_over_the_cap_is_refused_at_once(
    hub: FakeHub, client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    url = hub.add_file("c.bin", DATA)
    with pytest.raises(DownloadFailed, match=r"over downloads\.url_max_bytes"):
        await UrlVendor(client, tmp_path, DownloadConfig(url_max_bytes=10)).plan(_url_op(url))
    assert hub.count("GET") == 0


async def test_hf_plan_names_only_checked_paths(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    commit = hub.add_repo("org/tiny", {"config.json": b"{}", "w/model.bin": DATA})
    vendor = HfVendor(hub.url, "hf_secret", tmp_path)
    op = ModelDownload(operation="model_download", model="org/tiny")
    plan = await vendor.plan(op)
    assert plan.commit == commit
    for planned in plan.files:
        spec = planned.spec
        assert spec.dest.parent == tmp_path / "models--org--tiny" / "blobs"
        assert spec.lock == tmp_path / ".locks" / "models--org--tiny" / f"{planned.etag}.lock"
        assert spec.within == tmp_path.resolve()
        assert "hf_secret" not in repr(spec)
    assert "hf_secret" not in repr(vendor)


async def test_hf_listing_is_bounded_in_pages_and_files(
    hub: FakeHub, tmp_path: pathlib.Path
) -> None:
    hub.add_repo("org/endless", {"a.bin": DATA})
    hub.endless_listing("org/endless", empty_pages=True)
    op = ModelDownload(operation="model_download", model="org/endless")
    limits = DownloadConfig(max_listing_pages=5, max_redirects=0)
    with pytest.raises(BadHubAnswer, match="does not end"):
        await HfVendor(hub.url, None, tmp_path, limits).plan(op)
    assert hub.count("GET", "/tree/") <= 5 + 5  # the pages, and huggingface_hub's retries

    hub.endless_listing("org/endless", empty_pages=False)
    limits = DownloadConfig(max_files=250)
    with pytest.raises(BadHubAnswer, match="more than 250 files"):
        await HfVendor(hub.url, None, tmp_path, limits).plan(op)


async def test_hf_api_answers_are_bounded_in_size(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    hub.add_repo("org/wordy", {"a.bin": DATA})
    entry = {"type": "file", "path": "a.bin", "size": len(DATA), "oid": "0" * 40}
    hub.lie("org/wordy", tree=[{**entry, "path": f"f{i}.bin"} for i in range(200)])
    op = ModelDownload(operation="model_download", model="org/wordy")
    with pytest.raises(BadHubAnswer, match="max_api_bytes"):
        await HfVendor(hub.url, None, tmp_path, DownloadConfig(max_api_bytes=4096)).plan(op)
