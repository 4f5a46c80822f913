"""Where one ``JobRegistry`` saturates: the jobs a second it records when the ingress
answers OpenAI requests straight from the workers (``serve_app.server.direct``).

Each such request costs the registry what an ingress posts for it, off the request's path
(``actors.registry_client.Registry.post``): an ``Adoption`` and an ``Ending`` with the job's
events, sent in one ``mail`` call per ``MAIL_S`` per ingress. This drives the real registry
actor of a real hive with those calls, as ``--ingresses`` ingresses would (each keeps one
call in flight), for each batch size in ``--batches`` (requests an ingress gathers in one
call), for ``--seconds`` each, and reports the jobs recorded a second and the registry's CPU
per job. The events are a 1-token request's (narration, one token, the result).

    .venv/bin/python bench/registry.py [--quick] [--ingresses 4] [--batches 1,8,64]

A registry is one Python process on one core: past its rate, jobs are recorded late (the
requests themselves never wait for it); rbee goes past it with more ingresses' batches
(bigger batches: fewer calls) and, beyond that, a registry per job-id shard.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from _common import HubProcess, Run, hive_config, log, main, start_hive
from jobs import _registry_process
from rich.table import Table


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ingresses", type=int, default=4,
                        help="ingresses posting at once (default 4)")
    parser.add_argument("--batches", default="1,8,64",
                        help="requests per mail call, comma-separated (default 1,8,64)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per batch size (default 10; --quick: 3)")


def _mail(n: int, model: str) -> list[Any]:
    from actors.core.events import Narration, Result, StreamEvent, Token, pack
    from actors.core.jobs import Adoption, Ending
    from actors.core.table import JobState, new_job_id

    mail: list[Any] = []
    for _ in range(n):
        job_id = new_job_id()
        request = {"operation": "infer", "model": model,
                   "openai": {"api": "completions", "request": {"model": model, "prompt": "hi",
                                                               "max_tokens": 1}}}
        adoption = Adoption(job_id, request, f"cid-{job_id}", "rbee-worker-bench", time.time())
        events = [
            StreamEvent(1, Narration("worker", "generate", "generating")),
            StreamEvent(2, Token("x", 1)),
            StreamEvent(3, Result({"text": "x", "finish_reason": "length", "usage": None})),
        ]
        mail += [adoption, Ending(job_id, pack(events), JobState.COMPLETED, adoption)]
    return mail


async def _drive(registry: Any, batch: int, ingresses: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    done = 0

    async def ingress() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await registry.mail.remote(_mail(batch, "bench/tiny"))
            done += batch

    await asyncio.gather(*(ingress() for _ in range(ingresses)))
    return done


def bench(run: Run) -> dict[str, Any]:
    """Jobs a second one registry records from direct answers, by batch size."""
    import ray

    from actors.naming import NAMESPACE, REGISTRY

    args = run.args
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    batches = [int(b) for b in args.batches.split(",")]
    hub = run.stack.enter_context(HubProcess())
    hive_ = start_hive(run, hive_config(run, hub.url))
    log.print(f"[dim]hive at {hive_.url}[/]")
    registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
    proc = _registry_process()
    asyncio.run(_drive(registry, 1, 1, 1.0))  # warm
    rows = []
    for batch in batches:
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        jobs = asyncio.run(_drive(registry, batch, args.ingresses, seconds))
        wall = time.monotonic() - t0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        rows.append({"batch": batch, "jobs": jobs, "jobs_per_s": round(jobs / wall, 1),
                     "registry_cpu_ms_per_job": round(1000 * cpu / jobs, 3),
                     "registry_cpu_share": round(cpu / wall, 2)})
        log.print(f"  batch {batch}: {rows[-1]['jobs_per_s']} jobs/s, "
                  f"{rows[-1]['registry_cpu_ms_per_job']} ms of registry CPU a job")
    table = Table(title=f"one JobRegistry, {args.ingresses} ingresses posting")
    for column in ("requests per call", "jobs/s", "registry CPU ms/job", "registry core share"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["batch"]), f"{row['jobs_per_s']:,.0f}",
                      f"{row['registry_cpu_ms_per_job']:.3f}", f"{row['registry_cpu_share']:.2f}")
    run.tables.append(table)
    return {"ingresses": args.ingresses, "seconds": seconds, "rounds": rows}


if __name__ == "__main__":
    raise SystemExit(main("registry", bench, configure))
