"""SPEC §11 load: many watchers, many OpenAI clients leaving, a cancel storm, registry memory.

1. **SSE watchers**: ``--watchers`` (default 200; ``--quick`` 40) streams open for
   ``--duration`` s (default 60; ``--quick`` 15) over jobs running meanwhile: throttled
   ``model_download``\\ s from the fake hub and ``infer`` jobs on the tiny model (``ignore_eos``,
   ``--infer-tokens``), plus a quarter as many again on quick catalog jobs (``hive_status``,
   ``model_list``, ``hive_list``, ``worker_list``, one per group every 0.5 s). Watchers come
   in groups of ``--per-job`` (default 5): a group submits a job and its watchers all follow
   ``GET /v1/jobs/{id}/stream`` at once (one asyncio loop, an ``httpx.AsyncClient`` per
   group); when the job has ended the group starts the next one and, meanwhile, reads the
   finished job's full replay and compares: an id missing or out of order is an event
   **lost**, an id twice **repeated** (both must be 0); the sentinel must match the replay's.
   Delay, of the events made once every watcher of the job had its stream open (earlier
   ones arrive as a replay): ``narration`` events carry ``ts`` (when the actor made them),
   so arrival - ``ts``; for every event, the spread of its arrival between the watchers of
   one job (each watcher against the first one to see that id). The client's own event loop
   lag is reported beside them: it is part of every delay measured here.
2. **OpenAI clients leaving**: ``--clients`` (default 500; ``--quick`` 60) streaming
   requests, ``--client-concurrency`` (16) at a time, alternating ``/v1/completions`` and
   ``/v1/chat/completions`` on the tiny model with ``max_tokens`` ``--max-tokens`` (2000);
   each reads a random 1-8 chunks (the first is the role chunk) and closes its connection.
   Each endpoint's prompt is one whose greedy continuation has no EOS within 2,000 tokens
   (a probe of a client that stays checks it). After a settle (all terminal, at most 15 s),
   the jobs named by their ``X-Job-Id`` must be ``cancelled``; a ``completed``
   one whose client saw its end is "completed by itself within what the client read", one
   whose client did not see it "kept running after the client left" (a generation that was
   not aborted). The worker's ``unfinished_requests`` (``worker_list``) must be 0.
3. **Cancel storm**: throttled downloads hold every download slot, ``--cancels`` (1,000)
   ``model_download`` jobs wait ``queued``; one ``POST /v1/jobs/{id}/cancel`` each, all at
   once (bench/jobs.py's storm); the clock runs until none is left queued. Target ≤ 2 s, none
   ever started.
4. **Registry memory**: the ``JobRegistry`` actor's RSS before and after ``--memory-jobs``
   (default 100,000; ``--quick`` 10,000) finished ``hive_list`` jobs, per job.

    .venv/bin/python bench/load.py [--quick] [--only watchers|openai|cancel|memory ...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from _common import (
    HubProcess,
    KiB,
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
    wait_until,
)
from _infer import TINY, Model, add_worker
from jobs import (
    _bytes_done,
    _default_storm_client,
    _jobs,
    _registry_process,
    _storm,
    _submit_parallel,
)
from rich.table import Table

from serve_app import sse

SLOTS = 4  #: downloads.concurrency of the hive (the storm's fillers hold them all)
TERMINAL = {"completed", "failed", "cancelled"}
PROMPT = "Count the bees in the hive:"
#: Greedy decoding of the tiny model (seed 0) reaches no EOS within 2,000 tokens from these
#: (checked with transformers; the probe checks the server): a completed job is then one
#: that ran on after its client left, not one that ended by itself.
OPENAI_PROMPTS = {"/v1/completions": "the quick brown fox",
                  "/v1/chat/completions": "Count the bees in the hive:"}
PROBE_TOKENS = 256

# part 1
DL_SIZE = 4 * MiB
DL_THROTTLE = 512 * KiB  #: per connection: a watched download lasts about 8 s
CATALOG_OPS = ("hive_status", "model_list", "hive_list", "worker_list")
CATALOG_PAUSE_S = 0.5  #: between two catalog jobs of one group (they end in milliseconds)
GRACE_S = 30.0  #: a job still running this long after the deadline is cancelled

# part 2
CHUNKS = (1, 8)  #: a client reads this many chunks (inclusive), then leaves
SETTLE_S = 15.0  #: at most, for the abandoned jobs to become terminal

# part 3
STORM_TARGET_S = 2.0
FILLER_SIZE = 64 * MiB
FILLER_THROTTLE = 256 * KiB  #: per connection: a filler runs for minutes


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watchers", type=int, default=None,
                        help="SSE watchers open at once (default 200; --quick: 40)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds the watchers run (default 60; --quick: 15)")
    parser.add_argument("--per-job", type=int, default=5, help="watchers per job (default 5)")
    parser.add_argument("--infer-tokens", type=int, default=None,
                        help="max_tokens of a watched infer job (default 512)")
    parser.add_argument("--clients", type=int, default=None,
                        help="OpenAI streaming clients that leave (default 500; --quick: 60)")
    parser.add_argument("--client-concurrency", type=int, default=16,
                        help="OpenAI clients at once (default 16)")
    parser.add_argument("--max-tokens", type=int, default=2000,
                        help="max_tokens of an OpenAI client's request (default 2000)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="temperature of the OpenAI requests (default 0: greedy, so a "
                             "random-weight model's EOS comes, if ever, at the same place)")
    parser.add_argument("--cancels", type=int, default=1000,
                        help="queued jobs cancelled one request each (default 1000)")
    parser.add_argument("--memory-jobs", type=int, default=None,
                        help="finished jobs for the registry memory (default 100000; "
                             "--quick: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="of the clients' random choices")
    parser.add_argument("--only", choices=sorted(PARTS), action="append",
                        help="run only this part (repeatable)")


@dataclass
class Context:
    run: Run
    hive: Any
    api: httpx.Client
    hub: HubProcess
    model: Model
    worker_id: str | None = None


def bench(run: Run) -> dict[str, Any]:
    """Watchers over mixed jobs, OpenAI clients leaving mid-stream, a cancel storm, memory."""
    args = run.args
    parts = args.only or list(PARTS)
    hub = run.stack.enter_context(HubProcess())
    config = hive_config(run, hub.url, concurrency=SLOTS, parallel_min_size=1 << 30)
    memory_jobs = args.memory_jobs or (10_000 if args.quick else 100_000)
    # Room for every job of the run: the memory figure then never mixes in forgotten jobs.
    config = config.model_copy(update={"retain_jobs": max(config.retain_jobs,
                                                          memory_jobs + 50_000)})
    hive = start_hive(run, config)
    api = run.stack.enter_context(client(hive.url))
    folder = run.scratch("tiny")
    from tests.tinymodel import build_tiny_llama

    hub.add_repo(TINY, build_tiny_llama(folder))
    ctx = Context(run, hive, api, hub, Model(TINY, folder))
    if {"watchers", "openai"} & set(parts):
        ctx.worker_id = add_worker(hive.url, ctx.model)["worker_id"]
    figures: dict[str, Any] = {}
    for name in parts:
        figures[name] = PARTS[name](ctx)
    figures["pass"] = all(f.get("pass", False) for f in figures.values())
    return figures


# -- 1. SSE watchers -------------------------------------------------------------------------
@dataclass
class Seen:
    """What one stream delivered: ids in arrival order, their kinds and arrival times."""

    ids: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    at: list[float] = field(default_factory=list)  #: wall clock, to compare with ``ts``
    ts: dict[int, tuple[float, str]] = field(default_factory=dict)  #: narration: ts, action
    opened_at: float | None = None  #: wall clock, when the stream's headers came
    sentinel: str | None = None
    error: str | None = None


@dataclass
class Watched:
    """One job, its watchers and its replay."""

    job_id: str
    kind: str
    watchers: list[Seen]
    replay: Seen
    cancelled_by_us: bool = False


@dataclass
class Load:
    """Shared counters of the watcher part."""

    open_streams: Counter[str] = field(default_factory=Counter)  #: by job kind
    samples: list[tuple[float, int, int]] = field(default_factory=list)  #: t, long, catalog
    loop_lag_ms: list[float] = field(default_factory=list)
    watched: list[Watched] = field(default_factory=list)
    submit_errors: list[str] = field(default_factory=list)


async def _follow(http: httpx.AsyncClient, job_id: str, load: Load | None, kind: str,
                  timeout: float) -> Seen:
    """Follow a job's stream to its sentinel; never raises (the error is noted)."""
    seen = Seen()
    parser = sse.Parser()
    try:
        async with http.stream("GET", f"/v1/jobs/{job_id}/stream",
                               timeout=httpx.Timeout(30, read=timeout)) as response:
            if response.status_code != 200:
                seen.error = f"HTTP {response.status_code}"
                return seen
            seen.opened_at = time.time()
            if load is not None:
                load.open_streams[kind] += 1
            try:
                async for line in response.aiter_lines():
                    frame = parser.feed(line)
                    if frame is None:
                        continue
                    now = time.time()
                    if frame.kind is None:
                        seen.sentinel = frame.data
                        break
                    seen.ids.append(frame.id if frame.id is not None else -1)
                    seen.kinds.append(frame.kind)
                    seen.at.append(now)
                    if frame.kind == "narration":
                        data = frame.json()
                        ts = data.get("ts")
                        if isinstance(ts, int | float) and frame.id is not None:
                            seen.ts[frame.id] = (ts, str(data.get("action")))
            finally:
                if load is not None:
                    load.open_streams[kind] -= 1
    except (httpx.HTTPError, ValueError) as exc:
        seen.error = f"{type(exc).__name__}: {exc}"
    if seen.sentinel is None and seen.error is None:
        seen.error = "stream ended without a sentinel"
    return seen


