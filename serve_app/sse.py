"""The wire format of job events (SPEC §4): ``id:``, ``event:``, one JSON ``data:`` line."""

from __future__ import annotations

import json
from typing import Any

from actors.events import StreamEvent, payload

KEEPALIVE = ": keep-alive\n\n"


def event(item: StreamEvent) -> str:
    data = json.dumps(payload(item.event), separators=(",", ":"))
    return f"id: {item.id}\nevent: {item.event.kind}\ndata: {data}\n\n"


def sentinel(state: str, error: dict[str, Any] | None) -> str:
    if state == "completed":
        return "data: [DONE]\n\n"
    if state == "cancelled":
        return "data: [CANCELLED]\n\n"
    message = (error or {}).get("message", "failed")
    return f"data: [ERROR] {' '.join(str(message).split())}\n\n"
