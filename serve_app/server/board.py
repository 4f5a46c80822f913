"""The jobs board: every job's row, live, for the web page (``GET /v1/jobs/watch``).

A watcher gets the whole board (the newest jobs) first, then only the rows that changed, at
most a few times a second however busy the hive is. Its position is ``<epoch>.<seq>``: the
SSE ``id:``, so a watcher that reconnects with ``Last-Event-ID`` gets what it missed, and one
whose position means nothing any more (a registry that restarted) gets the whole board again.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError

from actors.core.config import Config
from actors.core.errors import InvalidRequest
from actors.registry_client import RETRY_S, Registry

log = logging.getLogger("rbee.board")

FRAME_EVERY_S = 0.25
"""The shortest time between two frames to one watcher: changes in between ride together."""
_POSITION = re.compile(r"([0-9a-f]{1,32})\.([0-9]{1,18})")


@dataclass(frozen=True, slots=True)
class Position:
    epoch: str | None = None
    seq: int | None = None  #: None: a new watcher

    @classmethod
    def parse(cls, raw: str | None) -> Position:
        """A ``Last-Event-ID`` of the board (``<epoch>.<seq>``); the start if None."""
        if raw is None:
            return cls()
        found = _POSITION.fullmatch(raw)
        if found is None:
            raise InvalidRequest("Last-Event-ID of the jobs board must look like '<epoch>.<seq>'")
        return cls(found.group(1), int(found.group(2)))

    def __str__(self) -> str:
        return f"{self.epoch}.{self.seq}"


class Board:
    def __init__(self, config: Config, registry: Registry) -> None:
        self._keepalive_s = config.server.keepalive_s
        self.registry = registry

    async def follow(
        self, start: Position, limit: int
    ) -> AsyncIterator[tuple[Position, dict[str, Any]] | None]:
        """The board's changes from ``start`` (the whole board first when ``start`` cannot
        be followed on): ``(position, {"reset", "jobs", "forgotten"})``, or None for each
        keep-alive period without news. Never ends by itself: a registry that dies is
        waited for (it comes back with every record: the whole board is sent again)."""
        loop = asyncio.get_running_loop()
        at = start
        while True:
            asked = loop.time()
            try:
                changes = await self.registry.board(
                    after=at.seq, limit=limit, poll_s=self._keepalive_s, epoch=at.epoch
                )
            except RayActorError as exc:
                log.info("jobs board: the registry is restarting: %r", exc)
                await asyncio.sleep(RETRY_S)
                yield None
                continue
            if not (changes["reset"] or changes["jobs"] or changes["forgotten"]):
                yield None
                continue
            at = Position(changes["epoch"], changes["seq"])
            yield at, {k: changes[k] for k in ("reset", "jobs", "forgotten")}
            await asyncio.sleep(max(0.0, FRAME_EVERY_S - (loop.time() - asked)))