async def _ticker(load: Load, stop: asyncio.Event, period: float = 0.1) -> None:
    """Event loop lag (oversleep of a 100 ms sleep) and open streams, ten times a second."""
    while not stop.is_set():
        t0 = time.monotonic()
        await asyncio.sleep(period)
        now = time.monotonic()
        load.loop_lag_ms.append(max(0.0, (now - t0 - period) * 1000))
        catalog = load.open_streams["catalog"]
        load.samples.append((now, sum(load.open_streams.values()) - catalog, catalog))


async def _group(url: str, kind: str, per_job: int, deadline: float, load: Load,
                 next_op: Callable[[], dict[str, Any] | None]) -> None:
    """Submit a job, follow it with ``per_job`` watchers; again until the deadline. Each
    finished job's replay is read and compared in the background, so the next job's
    watchers open at once."""
    limits = httpx.Limits(max_connections=2 * per_job + 2,
                          max_keepalive_connections=2 * per_job + 2)
    checks: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                 trust_env=False) as http:

        async def check(job_id: str, watchers: list[Seen], cancelled: bool) -> None:
            replay = await _follow(http, job_id, None, kind, 60)
            load.watched.append(Watched(job_id, kind, watchers, replay, cancelled))

        while time.monotonic() < deadline:
            op = next_op()
            if op is None:
                break
            try:
                response = await http.post("/v1/jobs", json=op)
                if response.status_code != 201:
                    load.submit_errors.append(f"{response.status_code} {response.text[:200]}")
                    await asyncio.sleep(1)
                    continue
                job_id = response.json()["job_id"]
            except httpx.HTTPError as exc:
                load.submit_errors.append(repr(exc))
                await asyncio.sleep(1)
                continue
            watchers = [asyncio.create_task(_follow(http, job_id, load, kind, 120))
                        for _ in range(per_job)]
            cancelled = False
            pending: set[asyncio.Task[Seen]] = set(watchers)
            while pending:
                wait = max(1.0, deadline + GRACE_S - time.monotonic())
                _, pending = await asyncio.wait(pending, timeout=wait)
                if pending and not cancelled and time.monotonic() > deadline + GRACE_S:
                    cancelled = True  # it outlived the run: end it (its stream still counts)
                    await http.post(f"/v1/jobs/{job_id}/cancel")
            checks.append(asyncio.create_task(check(job_id, [w.result() for w in watchers],
                                                    cancelled)))
            if kind == "catalog":
                await asyncio.sleep(CATALOG_PAUSE_S)
        await asyncio.gather(*checks)


