"""SPEC §11 job plumbing: submit latency, submissions/s, a cancel storm, registry memory/job.

* submit → job_id: ``--submits`` (default 500; ``--quick`` 100) ``POST /v1/jobs``
  ``{"operation":"hive_list"}`` one after another on one keep-alive client (p50/p99 and
  submissions/s), then as many again from 8 threads with a client each (submissions/s);
* cancel storm: throttled downloads fill every download slot, ``--storm`` (default 1,000;
  ``--quick`` 200) ``model_download`` jobs then wait ``queued``; all of them are cancelled at
  once (``POST /v1/jobs/{id}/cancel`` from one asyncio client, many requests in flight) and
  the clock runs until none of them is left ``queued`` (all ``cancelled``). Target ≤ 2 s;
  none of them may ever have started;
* registry memory per job: the ``JobRegistry`` actor's RSS before and after the jobs above,
  divided by their number (finished ``hive_list`` jobs; queued-then-cancelled downloads);
* 1-token requests: a worker for the tiny Llama, then 500 (``--quick`` 100) streamed
  ``/v1/completions`` with ``max_tokens: 1``, 32 in flight (the peers' client's figure): the
  rate, the latency to each stream's end, and that every answer's job (``X-Job-Id``) is
  recorded ``completed``.

    .venv/bin/python bench/jobs.py [--quick] [--submits 500] [--storm 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    job_state,
    log,
    main,
    random_file,
    start_hive,
    submit_job,
    summary,
    wait_until,
)
from _infer import TINY, Model, add_worker
from rich.table import Table

from serve_app import sse

STORM_TARGET_S = 2.0
THREADS = 8
SLOTS = 2  #: downloads.concurrency of the hive; that many fillers keep the queue closed
FILLER_SIZE = 64 * MiB
FILLER_THROTTLE = 256 * KiB  #: per connection: a filler runs about a minute
CHEAP_OPS = ("hive_list", "hive_status", "model_list")
TERMINAL = {"completed", "failed", "cancelled"}
SHORT_IN_FLIGHT = 32  #: the peers' client's figure: 1-token requests at 32 in flight


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--submits", type=int, default=None,
                        help="submissions per latency phase (default 500; --quick: 100)")
    parser.add_argument("--op", choices=CHEAP_OPS, default="hive_list",
                        help="the cheap operation of the submit phases (default hive_list)")
    parser.add_argument("--storm", type=int, default=None,
                        help="queued jobs cancelled at once (default 1000; --quick: 200)")
    parser.add_argument("--storm-concurrency", type=int, default=128,
                        help="cancel requests in flight at once during the storm (default 128)")
    parser.add_argument("--storm-client", choices=("aiohttp", "httpx"),
                        default=_default_storm_client(),
                        help="async HTTP client of the storm (default aiohttp: httpx's pool "
                             "slows down badly with ~100 connections in flight)")


def bench(run: Run) -> dict[str, Any]:
    """Submit latency and rate, a cancel storm of queued jobs, registry memory per job."""
    args = run.args
    n_submit = args.submits or (100 if args.quick else 500)
    n_storm = args.storm or (200 if args.quick else 1000)
    hub = run.stack.enter_context(HubProcess())
    config = hive_config(run, hub.url, concurrency=SLOTS, parallel_min_size=16 * MiB,
                         segments=4)
    hive = start_hive(run, config)
    api = run.stack.enter_context(client(hive.url))
    registry = _registry_process()
    log.print(f"JobRegistry pid {registry.pid}")

    # -- submit latency and rate -------------------------------------------------------------
    cheap = {"operation": args.op}
    _submit_sequential(api, 20, cheap)  # warm every code path before the baseline
    _wait_terminal(api, 20)
    rss0, jobs0 = registry.memory_info().rss, _job_count(api)
    log.print(f"[bold]submit[/]: {n_submit} sequential, then {n_submit} from {THREADS} threads")
    health_lat = _round_trips(api, n_submit)
    seq_lat, seq_s = _submit_sequential(api, n_submit, cheap)
    par_lat, par_s, _ = _submit_parallel(hive.url, n_submit, cheap)
    _wait_terminal(api, 2 * n_submit + 20)
    failed = len(_jobs(api, "failed"))
    rss1, jobs1 = registry.memory_info().rss, _job_count(api)
    submit: dict[str, Any] = {
        "operation": args.op,
        "n": n_submit,
        "latency_ms": summary(seq_lat, 2),
        "per_s_sequential": round(n_submit / seq_s, 1),
        "threads": THREADS,
        "latency_parallel_ms": summary(par_lat, 2),
        "per_s_parallel": round(n_submit / par_s, 1),
        "health_ms": summary(health_lat, 2),
        "failed": failed,
    }
    log.print(f"  sequential {submit['per_s_sequential']}/s, p50 "
              f"{submit['latency_ms']['p50']} ms; parallel {submit['per_s_parallel']}/s")

    # -- cancel storm --------------------------------------------------------------------------
    log.print(f"[bold]cancel storm[/]: {SLOTS} throttled downloads hold the slots, "
              f"{n_storm} queued jobs")
    filler = random_file(run.scratch("src") / "filler.bin", FILLER_SIZE)
    queued_file = random_file(run.scratch("src") / "queued.bin", 1 * MiB)
    hub.set_throttle(FILLER_THROTTLE)
    fillers = []
    for i in range(SLOTS):
        hub.add_repo(f"bench/filler-{i}", {"model.bin": filler})
        fillers.append(submit_job(api, {"operation": "model_download", "model": f"bench/filler-{i}"}))
    hub.add_repo("bench/queued", {"model.bin": queued_file})
    wait_until(lambda: all(_bytes_done(api, j) > 0 for j in fillers), 60, "fillers to start")
    rss2, jobs2 = registry.memory_info().rss, _job_count(api)
    queued_op = {"operation": "model_download", "model": "bench/queued"}
    _, storm_submit_s, ids = _submit_parallel(hive.url, n_storm, queued_op)
    waiting = {j["job_id"] for j in _jobs(api, "queued")}
    if not set(ids) <= waiting:
        raise RuntimeError(f"{len(set(ids) - waiting)} storm jobs are not queued; "
                           "a filler finished early?")
    rss3, jobs3 = registry.memory_info().rss, _job_count(api)
    log.print(f"  {n_storm} queued in {storm_submit_s:.1f}s; cancelling them all at once…")
    cpu = _cpu_times()
    storm = asyncio.run(_storm(hive.url, ids, args.storm_concurrency, args.storm_client))
    storm["cpu_s"] = _cpu_spent(cpu)
    cancelled = {j["job_id"]: j for j in _jobs(api, "cancelled")}
    started = sum(1 for j in ids if j in cancelled and cancelled[j]["started_at"] is not None)
    storm |= {
        "jobs": n_storm,
        "submit_per_s": round(n_storm / storm_submit_s, 1),
        "not_cancelled": sum(1 for j in ids if j not in cancelled),
        "started": started,
        "fillers_still_running": sum(1 for j in fillers if job_state(api, j) == "running"),
        "target_s": STORM_TARGET_S,
    }
    storm["per_request_pass"] = bool(storm["all_cancelled_s"] is not None
                                     and storm["all_cancelled_s"] <= STORM_TARGET_S
                                     and not storm["not_cancelled"] and not started)
    log.print(f"  all 202 after {storm['all_accepted_s']:.2f}s, all cancelled after "
              f"{storm['all_cancelled_s']}s")
    storm["bulk"] = _bulk_storm(api, hive.url, n_storm, queued_op)
    log.print(f"  bulk: one POST /v1/jobs/cancel, all cancelled after "
              f"{storm['bulk']['all_cancelled_s']}s")
    storm["pass"] = storm["per_request_pass"] or storm["bulk"]["pass"]
    rss4 = registry.memory_info().rss
    for job_id in fillers:
        api.delete(f"/v1/jobs/{job_id}")
    hub.set_throttle(None)

    memory = {
        "pid": registry.pid,
        "rss_start_bytes": rss0,
        "rss_end_bytes": rss4,
        "cheap_operation": args.op,
        "per_cheap_job_bytes": _per(rss1 - rss0, jobs1 - jobs0),
        "cheap_jobs": jobs1 - jobs0,
        "per_queued_download_job_bytes": _per(rss3 - rss2, jobs3 - jobs2),
        "queued_download_jobs": jobs3 - jobs2,
        "after_storm_delta_bytes": rss4 - rss3,
        "jobs_held": _job_count(api),
    }
    run.tables.extend(_tables(submit, storm, memory))

    # -- 1-token requests ----------------------------------------------------------------------
    from tests.tinymodel import build_tiny_llama

    folder = run.scratch("tiny")
    hub.add_repo(TINY, build_tiny_llama(folder))
    add_worker(hive.url, Model(TINY, folder))
    n_short = 100 if args.quick else 500
    log.print(f"[bold]1-token requests[/]: {n_short} streamed completions, {SHORT_IN_FLIGHT} "
              "in flight")
    asyncio.run(_one_token(hive.url, SHORT_IN_FLIGHT, SHORT_IN_FLIGHT))  # warm
    short = asyncio.run(_one_token(hive.url, n_short, SHORT_IN_FLIGHT))
    short["not_completed"] = sum(1 for j in short.pop("job_ids")
                                 if job_state(api, j) != "completed")
    short["pass"] = short["failed"] == 0 and short["not_completed"] == 0
    log.print(f"  {short['per_s']}/s, p50 {short['latency_ms']['p50']} ms, p99 "
              f"{short['latency_ms']['p99']} ms; jobs not completed: {short['not_completed']}")
    table = Table(title="1-token requests (POST /v1/completions, stream, max_tokens 1)")
    for column in ("requests", "in flight", "per s", "p50 ms", "p99 ms", "jobs not completed"):
        table.add_column(column, justify="right")
    table.add_row(str(n_short), str(SHORT_IN_FLIGHT), f"{short['per_s']:.1f}",
                  fmt_ms(short["latency_ms"]["p50"]), fmt_ms(short["latency_ms"]["p99"]),
                  str(short["not_completed"]))
    run.tables.append(table)
    return {"submit": submit, "cancel_storm": storm, "registry_memory": memory,
            "one_token": short, "pass": storm["pass"] and short["pass"]}


async def _one_token(url: str, n: int, in_flight: int) -> dict[str, Any]:
    """``n`` streamed 1-token completions, ``in_flight`` at once: the rate, the latency to
    the end of each stream, and each answer's job id (``X-Job-Id``)."""
    body = {"model": TINY, "prompt": "The hive stays warm in winter because", "max_tokens": 1,
            "stream": True}
    latencies: list[float] = []
    job_ids: list[str] = []
    failed = 0
    left = iter(range(n))
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

        async def one() -> None:
            nonlocal failed
            for _ in left:
                started = time.perf_counter()
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    text = (await response.aread()).decode()
                if response.status_code != 200 or not text.endswith(sse.DATA_DONE):
                    failed += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                job_ids.append(response.headers["x-job-id"])

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(in_flight)))
        wall = time.perf_counter() - began
    return {"requests": n, "in_flight": in_flight, "failed": failed,
            "per_s": round(len(latencies) / wall, 1), "latency_ms": summary(latencies, 1),
            "job_ids": job_ids}


