"""How the ``rbee`` CLI shows things: a job's live events (and Ctrl+C while they flow), and
the results of each command.

Human output goes to the terminal (the answer on stdout, progress and narration on stderr, so
``path=$(rbee model download org/x)`` works); ``--json`` prints JSON on stdout instead.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

from actors.core.events import Narration, Result, Token, payload
from actors.core.events import Progress as ProgressEvent
from serve_app.client.api import Client, StreamEvent

#: Piped output is not cut to 80 columns: scripts get whole ids and paths.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 500)
err = Console(stderr=True, highlight=False)

Renderer = Callable[[dict[str, Any]], None]
INTERRUPTED = 130  #: the exit code after Ctrl+C


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str), flush=True)


class _Rate(ProgressColumn):
    """The server's transfer rate (rich's own estimate is wrong for a replayed stream)."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate_bps")
        return Text(f"{decimal(int(rate))}/s" if rate else "?", style="progress.data.speed")


class _Eta(ProgressColumn):
    """The server's estimate of the time left."""

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta_s")
        shown = "-:--:--" if eta is None else str(timedelta(seconds=round(eta)))
        return Text(shown, style="progress.remaining")


class JobView:
    """Shows one job's events as they arrive.

    ``json_lines``: one JSON object per event on stdout. Otherwise a download bar (bytes,
    and the server's rate and ETA) fed by ``progress`` events, tokens printed as they come, narration as dim
    lines on stderr (``narration=False`` keeps only warnings). ``error`` events are left
    to the caller, which gets them raised by ``Client.stream``.
    """

    def __init__(
        self, *, json_lines: bool = False, narration: bool = True, console: Console | None = None
    ) -> None:
        self.json_lines = json_lines
        self.console = console or err
        self.narration = narration
        self.result: dict[str, Any] = {}
        self.printed_tokens = False
        self._tail = "\n"
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self.job_id = ""

    def started(self, job_id: str, what: str, hint: str = "Ctrl+C cancels") -> None:
        self.job_id = job_id
        if not self.json_lines and self.narration:
            line = f"[bold]{job_id}[/] {escape(what)}  [dim]({hint})[/]"
            self.console.print(line, soft_wrap=True)

    def show(self, item: StreamEvent) -> None:
        event = item.event
        if isinstance(event, Result):
            self.result = event.value
        if self.json_lines:
            line = {"job_id": self.job_id, "id": item.id, "event": event.kind}
            print(json.dumps({**line, "data": payload(event)}), flush=True)
        elif isinstance(event, ProgressEvent):
            self._progress(event)
        elif isinstance(event, Token):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            self.printed_tokens = True
            self._tail = event.text[-1:] or self._tail
        elif isinstance(event, Narration) and (self.narration or event.level == "warn"):
            style = "yellow" if event.level == "warn" else "dim"
            console = self._bar.console if self._bar is not None else self.console
            text = f"[{style}]{escape(event.actor)}: {escape(event.message)}[/]"
            console.print(text, soft_wrap=True)

    def _progress(self, event: ProgressEvent) -> None:
        if self._bar is None:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                _Rate(),
                _Eta(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=event.bytes_total or None)
        assert self._task is not None
        self._bar.update(
            self._task,
            completed=event.bytes_done,
            total=event.bytes_total or None,
            description=escape(event.file or "download"),
            rate_bps=event.rate_bps,
            eta_s=event.eta_s,
        )

    def close(self) -> None:
        """Stop the live display (idempotent); end a token stream with its newline."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.printed_tokens and self._tail != "\n":
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._tail = "\n"


def follow(client: Client, job_id: str, view: JobView, after: int | None = None) -> None:
    """Show the job's events until it ends; Ctrl+C raises ``KeyboardInterrupt`` here.

    The stream is read on a helper thread and Ctrl+C only sets a flag, so the interrupt never
    lands inside httpx or a half-drawn progress bar, and is noticed within 0.1 s.
    """
    items: queue.Queue[StreamEvent | BaseException | None] = queue.Queue()

    def pump() -> None:
        try:
            for item in client.stream(job_id, last_event_id=after):
                items.put(item)
            items.put(None)
        except BaseException as exc:
            items.put(exc)

    threading.Thread(target=pump, name="rbee-stream", daemon=True).start()
    interrupted = threading.Event()

    def on_interrupt(*_: object) -> None:
        interrupted.set()
        signal.signal(signal.SIGINT, exit_now)  # a second Ctrl+C exits at once

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        while not interrupted.is_set():
            try:
                item = items.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            view.show(item)
    finally:
        if not interrupted.is_set():
            signal.signal(signal.SIGINT, previous)
    raise KeyboardInterrupt


def exit_now(*_: object) -> None:
    """The second Ctrl+C: leave at once, whatever is still in flight."""
    sys.stderr.write("\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def size(n: Any) -> str:
    return decimal(int(n)) if isinstance(n, int | float) else "-"


def when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return "-" if value is None else str(value)


def key_values(record: Mapping[str, Any], title: str | None = None) -> None:
    table = Table(show_header=False, box=None, title=title, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in record.items():
        shown = size(value) if key.endswith("bytes") or key == "size_on_disk" else _cell(value)
        table.add_row(key, escape(shown))
    out.print(table)


def rows(items: Sequence[Mapping[str, Any]], empty: str) -> None:
    """A table of dicts, one column per key (in first-seen order)."""
    if not items:
        err.print(empty)
        return
    columns: dict[str, None] = {}
    for item in items:
        columns.update(dict.fromkeys(item))
    table = Table(box=None)
    for column in columns:
        wide = column in ("job_id", "model", "path")
        table.add_column(column.upper(), no_wrap=wide, overflow="fold", min_width=None)
    for item in items:
        table.add_row(*(escape(_cell(item.get(c))) for c in columns))
    out.print(table)


def downloaded(result: dict[str, Any]) -> None:
    commit = str(result.get("commit", ""))[:12]
    files = result.get("files") or []
    total = size(result.get("bytes_total"))
    err.print(f"[green]downloaded[/] {result.get('model')}@{commit}: {len(files)} files, {total}")
    print(result.get("path", ""), flush=True)


def models(result: dict[str, Any]) -> None:
    entries = result.get("models") or []
    rows(
        [
            {
                "model": m["model"],
                "size": size(m.get("size_on_disk")),
                "files": m.get("nb_files"),
                "refs": sorted({r for rev in m.get("revisions", []) for r in rev.get("refs", [])}),
                "modified": when(m.get("last_modified")),
            }
            for m in entries
        ],
        f"no models in hive {result.get('hive_id')}",
    )


def model(result: dict[str, Any]) -> None:
    revisions = result.get("revisions") or [{}]
    latest = revisions[0]
    summary = {
        "model": result.get("model"),
        "hive_id": result.get("hive_id"),
        "commit": latest.get("commit"),
        "refs": latest.get("refs"),
        "size_on_disk": result.get("size_on_disk"),
        "modified": when(result.get("last_modified")),
    }
    key_values(summary)
    files = latest.get("files") or []
    rows([{"path": f["path"], "size": size(f.get("size"))} for f in files], "no files")


def deleted(result: dict[str, Any]) -> None:
    out.print(f"deleted {result.get('model')} ({size(result.get('size_on_disk'))} freed)")


def hives(result: dict[str, Any]) -> None:
    shown = ("hive_id", "address", "alive", "cpus", "gpus")
    listed = [
        {**{k: h.get(k) for k in shown}, "memory": size(h.get("memory_bytes"))}
        for h in result.get("hives") or []
    ]
    rows(listed, "no hives")


_WORKER_COLUMNS = ("worker_id", "model", "device", "state", "running_jobs", "served", "hive_id")


def workers(result: dict[str, Any]) -> None:
    listed = result.get("workers")
    if not isinstance(listed, list):
        key_values(result)
        return
    rows([{k: w[k] for k in _WORKER_COLUMNS if k in w} for w in listed], "no workers")


def inferred(view: JobView) -> Renderer:
    """Tokens were printed live; print the text only if none came as tokens."""

    def render(result: dict[str, Any]) -> None:
        text = result.get("text")
        if not view.printed_tokens and isinstance(text, str):
            print(text, flush=True)

    return render


def jobs(records: list[dict[str, Any]]) -> None:
    rows(
        [
            {
                "job_id": r["job_id"],
                "operation": r["operation"],
                "state": r["state"],
                "created": when(r.get("created_at")),
                "progress": _percent(r.get("progress")),
            }
            for r in records
        ],
        "no jobs",
    )


def _percent(progress: Mapping[str, Any] | None) -> str:
    if not progress or not progress.get("bytes_total"):
        return "-"
    return f"{100 * progress['bytes_done'] / progress['bytes_total']:.0f}%"


def job(record: dict[str, Any]) -> None:
    shown = dict(record)
    for key in ("created_at", "started_at", "finished_at"):
        shown[key] = when(record.get(key))
    key_values(shown)
