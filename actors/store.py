"""The registry's memory on disk (``RBEE_STATE_DIR``): a restarted registry still knows its jobs.

One JSON line per job change that matters (submitted, finished). On load the last line of
each job wins; a job that was not finished when the registry went away is reported as
failed with ``WORKER_DIED``, since nothing is running it any more.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from actors.core import JobRecord, JobState, LoggedEvent
from actors.errors import WorkerDied

log = logging.getLogger("rbee.store")

FILE = "jobs.jsonl"


class JobStore:
    def __init__(self, state_dir: Path | None, *, keep: int = 10_000) -> None:
        self._path = Path(state_dir) / FILE if state_dir else None
        self._keep = keep

    def save(self, record: JobRecord, events: list[LoggedEvent]) -> None:
        if self._path is None:
            return
        line = {
            "record": {**record.to_dict(), "request": record.request},
            "events": [[e.seq, e.kind, e.data] for e in events],
        }
        with self._path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")

    def load(self) -> list[tuple[dict[str, Any], list[LoggedEvent]]]:
        """Every remembered job, oldest first; rewrites the file compacted."""
        if self._path is None:
            return []
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if not self._path.exists():
            return []
        latest: dict[str, dict[str, Any]] = {}
        for number, raw in enumerate(self._path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                entry = json.loads(raw)
                latest.pop(entry["record"]["job_id"], None)
                latest[entry["record"]["job_id"]] = entry
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d is not a job line; skipped", self._path.name, number)
        kept = list(latest.values())[-self._keep :]
        out = []
        for entry in kept:
            record, events = entry["record"], [LoggedEvent(*e) for e in entry["events"]]
            if not JobState(record["state"]).terminal:
                error = WorkerDied("the registry restarted while the job was unfinished")
                next_seq = events[-1].seq + 1 if events else 1
                events.append(LoggedEvent(next_seq, "error", error.to_dict()))
                record.update(state=JobState.FAILED.value, error=error.to_dict())
                entry["events"] = [[e.seq, e.kind, e.data] for e in events]
            out.append((record, events))
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in kept))
        os.replace(tmp, self._path)
        return out