# -- submitting ------------------------------------------------------------------------------
def _submit_sequential(
    api: httpx.Client, n: int, op: dict[str, Any]
) -> tuple[list[float], float]:
    latencies = []
    started = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        submit_job(api, op)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies, time.perf_counter() - started


def _round_trips(api: httpx.Client, n: int) -> list[float]:
    """``GET /health`` latencies: proxy → ingress → registry and back, no job made."""
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        api.get("/health").raise_for_status()
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def _submit_parallel(
    url: str, n: int, op: dict[str, Any]
) -> tuple[list[float], float, list[str]]:
    """``n`` submissions from ``THREADS`` threads, each with its own keep-alive client."""
    shares = [n // THREADS + (1 if i < n % THREADS else 0) for i in range(THREADS)]
    go = threading.Barrier(THREADS + 1)

    def worker(count: int) -> tuple[list[float], list[str]]:
        latencies, ids = [], []
        with client(url) as api:
            api.get("/health")  # connect before the clock starts
            go.wait()
            for _ in range(count):
                t0 = time.perf_counter()
                ids.append(submit_job(api, op))
                latencies.append((time.perf_counter() - t0) * 1000)
        return latencies, ids

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(worker, share) for share in shares]
        go.wait()
        started = time.perf_counter()
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - started
    return ([x for lat, _ in results for x in lat], elapsed,
            [x for _, ids in results for x in ids])