def _kinds_of_groups(groups: int) -> list[str]:
    """The job kind each watcher group follows: downloads (at most SLOTS), the rest infer."""
    downloads = max(1, min(SLOTS, groups // 4))
    return (["download"] * downloads + ["infer"] * groups)[:groups]


def watchers_part(ctx: Context) -> dict[str, Any]:
    args = ctx.run.args
    n_watchers = args.watchers or (40 if args.quick else 200)
    duration = args.duration or (15.0 if args.quick else 60.0)
    per_job = max(1, min(args.per_job, n_watchers))
    groups = math.ceil(n_watchers / per_job)
    kinds = _kinds_of_groups(groups)
    catalog_groups = max(1, groups // 4)  #: besides: quick jobs, watched as they come
    infer_tokens = args.infer_tokens or 512
    per_download_s = DL_SIZE / DL_THROTTLE
    n_repos = kinds.count("download") * (math.ceil((duration + GRACE_S) / per_download_s) + 2)
    log.print(f"[bold]watchers[/]: {groups * per_job} streams ({groups} groups of {per_job}: "
              f"{dict(Counter(kinds))}) for {duration:g}s, plus {catalog_groups} groups on "
              f"catalog jobs; publishing {n_repos} download repos")
    src = random_file(ctx.run.scratch("src") / "model.bin", DL_SIZE)
    names = [f"bench/load-{i:03d}" for i in range(n_repos)]
    for repo in names:
        ctx.hub.add_repo(repo, {"model.bin": src})
    repos = iter(names)
    ctx.hub.set_throttle(DL_THROTTLE)
    catalog = itertools.cycle(CATALOG_OPS)

    def next_op(kind: str) -> Callable[[], dict[str, Any] | None]:
        def op() -> dict[str, Any] | None:
            if kind == "download":
                repo = next(repos, None)
                return None if repo is None else {"operation": "model_download", "model": repo}
            if kind == "catalog":
                return {"operation": next(catalog)}
            return {"operation": "infer", "model": TINY, "prompt": PROMPT,
                    "max_tokens": infer_tokens, "temperature": 0.8, "ignore_eos": True}

        return op

    async def drive() -> Load:
        load = Load()
        stop = asyncio.Event()
        ticker = asyncio.create_task(_ticker(load, stop))
        started = time.monotonic()
        deadline = started + duration
        tasks = [asyncio.create_task(_group(ctx.hive.url, kind, per_job, deadline, load,
                                            next_op(kind)))
                 for kind in [*kinds, *["catalog"] * catalog_groups]]
        await asyncio.gather(*tasks)
        stop.set()
        await ticker
        # Streams open at once: from 2 s in (connections opening) to the deadline.
        load.samples = [s for s in load.samples if started + 2 <= s[0] <= deadline]
        return load

    started = time.monotonic()
    load = asyncio.run(drive())
    wall = time.monotonic() - started
    ctx.hub.set_throttle(None)
    figures = _watch_figures(load, n_watchers=groups * per_job, per_job=per_job,
                             duration=duration, wall=wall, infer_tokens=infer_tokens,
                             catalog_watchers=catalog_groups * per_job)
    ctx.run.tables.append(_watch_table(figures))
    return figures


def _compare(job: Watched) -> dict[str, int]:
    """Each watcher against the replay: lost (missing or out of order), repeated, extra."""
    counts = Counter()
    replay_ids = job.replay.ids
    if replay_ids and replay_ids != list(range(replay_ids[0], replay_ids[0] + len(replay_ids))):
        counts["replay_not_contiguous"] += 1
    if job.replay.error:
        counts["replay_errors"] += 1
    expected = dict(zip(replay_ids, job.replay.kinds, strict=True))
    for seen in job.watchers:
        if seen.error:
            counts["watcher_errors"] += 1
            continue
        ids = seen.ids
        got = set(ids)
        counts["missing"] += sum(1 for i in replay_ids if i not in got)
        counts["repeated"] += len(ids) - len(got)
        counts["out_of_order"] += sum(1 for a, b in itertools.pairwise(ids) if b <= a)
        counts["extra"] += sum(1 for i in got if i not in expected)
        counts["wrong_kind"] += sum(1 for i, k in zip(ids, seen.kinds, strict=True)
                                    if i in expected and expected[i] != k)
        counts["sentinel_mismatch"] += int(seen.sentinel != job.replay.sentinel)
        counts["events"] += len(ids)
        counts["streams"] += 1
    return counts


def _delays(job: Watched) -> tuple[list[tuple[str, float]], list[float]]:
    """Delays of live events: those made after every watcher of the job had its stream
    open (earlier ones come as a replay, whose wait says nothing of delivery).

    * narration: arrival - ``ts``, each watcher;
    * any event: each watcher's arrival against the first watcher's (the first left out).
    """
    watchers = [w for w in job.watchers if not w.error and w.opened_at is not None]
    if not watchers:
        return [], []
    all_open = max(w.opened_at for w in watchers if w.opened_at is not None)
    arrivals: dict[int, list[float]] = {}
    ts_delays = []
    for seen in watchers:
        for event_id, at in zip(seen.ids, seen.at, strict=True):
            arrivals.setdefault(event_id, []).append(at)
            made = seen.ts.get(event_id)
            if made is not None and made[0] >= all_open:
                ts_delays.append((made[1], (at - made[0]) * 1000))
    spread = []
    for times in arrivals.values():
        first = min(times)
        if first < all_open:
            continue  # it may have been made before some watcher was there
        spread.extend((t - first) * 1000 for t in sorted(times)[1:])
    return ts_delays, spread


def _watch_figures(load: Load, *, n_watchers: int, per_job: int, duration: float, wall: float,
                   infer_tokens: int, catalog_watchers: int) -> dict[str, Any]:
    totals: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    spread: list[float] = []
    ts_delay: list[tuple[str, float]] = []
    sentinels: Counter[str] = Counter()
    errors: list[str] = []
    for job in load.watched:
        totals.update(_compare(job))
        by_kind[job.kind] += 1
        ts_delays, spreads = _delays(job)
        ts_delay.extend(ts_delays)
        spread.extend(spreads)
        sentinels[str(job.replay.sentinel)] += 1
        for seen in job.watchers:
            if seen.error and len(errors) < 5:
                errors.append(f"{job.job_id}: {seen.error}")
    lost = totals["missing"] + totals["out_of_order"]
    figures: dict[str, Any] = {
        "watchers": n_watchers,
        "per_job": per_job,
        "duration_s": duration,
        "wall_s": round(wall, 1),
        "infer_max_tokens": infer_tokens,
        "jobs": dict(by_kind),
        "jobs_cancelled_at_end": sum(1 for j in load.watched if j.cancelled_by_us),
        "streams_followed": totals["streams"],
        "events_delivered": totals["events"],
        "catalog_watchers": catalog_watchers,
        "open_streams": _open(load.samples),
        "lost": lost,
        "missing": totals["missing"],
        "out_of_order": totals["out_of_order"],
        "repeated": totals["repeated"],
        "extra": totals["extra"],
        "wrong_kind": totals["wrong_kind"],
        "sentinel_mismatch": totals["sentinel_mismatch"],
        "watcher_errors": totals["watcher_errors"],
        "replay_errors": totals["replay_errors"],
        "replay_not_contiguous": totals["replay_not_contiguous"],
        "submit_errors": len(load.submit_errors),
        "sentinels": dict(sentinels),
        "narration_delay_ms": summary([d for _, d in ts_delay]),
        "narration_delay_by_action_ms": {
            action: summary([d for a, d in ts_delay if a == action])
            for action in sorted({a for a, _ in ts_delay})
        },
        "spread_ms": summary(spread),
        "client_loop_lag_ms": summary(load.loop_lag_ms),
        "first_errors": errors + load.submit_errors[:3],
    }
    figures["pass"] = bool(
        load.watched and not lost and not totals["repeated"] and not totals["extra"]
        and not totals["wrong_kind"] and not totals["sentinel_mismatch"]
        and not totals["watcher_errors"] and not totals["replay_errors"]
        and not load.submit_errors
    )
    return figures


def _open(samples: list[tuple[float, int, int]]) -> dict[str, Any]:
    """Streams open at once, sampled ten times a second: on the long jobs, on catalog jobs."""
    if not samples:
        return {"samples": 0}
    long, catalog = [s[1] for s in samples], [s[2] for s in samples]
    return {"samples": len(samples),
            "long_mean": round(sum(long) / len(long), 1), "long_min": min(long),
            "long_max": max(long), "catalog_mean": round(sum(catalog) / len(catalog), 1),
            "catalog_max": max(catalog)}


def _watch_table(f: dict[str, Any]) -> Table:
    table = Table(title=f"{f['watchers']} SSE watchers ({f['per_job']} per job) for "
                        f"{f['duration_s']:g}s over mixed jobs, + {f['catalog_watchers']} "
                        "on catalog jobs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    jobs = ", ".join(f"{n} {kind}" for kind, n in sorted(f["jobs"].items()))
    table.add_row("jobs watched", jobs or "0")
    table.add_row("streams followed to their end / events delivered",
                  f"{f['streams_followed']} / {f['events_delivered']}")
    o = f["open_streams"]
    if o["samples"]:
        table.add_row("open at once on download/infer jobs (mean / min / max)",
                      f"{o['long_mean']} / {o['long_min']} / {o['long_max']}")
        table.add_row("open at once on catalog jobs (mean / max)",
                      f"{o['catalog_mean']} / {o['catalog_max']}")
    verdict = "[green]ok[/]" if f["pass"] else "[red]MISS[/]"
    table.add_row(f"events lost (missing / out of order) {verdict}",
                  f"{f['lost']} ({f['missing']} / {f['out_of_order']})")
    table.add_row("events repeated / extra / wrong kind",
                  f"{f['repeated']} / {f['extra']} / {f['wrong_kind']}")
    table.add_row("sentinel ≠ replay's / watcher errors / submit errors",
                  f"{f['sentinel_mismatch']} / {f['watcher_errors']} / {f['submit_errors']}")
    table.add_section()
    for label, key in (("live narration: arrival - ts (ms)", "narration_delay_ms"),
                       ("live events: spread vs first watcher (ms)", "spread_ms"),
                       ("client event loop lag (ms)", "client_loop_lag_ms")):
        s = f[key]
        table.add_row(f"{label}: p50 / p99 / max (n={s['n']})",
                      f"{fmt_ms(s['p50'])} / {fmt_ms(s['p99'])} / {fmt_ms(s['max'])}")
    return table


# -- 2. OpenAI clients leaving mid-stream ----------------------------------------------------
@dataclass
class Leaver:
    endpoint: str
    want: int  #: chunks to read before leaving
    status: int | None = None
    job_id: str | None = None
    chunks: int = 0  #: data chunks read (the role chunk included)
    content_chunks: int = 0  #: chunks with text
    saw_end: bool = False  #: a finish_reason or [DONE] came before it left
    left_at: float | None = None  #: wall clock, when it closed the connection
    error: str | None = None


async def _leave_midway(http: httpx.AsyncClient, leaver: Leaver, body: dict[str, Any]) -> None:
    try:
        async with http.stream("POST", leaver.endpoint, json=body) as response:
            leaver.status = response.status_code
            leaver.job_id = response.headers.get("x-job-id")
            if response.status_code != 200:
                leaver.error = (await response.aread()).decode(errors="replace")[:200]
                return
            parser = sse.Parser()
            async for line in response.aiter_lines():
                frame = parser.feed(line)
                if frame is None:
                    continue
                payload = frame.data
                if payload == "[DONE]":
                    leaver.saw_end = True
                    break
                chunk = json.loads(payload)
                leaver.chunks += 1
                if "error" in chunk:
                    leaver.error = str(chunk["error"])[:200]
                choice = (chunk.get("choices") or [{}])[0]
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                leaver.content_chunks += bool(text)
                if choice.get("finish_reason"):
                    leaver.saw_end = True
                    break
                if leaver.chunks >= leaver.want:
                    break
        # Leaving the block closed the connection: the response was not read to its end.
        leaver.left_at = time.time()
    except (httpx.HTTPError, ValueError) as exc:
        leaver.error = f"{type(exc).__name__}: {exc}"


def _body(endpoint: str, max_tokens: int, temperature: float, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": TINY, "max_tokens": max_tokens, "temperature": temperature,
                            "stream": stream}
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": OPENAI_PROMPTS[endpoint]}]
    else:
        body["prompt"] = OPENAI_PROMPTS[endpoint]
    return body


def openai_part(ctx: Context) -> dict[str, Any]:
    args = ctx.run.args
    n = args.clients or (60 if args.quick else 500)
    rng = random.Random(args.seed)
    endpoints = list(OPENAI_PROMPTS)
    leavers = [Leaver(endpoints[i % 2], rng.randint(*CHUNKS)) for i in range(n)]
    probe = _probe(ctx, args.temperature)
    log.print(f"[bold]openai[/]: {n} streaming clients ({args.client_concurrency} at once, "
              f"max_tokens {args.max_tokens}) each leaving after {CHUNKS[0]}-{CHUNKS[1]} chunks")

    async def drive() -> float:
        gate = asyncio.Semaphore(args.client_concurrency)
        limits = httpx.Limits(max_connections=args.client_concurrency,
                              max_keepalive_connections=args.client_concurrency)
        async with httpx.AsyncClient(base_url=ctx.hive.url, limits=limits, trust_env=False,
                                     timeout=httpx.Timeout(60, read=120)) as http:
            async def one(leaver: Leaver) -> None:
                async with gate:
                    await _leave_midway(http, leaver, _body(leaver.endpoint, args.max_tokens,
                                                            args.temperature, True))

            started = time.monotonic()
            await asyncio.gather(*(one(leaver) for leaver in leavers))
            return time.monotonic() - started

    clients_s = asyncio.run(drive())
    ours = {lv.job_id for lv in leavers if lv.job_id}
    settle_started = time.monotonic()
    records: dict[str, dict[str, Any]] = {}
    while True:
        listed = ctx.api.get("/v1/jobs", params={"operation": "infer", "limit": 10_000}).json()
        records = {j["job_id"]: j for j in listed["jobs"] if j["job_id"] in ours}
        if all(r["state"] in TERMINAL for r in records.values()) or \
                time.monotonic() - settle_started > SETTLE_S:
            break
        time.sleep(0.2)
    settle_s = time.monotonic() - settle_started
    worker = _worker_stats(ctx)
    figures = _openai_figures(leavers, records, worker, probe, clients_s=clients_s,
                              settle_s=settle_s, args=args)
    ctx.run.tables.append(_openai_table(figures))
    return figures


def _probe(ctx: Context, temperature: float) -> dict[str, Any]:
    """A client that stays, PROBE_TOKENS on each endpoint: does its prompt reach EOS early?"""
    out = {}
    for endpoint in OPENAI_PROMPTS:
        response = ctx.api.post(endpoint, json=_body(endpoint, PROBE_TOKENS, temperature, False))
        if response.status_code != 200:
            out[endpoint] = {"status": response.status_code, "body": response.text[:200]}
            continue
        body = response.json()
        out[endpoint] = {"finish_reason": body["choices"][0]["finish_reason"],
                         "completion_tokens": (body.get("usage") or {}).get("completion_tokens")}
    log.print(f"  probe ({PROBE_TOKENS} tokens, a client that stays): {out}")
    return out


def _worker_stats(ctx: Context) -> dict[str, Any]:
    job = ctx.api.post("/v1/jobs", json={"operation": "worker_list"}).json()["job_id"]
    stream = read_sse(ctx.api, f"/v1/jobs/{job}/stream", timeout=60)
    workers = stream.of("result")[0]["workers"] if stream.of("result") else []
    mine = [w for w in workers if w.get("worker_id") == ctx.worker_id]
    return mine[0] if mine else {"worker_id": ctx.worker_id, "missing": True}


def _openai_figures(leavers: list[Leaver], records: dict[str, dict[str, Any]],
                    worker: dict[str, Any], probe: dict[str, Any], *, clients_s: float,
                    settle_s: float, args: argparse.Namespace) -> dict[str, Any]:
    states: Counter[str] = Counter()
    within_read: list[dict[str, Any]] = []
    after_left: list[dict[str, Any]] = []
    failed: Counter[str] = Counter()
    left_running = 0
    no_job = 0
    cancel_ms: list[float] = []
    for leaver in leavers:
        record = records.get(leaver.job_id or "")
        if record is None:
            no_job += 1
            states["no job"] += 1
            continue
        state = record["state"]
        states[state] += 1
        if state in ("queued", "running"):
            left_running += 1
        elif state == "cancelled":
            took = _after(record.get("finished_at"), leaver.left_at)
            if took is not None:
                cancel_ms.append(took * 1000)
        elif state == "failed":
            failed[(record.get("error") or {}).get("code", "?")] += 1
        elif state == "completed":
            result = record.get("result") or {}
            row = {"job_id": leaver.job_id, "endpoint": leaver.endpoint,
                   "finish_reason": result.get("finish_reason"),
                   "completion_tokens": (result.get("usage") or {}).get("completion_tokens"),
                   "chunks_read": leaver.chunks, "content_chunks_read": leaver.content_chunks,
                   "finished_s_after_client_left": _after(record.get("finished_at"),
                                                          leaver.left_at)}
            (within_read if leaver.saw_end else after_left).append(row)
    unfinished = worker.get("unfinished_requests")
    running_jobs = worker.get("running_jobs")
    not_aborted = len(after_left)
    figures: dict[str, Any] = {
        "clients": len(leavers),
        "concurrency": args.client_concurrency,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "chunks_read": summary([lv.chunks for lv in leavers], 1),
        "clients_s": round(clients_s, 1),
        "http_errors": sum(1 for lv in leavers if lv.status != 200),
        "client_errors": [lv.error for lv in leavers if lv.error][:5],
        "states": dict(states),
        "completed_within_read": len(within_read),
        "kept_running_after_client_left": not_aborted,
        "kept_running_by_finish_reason": dict(Counter(str(r["finish_reason"])
                                                      for r in after_left)),
        "kept_running_completion_tokens": summary([r["completion_tokens"] or 0
                                                   for r in after_left], 0),
        "kept_running_examples": after_left[:5],
        "completed_within_read_examples": within_read[:3],
        "failed_by_code": dict(failed),
        "client_left_to_cancelled_ms": summary(cancel_ms),
        "still_queued_or_running": left_running,
        "settle_s": round(settle_s, 2),
        "worker_unfinished_requests": unfinished,
        "worker_running_jobs": running_jobs,
        "probe": {"max_tokens": PROBE_TOKENS, **probe},
    }
    figures["generations_left_running"] = not_aborted + left_running + (unfinished or 0)
    figures["pass"] = bool(figures["generations_left_running"] == 0 and unfinished == 0
                           and not no_job and not figures["http_errors"])
    return figures


def _after(finished_at: float | None, left_at: float | None) -> float | None:
    if finished_at is None or left_at is None:
        return None
    return round(finished_at - left_at, 3)


def _openai_table(f: dict[str, Any]) -> Table:
    table = Table(title=f"{f['clients']} OpenAI streaming clients leaving after 1-8 chunks "
                        f"({f['concurrency']} at once, max_tokens {f['max_tokens']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("jobs by state after the settle", ", ".join(
        f"{n} {state}" for state, n in sorted(f["states"].items())))
    table.add_row("completed by itself within the chunks the client read",
                  str(f["completed_within_read"]))
    by = ", ".join(f"{n} {r}" for r, n in f["kept_running_by_finish_reason"].items())
    table.add_row("completed after the client left (not aborted)",
                  f"{f['kept_running_after_client_left']}" + (f" ({by})" if by else ""))
    if f["kept_running_after_client_left"]:
        s = f["kept_running_completion_tokens"]
        table.add_row("    their completion_tokens p50 / max", f"{s['p50']} / {s['max']}")
    table.add_row("still queued or running after the settle", str(f["still_queued_or_running"]))
    s = f["client_left_to_cancelled_ms"]
    table.add_row("client gone → job cancelled (ms): p50 / p99 / max",
                  f"{fmt_ms(s['p50'])} / {fmt_ms(s['p99'])} / {fmt_ms(s['max'])}")
    table.add_row("worker: unfinished vLLM requests / running jobs",
                  f"{f['worker_unfinished_requests']} / {f['worker_running_jobs']}")
    verdict = "[green]ok[/]" if f["pass"] else "[red]MISS[/]"
    table.add_row(f"generations left running (target 0) {verdict}",
                  str(f["generations_left_running"]))
    table.add_row("HTTP errors / failed jobs",
                  f"{f['http_errors']} / {sum(f['failed_by_code'].values())}")
    table.add_row("all clients done in / settle", f"{f['clients_s']:.1f} s / {f['settle_s']:.2f} s")
    for endpoint, answer in f["probe"].items():
        if endpoint.startswith("/"):
            table.add_row(f"probe, a client that stays: {endpoint} ({f['probe']['max_tokens']})",
                          f"{answer.get('completion_tokens')} tokens, "
                          f"{answer.get('finish_reason', answer.get('status'))}")
    return table


# -- 3. the cancel storm ---------------------------------------------------------------------
def cancel_part(ctx: Context) -> dict[str, Any]:
    n = ctx.run.args.cancels
    api, hub = ctx.api, ctx.hub
    log.print(f"[bold]cancel storm[/]: {SLOTS} throttled downloads hold the slots, "
              f"{n} queued jobs, one POST /v1/jobs/{{id}}/cancel each")
    filler = random_file(ctx.run.scratch("src") / "filler.bin", FILLER_SIZE)
    queued_file = random_file(ctx.run.scratch("src") / "queued.bin", 1 * MiB)
    hub.set_throttle(FILLER_THROTTLE)
    fillers = []
    for i in range(SLOTS):
        hub.add_repo(f"bench/filler-{i}", {"model.bin": filler})
        response = api.post("/v1/jobs", json={"operation": "model_download",
                                              "model": f"bench/filler-{i}"})
        fillers.append(response.json()["job_id"])
    hub.add_repo("bench/queued", {"model.bin": queued_file})
    try:
        wait_until(lambda: all(_bytes_done(api, j) > 0 for j in fillers), 120,
                    "the fillers to start")
        op = {"operation": "model_download", "model": "bench/queued"}
        _, submit_s, ids = _submit_parallel(ctx.hive.url, n, op)
        waiting = {j["job_id"] for j in _jobs(api, "queued")}
        if not set(ids) <= waiting:
            raise RuntimeError(f"{len(set(ids) - waiting)} storm jobs are not queued")
        log.print(f"  {n} queued in {submit_s:.1f}s; cancelling them all at once…")
        kind = _default_storm_client()
        storm = asyncio.run(_storm(ctx.hive.url, ids, 128, kind))
        cancelled = {j["job_id"]: j for j in _jobs(api, "cancelled")}
    finally:
        for job_id in fillers:
            api.delete(f"/v1/jobs/{job_id}")
        hub.set_throttle(None)
    started = sum(1 for j in ids if j in cancelled and cancelled[j]["started_at"] is not None)
    figures = {
        "jobs": n,
        "submit_per_s": round(n / submit_s, 1),
        **storm,
        "not_cancelled": sum(1 for j in ids if j not in cancelled),
        "started": started,
        "target_s": STORM_TARGET_S,
    }
    done = figures["all_cancelled_s"]
    figures["pass"] = bool(done is not None and done <= STORM_TARGET_S and not started
                           and not figures["not_cancelled"] and not figures["not_202"])
    table = Table(title=f"cancel storm: {n} queued jobs, a POST .../cancel each")
    table.add_column("measure")
    table.add_column("value", justify="right")
    verdict = "[green]ok[/]" if figures["pass"] else "[red]MISS[/]"
    table.add_row(f"all {n} answered 202 ({storm['concurrency']} in flight, {kind})",
                  f"{storm['all_accepted_s']:.2f} s")
    table.add_row(f"all terminal (none queued) — target ≤ {STORM_TARGET_S:g} s {verdict}",
                  "timeout" if done is None else f"{done:.2f} s")
    table.add_row("not 202 / not cancelled / ever started",
                  f"{figures['not_202']} / {figures['not_cancelled']} / {started}")
    ctx.run.tables.append(table)
    return figures


# -- 4. registry memory ----------------------------------------------------------------------
def memory_part(ctx: Context) -> dict[str, Any]:
    import ray

    from actors.naming import NAMESPACE, REGISTRY

    args = ctx.run.args
    n = args.memory_jobs or (10_000 if args.quick else 100_000)
    registry = _registry_process()
    handle = ray.get_actor(REGISTRY, namespace=NAMESPACE)
    op = {"operation": "hive_list"}
    _submit_parallel(ctx.hive.url, 50, op)  # warm the path before the baseline
    _settle(ctx.api)
    rss0, count0 = registry.memory_info().rss, ray.get(handle.count.remote())
    log.print(f"[bold]registry memory[/]: {n} hive_list jobs (pid {registry.pid}, "
              f"RSS {rss0 / MiB:.1f} MiB, {count0} jobs held)")
    batch, done, started = 10_000, 0, time.monotonic()
    while done < n:
        size = min(batch, n - done)
        _submit_parallel(ctx.hive.url, size, op)
        done += size
        log.print(f"  {done}/{n} submitted, {done / (time.monotonic() - started):.0f}/s, "
                  f"RSS {registry.memory_info().rss / MiB:.1f} MiB")
    submit_s = time.monotonic() - started
    _settle(ctx.api)
    time.sleep(1)
    rss1, count1 = registry.memory_info().rss, ray.get(handle.count.remote())
    failed = len(_jobs(ctx.api, "failed"))
    added = count1 - count0
    per_job = round((rss1 - rss0) / added) if added > 0 else None
    figures = {
        "operation": "hive_list",
        "jobs": n,
        "jobs_held_before": count0,
        "jobs_held_after": count1,
        "submit_per_s": round(n / submit_s, 1),
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "per_job_bytes": per_job,
        "failed_jobs_in_registry": failed,
        "pid": registry.pid,
    }
    figures["pass"] = bool(added == n and per_job is not None)
    table = Table(title=f"JobRegistry memory at {count1} jobs held (RSS, pid {registry.pid})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"before ({count0} jobs)", f"{rss0 / MiB:.1f} MiB")
    table.add_row(f"after {n} more finished hive_list jobs", f"{rss1 / MiB:.1f} MiB")
    table.add_row("per finished job", "—" if per_job is None else f"{per_job / KiB:.2f} KiB")
    table.add_row("submitted (8 threads)", f"{figures['submit_per_s']:.0f}/s")
    ctx.run.tables.append(table)
    return figures


def _settle(api: httpx.Client, timeout: float = 600) -> None:
    """Until no job is queued or running."""
    def idle() -> bool:
        for state in ("queued", "running"):
            if api.get("/v1/jobs", params={"state": state, "limit": 1}).json()["jobs"]:
                return False
        return True

    wait_until(idle, timeout, "every job to finish")


PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "watchers": watchers_part,
    "openai": openai_part,
    "cancel": cancel_part,
    "memory": memory_part,
}


if __name__ == "__main__":
    sys.exit(main("load", bench, configure))
