"""SPEC §11 download benchmark: rbee's download of one big file ÷ ``hf_hub_download``.

Same file, same local fake hub (served from its own process), same run, fresh cache dirs:

* ``hf``      — ``huggingface_hub.hf_hub_download(repo, file, endpoint=hub, cache_dir=...)``;
* ``stack``   — rbee end to end: ``POST /v1/jobs`` ``model_download`` to a running hive, then
  its SSE stream until ``[DONE]`` (plan, parallel ranges, sha256 check, cache layout);
* ``direct``  — ``actors.adapters.transfer.Downloader.fetch`` alone (the byte mover, sha256 included),
  with the hive's download settings.

Then the same under a per-connection throttle on the hub, where parallel ranges must win.
Targets (stack ÷ hf, as speeds): ≥ 1.0 unthrottled, ≥ 2.0 throttled.

    .venv/bin/python bench/download.py [--quick] [--size 1GiB] [--throttle 50MiB] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    MB,
    GiB,
    HubProcess,
    MiB,
    Run,
    client,
    hive_config,
    log,
    main,
    parse_size,
    random_file,
    read_sse,
    start_hive,
)
from rich.table import Table

REPO, FILE = "bench/model", "model.bin"
TARGETS = {"unthrottled": 1.0, "throttled": 2.0}
CLIENTS = ("hf", "direct", "stack")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=parse_size, default=None,
                        help="file size (default 1GiB; --quick: 64MiB)")
    parser.add_argument("--throttle", type=parse_size, default=50 * MiB,
                        help="per-connection hub throttle, bytes/s (default 50MiB)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each client this many times per condition; median wins")


def bench(run: Run) -> dict[str, Any]:
    """rbee's download vs hf_hub_download of the same file from a local fake hub."""
    args = run.args
    size = args.size or (64 * MiB if args.quick else GiB)
    log.print(f"writing a {size / MiB:.0f} MiB random file…")
    src = random_file(run.scratch("src") / FILE, size)
    started = time.perf_counter()
    sha256 = _sha256(src)
    sha_s = time.perf_counter() - started

    hub = run.stack.enter_context(HubProcess())
    hub.add_repo(REPO, {FILE: src})
    config = hive_config(run, hub.url)
    hive = start_hive(run, config)
    cfg = config.downloads
    http = run.stack.enter_context(client(hive.url, timeout=600))
    stack_cache = config.cache_dir / f"models--{REPO.replace('/', '--')}"
    requests: dict[str, int] = {}  #: hub GETs of each client's last download

    def measure(who: str) -> float:
        gets = hub.count("GET", "/resolve/")
        if who == "hf":
            seconds, path = _hf(hub.url, run.scratch("hf-cache"))
        elif who == "direct":
            seconds, path = _direct(hub.url, run.scratch("direct-cache"), size, sha256, cfg)
        else:
            shutil.rmtree(stack_cache, ignore_errors=True)
            seconds, path = _stack(http, stack_cache)
        got = path.stat().st_size
        if got != size:
            raise RuntimeError(f"{who}: got {got} bytes, expected {size}")
        shutil.rmtree(_repo_dir(path), ignore_errors=True)  # keep the disk (and page cache) tidy
        gets = hub.count("GET", "/resolve/") - gets
        log.print(f"  {who:<7} {seconds:7.2f} s  {size / MB / seconds:8.1f} MB/s  ({gets} GETs)")
        requests[who] = gets
        return seconds

    conditions: dict[str, Any] = {}
    table = Table(title=f"download of {size / MiB:.0f} MiB from the local fake hub "
                        f"(median of {args.rounds})")
    for column in ("condition", "client", "seconds", "MB/s", "÷ hf", "GETs", "target"):
        table.add_column(column, justify="left" if column in ("condition", "client") else "right")
    for condition, throttle in (("unthrottled", None), ("throttled", args.throttle)):
        hub.set_throttle(throttle)
        label = condition if throttle is None else f"{condition} {throttle / MiB:g} MiB/s/conn"
        log.print(f"[bold]{label}[/]")
        times: dict[str, list[float]] = {who: [] for who in CLIENTS}
        for _ in range(args.rounds):
            for who in CLIENTS:
                times[who].append(measure(who))
        figures: dict[str, Any] = {"throttle_bps": throttle}
        hf_s = statistics.median(times["hf"])
        for who in CLIENTS:
            seconds = statistics.median(times[who])
            entry = {"s": round(seconds, 3), "MBps": round(size / MB / seconds, 1),
                     "gets": requests[who]}
            if who != "hf":
                entry["ratio"] = round(hf_s / seconds, 2)
            if args.rounds > 1:
                entry["all_s"] = [round(t, 3) for t in times[who]]
            figures[who] = entry
        target = TARGETS[condition]
        figures["ratio"] = figures["stack"]["ratio"]
        figures["target"] = target
        figures["pass"] = figures["ratio"] >= target
        conditions[condition] = figures
        for who in CLIENTS:
            entry = figures[who]
            ratio = entry.get("ratio")
            mark = ""
            if who == "stack":
                mark = f"≥ {target:g} {'[green]ok[/]' if figures['pass'] else '[red]MISS[/]'}"
            table.add_row(label if who == "hf" else "", {"hf": "hf_hub_download",
                          "direct": "rbee Downloader.fetch", "stack": "rbee HTTP job"}[who],
                          f"{entry['s']:.2f}", f"{entry['MBps']:.1f}",
                          "—" if ratio is None else f"{ratio:.2f}", str(entry["gets"]), mark)
        table.add_section()
    hub.set_throttle(None)
    run.tables.append(table)
    note = Table(title="context", show_header=False)
    note.add_row("sha256 of the file, one pass (rbee verifies, hf_hub_download does not)",
                 f"{sha_s:.2f} s")
    note.add_row("rbee: segments / parallel_min_size",
                 f"{cfg.segments} / {cfg.parallel_min_size / MiB:g} MiB")
    run.tables.append(note)
    return {
        "size_bytes": size,
        "rounds": args.rounds,
        "segments": cfg.segments,
        "sha256_s": round(sha_s, 3),
        "direct_loop": "asyncio" if _loop_factory() is None else "uvloop",
        **conditions,
        "pass": all(c["pass"] for c in conditions.values()),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _repo_dir(path: Path) -> Path:
    """``.../models--org--name`` above a blob or snapshot file."""
    return next(p for p in path.parents if p.name.startswith("models--"))


def _hf(endpoint: str, cache: Path) -> tuple[float, Path]:
    from huggingface_hub import hf_hub_download

    started = time.perf_counter()
    path = hf_hub_download(REPO, FILE, endpoint=endpoint, cache_dir=cache, token=False)
    seconds = time.perf_counter() - started
    return seconds, Path(str(path))


def _direct(endpoint: str, cache: Path, size: int, sha256: str, cfg: Any) -> tuple[float, Path]:
    import httpx
    from huggingface_hub import hf_hub_url

    from actors.adapters.transfer import BandwidthLimiter, Downloader, FileSpec

    dest = cache / f"models--{REPO.replace('/', '--')}" / "blobs" / sha256
    spec = FileSpec(url=hf_hub_url(REPO, FILE, endpoint=endpoint), dest=dest, size=size,
                    sha256=sha256)

    async def fetch() -> float:
        # The same client and settings as the DownloadActor builds.
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, read=60.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=True,
            trust_env=False,
        ) as http:
            downloader = Downloader(
                http,
                limiter=BandwidthLimiter(cfg.bandwidth_limit_bps),
                parallel_min_size=cfg.parallel_min_size,
                segments=cfg.segments,
                retries=cfg.retries,
            )
            started = time.perf_counter()
            await downloader.fetch(spec)
            return time.perf_counter() - started

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(fetch()), dest


def _loop_factory() -> Any:
    """uvloop when installed, as Ray's async actors (the DownloadActor) use it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _stack(http: Any, repo_dir: Path) -> tuple[float, Path]:
    started = time.perf_counter()
    response = http.post("/v1/jobs", json={"operation": "model_download", "model": REPO})
    if response.status_code != 201:
        raise RuntimeError(f"submit: {response.status_code} {response.text}")
    job_id = response.json()["job_id"]
    stream = read_sse(http, f"/v1/jobs/{job_id}/stream")
    seconds = time.perf_counter() - started
    if stream.sentinel != "[DONE]":
        raise RuntimeError(f"{job_id} ended {stream.sentinel}: {stream.of('error')}")
    result = stream.of("result")[-1]
    return seconds, Path(result["path"]) / FILE


if __name__ == "__main__":
    sys.exit(main("download", bench, configure))