# -- the storm -------------------------------------------------------------------------------
def _bulk_storm(api: httpx.Client, url: str, n: int, op: dict[str, Any]) -> dict[str, Any]:
    """Queue ``n`` more jobs, cancel them with one bulk request, time until all are cancelled."""
    _, _, ids = _submit_parallel(url, n, op)
    ours = set(ids)
    started = time.perf_counter()
    response = api.post("/v1/jobs/cancel", json={"job_ids": ids})
    accepted_s = time.perf_counter() - started
    done_s: float | None = None
    while time.perf_counter() - started < 60:
        if not ours & {j["job_id"] for j in _jobs(api, "queued")}:
            done_s = time.perf_counter() - started
            break
        time.sleep(0.01)
    cancelled = {j["job_id"]: j for j in _jobs(api, "cancelled")}
    started_jobs = sum(1 for j in ids if j in cancelled and cancelled[j]["started_at"] is not None)
    not_cancelled = sum(1 for j in ids if j not in cancelled)
    return {
        "jobs": n,
        "status": response.status_code,
        "accepted_s": round(accepted_s, 3),
        "all_cancelled_s": None if done_s is None else round(done_s, 3),
        "not_cancelled": not_cancelled,
        "started": started_jobs,
        "pass": bool(done_s is not None and done_s <= STORM_TARGET_S and not not_cancelled
                     and not started_jobs and response.status_code == 202),
    }


