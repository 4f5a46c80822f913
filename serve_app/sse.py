"""The wire format of job events (SPEC §4): ``id:``, ``event:``, one JSON ``data:`` line."""

from __future__ import annotations

import json
from typing import Any

KEEPALIVE = ": keep-alive\n\n"


def event(seq: int, kind: str, data: dict[str, Any]) -> str:
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def sentinel(state: str, error: dict[str, Any] | None) -> str:
    if state == "completed":
        return "data: [DONE]\n\n"
    if state == "cancelled":
        return "data: [CANCELLED]\n\n"
    message = (error or {}).get("message", "failed")
    return f"data: [ERROR] {' '.join(str(message).split())}\n\n"
