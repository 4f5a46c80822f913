"""The registry's memory on disk (``state_dir``): a restarted registry still knows its jobs.

One JSON line per job change that matters (submitted, finished), appended to ``jobs.jsonl``,
and one ``{"forget": id}`` line for a job deleted. On load the last line of each job wins; a job that was not finished when the registry went
away is reported as failed with ``WORKER_DIED``, since nothing is running it any more.

The journal stays bounded: when it holds more than twice ``keep`` lines it is rewritten with
the last line of the newest ``keep`` finished jobs and of every unfinished one (as many as the
registry holds: it never forgets an unfinished job either). A line that is not a
job (a torn write, a stray edit, bytes that are not UTF-8) is skipped with a warning; a state
dir that cannot be used, or that another live registry holds, leaves the registry running
without memory, never failing to start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from actors.core.errors import RbeeError, WorkerDied
from actors.core.events import Error, StreamEvent, Token, event_from, payload
from actors.core.table import JobRecord, JobState

log = logging.getLogger("rbee.store")

FILE = "jobs.jsonl"
LOCK = "jobs.lock"
#: Fields ``JobTable.restore`` reads; a saved record must have them all.
_FIELDS = ("job_id", "operation", "correlation_id", "state", "created_at")
_OPTIONAL = ("started_at", "finished_at", "progress", "result", "error")

Saved = tuple[dict[str, Any], list[StreamEvent]]


@dataclass(frozen=True, slots=True)
class _Line:
    """Where a job's latest line is in the journal."""

    offset: int
    length: int
    terminal: bool