async def _storm(url: str, ids: list[str], concurrency: int, kind: str) -> dict[str, Any]:
    """Cancel every id at once; time until each cancel is accepted and until none is queued."""
    async with _AsyncHttp(kind, url, concurrency) as http, \
            _AsyncHttp(kind, url, 1) as poller:
        # Open the connections first, so the storm measures cancels, not TCP handshakes.
        await asyncio.gather(*(http.get_json("/health") for _ in range(concurrency)))
        gate = asyncio.Semaphore(concurrency)
        codes: list[int] = []
        marks: dict[str, float] = {}
        ours = set(ids)

        async def cancel(job_id: str) -> None:
            async with gate:
                codes.append(await http.post(f"/v1/jobs/{job_id}/cancel"))
            marks["accepted"] = time.perf_counter()  # the last answer wins

        polls = 0
        started = time.perf_counter()
        sending = asyncio.gather(*(cancel(j) for j in ids))
        done_s: float | None = None
        deadline = started + 60
        while time.perf_counter() < deadline:
            body = await poller.get_json("/v1/jobs", {"state": "queued", "limit": "10000"})
            polls += 1
            left = ours & {j["job_id"] for j in body["jobs"]}
            if not left and sending.done():
                done_s = time.perf_counter() - started
                break
            await asyncio.sleep(0.01)
        await sending
        accepted_s = marks["accepted"] - started
    return {
        "client": kind,
        "concurrency": concurrency,
        "all_accepted_s": round(accepted_s, 3),
        "all_cancelled_s": None if done_s is None else round(done_s, 3),
        "not_202": sum(1 for c in codes if c != 202),
        "polls": polls,
    }


