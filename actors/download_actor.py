"""``DownloadActor``: one per hive node; pulls models into that node's cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from ray.util import metrics

from actors.adapters.downloads import ModelDownloads
from actors.adapters.transfer import BandwidthLimiter, Downloader
from actors.adapters.vendors import HfVendor, UrlVendor, Vendor
from actors.core import logs
from actors.core.config import Config
from actors.core.events import StreamEvent
from actors.core.operations import ModelDownload
from actors.core.running import FLUSH_S, Stop, batched

_RATE_S = 1.0


class DownloadActor:
    def __init__(self, config: Config, hive_id: str = "") -> None:
        logs.configure()
        config = config.on_this_node()
        self._tags = {"hive_id": hive_id}
        cfg = config.downloads
        # A hub that goes silent is waited for stall_s, then the transfer is retried.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.stall_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=True,
            max_redirects=cfg.max_redirects,
        )
        downloader = Downloader(
            self._client,
            limiter=BandwidthLimiter(cfg.bandwidth_limit_bps),
            parallel_min_size=cfg.parallel_min_size,
            segments=cfg.segments,
            retries=cfg.retries,
        )
        token = config.hub.token.get_secret_value() if config.hub.token else None
        vendors: dict[str, Vendor] = {
            "hf": HfVendor(config.hub.endpoint, token, config.cache_dir, cfg),
            "url": UrlVendor(self._client, config.cache_dir, cfg),
        }
        self._moved = metrics.Counter(
            "rbee_download_bytes_total", "Bytes written by downloads", tag_keys=("hive_id",)
        )
        self._rate = metrics.Gauge(
            "rbee_download_rate_bps", "Bytes per second written by downloads", tag_keys=("hive_id",)
        )
        self._bytes = 0
        self._gauging = asyncio.create_task(self._report_rate())
        self._downloads = ModelDownloads(
            downloader,
            vendors,
            heartbeat_s=cfg.heartbeat_s,
            deadline_s=cfg.deadline_s,
            count_bytes=self._count,
        )

    def _count(self, moved: int) -> None:
        self._bytes += moved
        self._moved.inc(moved, tags=self._tags)

    async def _report_rate(self) -> None:
        """The bytes per second of the last ``_RATE_S``, for the dashboard."""
        last, at = self._bytes, time.monotonic()
        while True:
            await asyncio.sleep(_RATE_S)
            now = time.monotonic()
            self._rate.set((self._bytes - last) / (now - at), tags=self._tags)
            last, at = self._bytes, now

    async def run(
        self, job_id: str, op: ModelDownload, correlation_id: str | None = None, first_id: int = 1
    ) -> AsyncIterator[list[StreamEvent]]:
        """The job's events, numbered from ``first_id``, in bulk (the registry's copy)."""
        events = self._downloads.run(job_id, op, correlation_id, first_id)
        async for batch in batched(events, linger_s=FLUSH_S):
            yield batch

    async def watch(self, job_id: str, after: int) -> AsyncIterator[list[StreamEvent]]:
        """The job's events after ``after``, live, while it runs here."""
        async for batch in self._downloads.watch(job_id, after):
            yield batch

    async def cancel(self, job_id: str, stop: Stop) -> dict[str, Any]:
        return await self._downloads.cancel(job_id, stop)

    async def ready(self) -> bool:
        return True