class JobStore:
    def __init__(
        self, state_dir: Path | None, *, keep: int = 100_000, lock_wait_s: float = 5.0
    ) -> None:
        self._dir = Path(state_dir) if state_dir else None
        self._path = self._dir / FILE if self._dir else None
        self._keep = keep
        self._lock_wait_s = lock_wait_s
        self._lock: IO[bytes] | None = None
        self._index: OrderedDict[str, _Line] = OrderedDict()  #: job id -> its latest line
        self.interrupted: list[str] = []  #: jobs ``load`` ended: they may still be running
        self._lines = 0  #: lines in the journal, superseded ones included
        self._failing = False

    @property
    def path(self) -> Path | None:
        """The journal, or None when this store remembers nothing."""
        return self._path

    def save(self, record: JobRecord, events: list[StreamEvent]) -> None:
        """Append the job's current record (and its events); never raises on a disk error."""
        if self._path is None:
            return
        entry = {
            "record": {**record.to_dict(), "request": record.request},
            "events": [_line(e) for e in events],
        }
        data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            with self._path.open("ab") as f:
                offset = os.fstat(f.fileno()).st_size
                f.write(data)
            self._index[record.job_id] = _Line(offset, len(data), record.state.terminal)
            self._index.move_to_end(record.job_id)
            self._lines += 1
            if self._lines > 2 * self._keep:
                self._compact()
        except OSError as exc:
            if not self._failing:
                log.warning("cannot write the job journal %s: %s", self._path, exc)
            self._failing = True
            return
        if self._failing:
            log.info("the job journal %s is writable again", self._path)
            self._failing = False

    def forget(self, job_id: str) -> None:
        """Forget a job: a line that says so (the next compaction drops both)."""
        if self._path is None or job_id not in self._index:
            return
        data = (json.dumps({"forget": job_id}) + "\n").encode()
        try:
            with self._path.open("ab") as f:
                f.write(data)
        except OSError as exc:
            log.warning("cannot write the job journal %s: %s", self._path, exc)
            return
        del self._index[job_id]
        self._lines += 1

    def load(self) -> list[Saved]:
        """Every remembered job, oldest first; rewrites the file compacted.

        Takes the state dir for this store (one registry at a time): when another live
        registry holds it, or it cannot be made or read, the store remembers nothing.
        """
        if self._path is None or self._dir is None:
            return []
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            if not self._take_lock():
                self._disable(f"another rbee registry is using {self._dir}")
                return []
            raw = self._path.read_bytes() if self._path.exists() else b""
        except OSError as exc:
            self._disable(f"{self._dir} is not usable: {exc}")
            return []
        latest: OrderedDict[str, Saved] = OrderedDict()
        for number, line in enumerate(raw.splitlines(), 1):
            if (forgotten := _forgotten(line)) is not None:
                latest.pop(forgotten, None)
                continue
            saved = _parse(line)
            if saved is None:
                if line.strip():
                    log.warning("%s:%d is not a job line; skipped", self._path, number)
                continue
            job_id = saved[0]["job_id"]
            latest.pop(job_id, None)
            latest[job_id] = saved
        kept = _newest(latest, self._keep)
        for record, events in kept:
            if not JobState(record["state"]).terminal:  # saved when submitted: it may run
                error = WorkerDied("the registry restarted while the job was unfinished")
                _end(record, events, JobState.FAILED, error)
                self.interrupted.append(record["job_id"])
        kept.sort(key=lambda saved: saved[0]["created_at"])
        try:
            self._rewrite(kept)
        except OSError as exc:
            log.warning("cannot rewrite the job journal %s: %s", self._path, exc)
        return kept

    def settle(self, state: JobState, error: RbeeError) -> list[str]:
        """End every job the journal still holds as unfinished (``state``, ``error``), once
        nothing runs them any more (after a shutdown); returns their ids."""
        if self._path is None:
            return []
        unfinished: list[str] = []
        try:
            if not self._take_lock():
                return []
            raw = self._path.read_bytes() if self._path.exists() else b""
        except OSError as exc:
            log.warning("cannot read the job journal %s: %s", self._path, exc)
            return []
        latest: dict[str, Saved] = {}
        for line in raw.splitlines():
            saved = _parse(line)
            if saved is not None:
                latest[saved[0]["job_id"]] = saved
        lines = []
        for job_id, (record, events) in latest.items():
            if JobState(record["state"]).terminal:
                continue
            _end(record, events, state, error)
            unfinished.append(job_id)
            lines.append(_dumps(record, events))
        if lines:
            try:
                with self._path.open("ab") as f:
                    f.write("".join(lines).encode())
            except OSError as exc:
                log.warning("cannot write the job journal %s: %s", self._path, exc)
                return []
        return unfinished

    def close(self) -> None:
        """Let another registry take the state dir."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _take_lock(self) -> bool:
        if self._lock is not None or self._dir is None:
            return True
        handle = (self._dir / LOCK).open("ab")
        deadline = time.monotonic() + self._lock_wait_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    handle.close()
                    raise
                if time.monotonic() >= deadline:  # e.g. a registry being restarted, still going
                    handle.close()
                    return False
                time.sleep(0.1)
                continue
            self._lock = handle
            return True

    def _disable(self, why: str) -> None:
        log.warning(
            "%s: this registry will not remember its jobs across a restart "
            "(set RBEE_STATE_DIR to another folder)",
            why,
        )
        self._path = None

    def _compact(self) -> None:
        """Rewrite the journal with the latest line of the newest ``keep`` jobs and of every
        unfinished one, copied as they are (nothing is parsed)."""
        assert self._path is not None
        terminal = [job_id for job_id, line in self._index.items() if line.terminal]
        dropped = set(terminal[: max(0, len(terminal) - self._keep)])
        index: OrderedDict[str, _Line] = OrderedDict()
        tmp = self._path.with_suffix(".tmp")
        with self._path.open("rb") as old, tmp.open("wb") as new:
            for job_id, line in self._index.items():
                if job_id in dropped:
                    continue
                old.seek(line.offset)
                data = old.read(line.length)
                index[job_id] = _Line(new.tell(), len(data), line.terminal)
                new.write(data)
        os.replace(tmp, self._path)
        self._index, self._lines = index, len(index)

    def _rewrite(self, kept: list[Saved]) -> None:
        assert self._path is not None
        index: OrderedDict[str, _Line] = OrderedDict()
        tmp = self._path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            for record, events in kept:
                data = _dumps(record, events).encode()
                index[record["job_id"]] = _Line(f.tell(), len(data), True)
                f.write(data)
        os.replace(tmp, self._path)
        self._index, self._lines = index, len(index)


def _parse(line: bytes) -> Saved | None:
    """A journal line as a record and its events, or None if it is not a whole job line."""
    try:
        entry = json.loads(line)
        record, raw_events = entry["record"], entry["events"]
        if not isinstance(record, dict) or not isinstance(raw_events, list):
            return None
        if any(key not in record for key in _FIELDS):
            return None
        if not isinstance(record["job_id"], str) or not isinstance(record["operation"], str):
            return None
        JobState(record["state"])
        if not isinstance(record["created_at"], int | float):
            return None
        for key in _OPTIONAL:
            record.setdefault(key, None)
        events = []
        for seq, kind, data, *wire in raw_events:
            if not isinstance(seq, int) or not isinstance(kind, str) or not isinstance(data, dict):
                return None
            event = event_from(kind, data)
            if isinstance(event, Token) and wire and isinstance(wire[0], str):
                event = Token(event.text, event.index, event.choice, wire[0])
            if event is not None:
                events.append(StreamEvent(seq, event))
    except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError too
        return None
    return record, events


def _forgotten(line: bytes) -> str | None:
    """The job a ``{"forget": id}`` line forgets, or None for any other line."""
    if not line.startswith(b'{"forget"'):
        return None
    try:
        job_id = json.loads(line)["forget"]
    except (ValueError, KeyError, TypeError):
        return None
    return job_id if isinstance(job_id, str) else None


def _newest(latest: OrderedDict[str, Saved], keep: int) -> list[Saved]:
    """The newest ``keep`` finished jobs (by last change) and every unfinished one."""
    finished = [i for i, (record, _) in latest.items() if JobState(record["state"]).terminal]
    dropped = set(finished[: max(0, len(finished) - keep)])
    return [saved for job_id, saved in latest.items() if job_id not in dropped]


def _end(
    record: dict[str, Any], events: list[StreamEvent], state: JobState, error: RbeeError
) -> None:
    next_seq = events[-1].id + 1 if events else 1
    events.append(StreamEvent(next_seq, Error(**error.to_dict())))
    record.update(state=state.value, error=error.to_dict())
    record["finished_at"] = record["finished_at"] or time.time()


def _dumps(record: dict[str, Any], events: list[StreamEvent]) -> str:
    entry = {"record": record, "events": [_line(e) for e in events]}
    return json.dumps(entry, separators=(",", ":")) + "\n"


def _line(logged: StreamEvent) -> list[Any]:
    """An event as the journal keeps it; a token with its answer's frames keeps them too (a
    background response's stream is replayed from them after a restart)."""
    line = [logged.id, logged.event.kind, payload(logged.event)]
    if isinstance(logged.event, Token) and logged.event.wire is not None:
        line.append(logged.event.wire)
    return line