class _AsyncHttp:
    """The two calls the storm makes, over aiohttp or httpx."""

    def __init__(self, kind: str, url: str, connections: int) -> None:
        self.kind = kind
        if kind == "aiohttp":
            import aiohttp

            self._session: Any = aiohttp.ClientSession(
                url, connector=aiohttp.TCPConnector(limit=connections), trust_env=False,
                timeout=aiohttp.ClientTimeout(total=60),
            )
        else:
            limits = httpx.Limits(max_connections=connections,
                                  max_keepalive_connections=connections)
            self._session = httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                              trust_env=False)

    async def post(self, path: str) -> int:
        if self.kind == "aiohttp":
            async with self._session.post(path) as response:
                await response.read()
                return int(response.status)
        return int((await self._session.post(path)).status_code)

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        if self.kind == "aiohttp":
            async with self._session.get(path, params=params) as response:
                return await response.json()
        return (await self._session.get(path, params=params)).json()

    async def __aenter__(self) -> _AsyncHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.kind == "aiohttp":
            await self._session.close()
        else:
            await self._session.aclose()


def _default_storm_client() -> str:
    try:
        import aiohttp  # noqa: F401  (comes with ray[serve])
    except ImportError:
        return "httpx"
    return "aiohttp"


# -- reading the registry --------------------------------------------------------------------
def _jobs(api: httpx.Client, state: str) -> list[dict[str, Any]]:
    response = api.get("/v1/jobs", params={"state": state, "limit": 10_000})
    response.raise_for_status()
    return list(response.json()["jobs"])


def _job_count(api: httpx.Client) -> int:
    response = api.get("/v1/jobs", params={"limit": 10_000})
    response.raise_for_status()
    return len(response.json()["jobs"])


def _bytes_done(api: httpx.Client, job_id: str) -> int:
    progress = api.get(f"/v1/jobs/{job_id}").json()["progress"] or {}
    return int(progress.get("bytes_done", 0))


def _wait_terminal(api: httpx.Client, expected_at_least: int, timeout: float = 120) -> None:
    """Until no job is queued or running (and the registry holds the jobs we sent)."""
    def settled() -> bool:
        jobs = api.get("/v1/jobs", params={"limit": 10_000}).json()["jobs"]
        return len(jobs) >= expected_at_least and all(j["state"] in TERMINAL for j in jobs)

    wait_until(settled, timeout, "the submitted jobs to finish")


def _registry_process() -> Any:
    """The ``JobRegistry`` actor's process: by its title among this run's processes (Ray's
    processes descend from this driver), else through Ray's state API."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            if "JobRegistry" in " ".join(proc.cmdline()):
                return proc
        except psutil.Error:
            continue
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "JobRegistry"), ("state", "=", "ALIVE")])
    if not actors:
        raise RuntimeError("no JobRegistry actor")
    return psutil.Process(actors[0].pid)


def _cpu_times() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and every process it started (Ray's included)."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            label = "bench client" if proc.pid == me.pid else _label(proc)
            out[proc.pid] = (label, times.user + times.system)
        except psutil.Error:
            continue
    return out


def _label(proc: Any) -> str:
    cmdline = proc.cmdline()
    first = str(cmdline[0] if cmdline else proc.name())
    return first.split()[0] if first.startswith("ray::") else str(proc.name())


def _cpu_spent(before: dict[int, tuple[str, float]], top: int = 5) -> dict[str, float]:
    """The processes that spent the most CPU since ``before``, seconds by label."""
    spent: dict[str, float] = {}
    for pid, (label, cpu) in _cpu_times().items():
        delta = cpu - before.get(pid, (label, 0.0))[1]
        spent[label] = spent.get(label, 0.0) + delta
    ranked = sorted(spent.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {label: round(cpu, 2) for label, cpu in ranked if cpu >= 0.01}


def _per(delta: int, n: int) -> int | None:
    return round(delta / n) if n > 0 else None


# -- output ----------------------------------------------------------------------------------
def _tables(submit: dict[str, Any], storm: dict[str, Any], memory: dict[str, Any]) -> list[Table]:
    lat = Table(title=f"submit → job_id (POST /v1/jobs {submit['operation']})")
    for column in ("how", "n", "p50 ms", "p99 ms", "max ms", "submissions/s"):
        lat.add_column(column, justify="left" if column == "how" else "right")
    for how, key, rate in (("sequential, one client", "latency_ms", "per_s_sequential"),
                           (f"{submit['threads']} threads", "latency_parallel_ms",
                            "per_s_parallel")):
        s = submit[key]
        lat.add_row(how, str(s["n"]), fmt_ms(s["p50"]), fmt_ms(s["p99"]), fmt_ms(s["max"]),
                    f"{submit[rate]:.0f}")
    s = submit["health_ms"]
    lat.add_row("baseline: GET /health, no job", str(s["n"]), fmt_ms(s["p50"]), fmt_ms(s["p99"]),
                fmt_ms(s["max"]), "")

    st = Table(title=f"cancel storm: {storm['jobs']} queued model_download jobs")
    st.add_column("measure")
    st.add_column("value", justify="right")
    verdict = "[green]ok[/]" if storm["pass"] else "[red]MISS[/]"
    done = storm["all_cancelled_s"]
    st.add_row("submitted (8 threads)", f"{storm['submit_per_s']:.0f}/s")
    st.add_row(f"all {storm['jobs']} cancels answered 202 ({storm['concurrency']} in flight)",
               f"{storm['all_accepted_s']:.2f} s")
    st.add_row("one POST /v1/jobs/{id}/cancel each: all cancelled",
               "timeout" if done is None else f"{done:.2f} s")
    bulk = storm["bulk"]
    st.add_row(f"one bulk POST /v1/jobs/cancel for {bulk['jobs']}: all cancelled",
               "timeout" if bulk["all_cancelled_s"] is None else f"{bulk['all_cancelled_s']:.2f} s")
    st.add_row(f"target ≤ {STORM_TARGET_S:g} s (either way) {verdict}", "")
    st.add_row("not 202 / not cancelled / ever started",
               f"{storm['not_202']} / {storm['not_cancelled']} / {storm['started']}")
    st.add_row("storm client", f"{storm['client']}, {storm['concurrency']} connections")
    for label, cpu in storm["cpu_s"].items():
        st.add_row(f"CPU during the storm: {label}", f"{cpu:.2f} s")

    mem = Table(title=f"JobRegistry memory (pid {memory['pid']}, RSS)")
    mem.add_column("measure")
    mem.add_column("value", justify="right")
    mem.add_row("at start (after warm-up)", f"{memory['rss_start_bytes'] / MiB:.1f} MiB")
    mem.add_row(f"per finished {memory['cheap_operation']} job ({memory['cheap_jobs']})",
                _bytes(memory["per_cheap_job_bytes"]))
    mem.add_row(f"per queued model_download job ({memory['queued_download_jobs']})",
                _bytes(memory["per_queued_download_job_bytes"]))
    mem.add_row("change while the storm cancelled them", _bytes(memory["after_storm_delta_bytes"]))
    mem.add_row(f"at end, holding {memory['jobs_held']} jobs",
                f"{memory['rss_end_bytes'] / MiB:.1f} MiB")
    return [lat, st, mem]


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / KiB:.1f} KiB" if abs(n) >= KiB else f"{n} B"


if __name__ == "__main__":
    sys.exit(main("jobs", bench, configure))
