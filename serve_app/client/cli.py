"""The ``rbee`` command line.

``rbee serve`` starts the hive; every other command talks to one over HTTP (``--server``,
else ``RBEE_URL``, else http://127.0.0.1:7835; ``RBEE_API_TOKEN`` is sent when set). Errors
print one line, ``error: <code>: <message>``, and exit 1 (usage errors exit 2). Ctrl+C on a
running job cancels it on the server and exits 130; a second Ctrl+C exits at once.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console

from actors.core.errors import RbeeError
from serve_app.client import render
from serve_app.client.api import DEFAULT_URL, Client, ServerUnavailable, operation

app = typer.Typer(
    help="rbee: LLM jobs on Ray you can watch live and really cancel.", no_args_is_help=True
)
model_app = typer.Typer(help="Models in a hive's cache: download, list, get, rm.")
worker_app = typer.Typer(help="Inference workers: spawn, list, stop.")
jobs_app = typer.Typer(help="Jobs: list, show, cancel, stream.")
hive_app = typer.Typer(help="Hives (one per Ray node).")
for group, name in ((model_app, "model"), (worker_app, "worker"), (jobs_app, "jobs")):
    app.add_typer(group, name=name, no_args_is_help=True)
app.add_typer(hive_app, name="hive", no_args_is_help=True)
console = Console(stderr=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead, for scripts.")]
HiveId = Annotated[str | None, typer.Option("--hive", help="The hive to run on (default: local).")]
DEFAULT_MODEL = "local/smollm2-135m-instruct"  #: the embedded model (SPEC §10)
TERMINAL = ("completed", "failed", "cancelled")
CANCEL_TIMEOUT_S = 2.0
CANCEL_WAIT_S = 5.0
INTERRUPTED = render.INTERRUPTED


@dataclass(frozen=True, slots=True)
class Target:
    """Where the commands send their requests (the root options)."""

    url: str | None


@app.callback()
def _root(
    ctx: typer.Context,
    server: Annotated[
        str | None,
        typer.Option("--server", envvar="RBEE_URL", help="rbee's URL (default 127.0.0.1:7835)."),
    ] = None,
) -> None:
    """rbee: LLM jobs on Ray you can watch live and really cancel."""
    ctx.obj = Target(server)


@contextmanager
def _session(ctx: typer.Context) -> Iterator[Client]:
    """A client for the command; our errors end it with one line on stderr and exit 1."""
    target = ctx.find_root().obj
    url = (target.url if isinstance(target, Target) else None) or DEFAULT_URL
    try:
        with Client(url) as client:
            yield client
    except ServerUnavailable as exc:
        if isinstance(exc.__cause__, httpx.ConnectError):
            _fail(f"cannot reach rbee at {url} (is 'rbee serve' running?)")
        _fail(f"{exc.code}: {exc.message}")
    except RbeeError as exc:
        _fail(f"{exc.code}: {exc.message}")


def _fail(line: str, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _follow_job(
    ctx: typer.Context, op: dict[str, Any], view: render.JobView, what: str
) -> dict[str, Any]:
    """Submit ``op`` and show its events until it ends; Ctrl+C cancels it (exit 130)."""
    with _session(ctx) as client:
        try:
            job_id = client.submit(op)
        except KeyboardInterrupt:
            _fail("interrupted before the job was accepted", INTERRUPTED)
        view.started(job_id, what)
        try:
            render.follow(client, job_id, view)
        except KeyboardInterrupt:
            view.close()
            _cancel_and_exit(client, job_id)
        finally:
            view.close()
    return view.result


def _cancel_and_exit(client: Client, job_id: str) -> NoReturn:
    """First Ctrl+C: ask the server to cancel (2 s to accept), wait up to 5 s for the job to
    end, exit 130. The calls run on a helper thread so these bounds hold whatever the network
    does; a second Ctrl+C exits at once (``render.follow`` armed it)."""
    console.print(f"cancelling job {job_id} ...", highlight=False)
    news: queue.Queue[str | RbeeError] = queue.Queue()
    threading.Thread(target=_cancel, args=(client, job_id, news), daemon=True).start()
    try:
        accepted = news.get(timeout=CANCEL_TIMEOUT_S)
    except queue.Empty:
        accepted = ServerUnavailable(f"rbee did not answer within {CANCEL_TIMEOUT_S:g} s")
    if isinstance(accepted, RbeeError):
        _fail(f"could not cancel job {job_id}: {accepted.message}", INTERRUPTED)
    try:
        state = news.get(timeout=CANCEL_WAIT_S)
    except queue.Empty:
        state = "unconfirmed"
    if state == "cancelled":
        console.print(f"cancelled job {job_id}", highlight=False)
    elif state in ("completed", "failed"):
        console.print(f"job {job_id} had already {state}", highlight=False)
    else:
        console.print(f"asked to cancel job {job_id}; not confirmed within {CANCEL_WAIT_S:g} s")
    raise typer.Exit(INTERRUPTED)


def _cancel(client: Client, job_id: str, news: queue.Queue[str | RbeeError]) -> None:
    try:
        client.cancel(job_id)
        news.put("accepted")
        while (state := client.job(job_id)["state"]) not in TERMINAL:
            time.sleep(0.05)
        news.put(state)
    except RbeeError as exc:
        news.put(exc)


def _query(
    ctx: typer.Context,
    op: dict[str, Any],
    as_json: bool,
    show: render.Renderer,
    narration: bool = False,
) -> None:
    """A job whose result is the answer: a table, or JSON with ``--json``."""
    result = _follow_job(ctx, op, render.JobView(narration=narration), op["operation"])
    if as_json:
        render.print_json(result)
    else:
        show(result)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default 7835).")] = None,
    address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting one.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="A YAML config file (else RBEE_CONFIG).")
    ] = None,
) -> None:
    """Start (or join) Ray, deploy the hive and its HTTP API, and block until Ctrl+C.

    Ctrl+C or SIGTERM (to this process or its whole group) cancels the running jobs, stops
    every engine and Ray, and exits within 15 s. Preloads load in the background.
    """
    from serve_app.server.launch import Hive

    overrides: dict[str, Any] = {
        k: v for k, v in {"server__host": host, "server__port": port}.items() if v is not None
    }
    try:
        with _stopped_by_signals(), Hive.start(
            config_path=config, address=address, **overrides
        ) as hive:
            console.print(f"[bold green]rbee[/] is serving on {hive.url}  (Ctrl+C to stop)")
            if hive.dashboard_url:
                console.print(f"Ray dashboard: {hive.dashboard_url}")
            for model, job_id in hive.preloads.items():
                console.print(f"preloading {model} (job {job_id})", highlight=False)
            threading.Event().wait()
    except KeyboardInterrupt:
        _exit_now(0)
    except Exception:
        traceback.print_exc()
        _exit_now(1)


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """The first SIGINT or SIGTERM unwinds ``rbee serve`` into its shutdown, as Ctrl+C does
    (Ray's own SIGTERM handler would exit without cleaning up); later ones only say that
    the shutdown, which is bounded, is under way."""

    def again(signum: int, frame: object) -> None:
        os.write(2, b"rbee is already shutting down (15 s at most) ...\n")

    def first(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)
        os.write(2, b"shutting down ...\n")
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, first)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_now(code: int) -> NoReturn:
    """Exit without Python's shutdown, which would wait on Ray: when Ray's processes died
    first (a signal to the whole group), a call into it may hang in a thread, and so would
    Ray's exit hook. Everything rbee started is stopped by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@model_app.command("download")
def model_download(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="The model id, org/name.")],
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
    files: Annotated[
        list[str] | None, typer.Option("--files", help="Only files matching this glob (repeat).")
    ] = None,
    vendor: Annotated[str | None, typer.Option(help="Where from: hf (default) or url.")] = None,
    url: Annotated[str | None, typer.Option(help="The file's address, with --vendor url.")] = None,
    hive: HiveId = None,
    as_json: Json = False,
) -> None:
    """Download a model into the hive's cache with a live progress bar; print its path."""
    op = operation(
        "model_download",
        model=model,
        revision=revision,
        files=files or None,
        vendor=vendor,
        url=url,
        hive_id=hive,
    )
    view = render.JobView(json_lines=as_json)
    result = _follow_job(ctx, op, view, f"download {model}")
    if not as_json:
        render.downloaded(result)


@model_app.command("list")
def model_list(ctx: typer.Context, hive: HiveId = None, as_json: Json = False) -> None:
    """The models in the hive's cache."""
    _query(ctx, operation("model_list", hive_id=hive), as_json, render.models)


@model_app.command("get")
def model_get(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="org/name")],
    hive: HiveId = None,
    as_json: Json = False,
) -> None:
    """One cached model: its revision, size and files."""
    _query(ctx, operation("model_get", model=model, hive_id=hive), as_json, render.model)


@model_app.command("rm")
def model_rm(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="org/name")],
    hive: HiveId = None,
    as_json: Json = False,
) -> None:
    """Delete a model from the hive's cache."""
    _query(ctx, operation("model_delete", model=model, hive_id=hive), as_json, render.deleted)


@app.command()
def infer(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    model: Annotated[str, typer.Option(envvar="RBEE_MODEL", help="Model id.")] = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Go on past end-of-text.")] = False,
    raw: Annotated[
        bool, typer.Option(help="Send PROMPT as raw text, not as a chat message.")
    ] = False,
    worker: Annotated[str | None, typer.Option(help="Run on this worker.")] = None,
    hive: HiveId = None,
    as_json: Json = False,
) -> None:
    """Generate text; tokens are printed as they arrive.

    PROMPT goes in as a user message through the model's chat template (what an instruct
    model expects); ``--raw`` sends it as plain text to continue.
    """
    op = operation(
        "infer",
        model=model,
        prompt=prompt if raw else None,
        messages=None if raw else [{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        ignore_eos=ignore_eos or None,
        worker_id=worker,
        hive_id=hive,
    )
    view = render.JobView(json_lines=as_json, narration=False)
    result = _follow_job(ctx, op, view, "infer")
    if not as_json:
        render.inferred(view)(result)


@worker_app.command("spawn")
def worker_spawn(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="The model the worker serves.")],
    device: Annotated[str | None, typer.Option(help="cpu or gpu (default: the hive's).")] = None,
    worker_id: Annotated[str | None, typer.Option("--id", help="The worker's id.")] = None,
    hive: HiveId = None,
    as_json: Json = False,
) -> None:
    """Start an inference worker for a model (it loads the model, then takes jobs)."""
    op = operation("worker_spawn", model=model, device=device, worker_id=worker_id, hive_id=hive)
    _query(ctx, op, as_json, render.workers, narration=True)


@worker_app.command("list")
def worker_list(ctx: typer.Context, hive: HiveId = None, as_json: Json = False) -> None:
    """The hive's inference workers."""
    _query(ctx, operation("worker_list", hive_id=hive), as_json, render.workers)


@worker_app.command("stop")
def worker_stop(
    ctx: typer.Context,
    worker_id: Annotated[str, typer.Argument(help="The worker's id.")],
    hive: HiveId = None,
    as_json: Json = False,
) -> None:
    """Stop an inference worker and free its memory."""
    op = operation("worker_stop", worker_id=worker_id, hive_id=hive)
    _query(ctx, op, as_json, render.workers)


@hive_app.command("status")
def hive_status(ctx: typer.Context, hive: HiveId = None, as_json: Json = False) -> None:
    """A hive's CPUs, GPUs, memory, cache, models, workers and how its preloads went."""
    _query(ctx, operation("hive_status", hive_id=hive), as_json, _show_hive_status)


def _show_hive_status(result: dict[str, Any]) -> None:
    """The hive's figures, then a table of its workers and one of its preloads (a failed or
    cancelled one says why)."""
    render.key_values({k: v for k, v in result.items() if k not in ("workers", "preload")})
    render.workers(result)
    preloads = result.get("preload") or {}
    render.rows(
        [
            {
                "preload": model,
                "state": p.get("state"),
                "worker_id": p.get("worker_id"),
                "job_id": p.get("job_id"),
                "error": f"{p['error'].get('code')}: {p['error'].get('message')}"
                if p.get("error")
                else None,
            }
            for model, p in preloads.items()
        ],
        "no preloads",
    )


@hive_app.command("list")
def hive_list(ctx: typer.Context, as_json: Json = False) -> None:
    """Every hive of the cluster."""
    _query(ctx, operation("hive_list"), as_json, render.hives)


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="queued, running, completed, ...")] = None,
    op: Annotated[str | None, typer.Option("--operation", help="e.g. model_download")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 20,
    as_json: Json = False,
) -> None:
    """Jobs, newest first."""
    with _session(ctx) as client:
        records = client.jobs(state=state, operation=op, limit=limit)
    if as_json:
        render.print_json(records)
    else:
        render.jobs(records)


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str, as_json: Json = False) -> None:
    """One job: state, times, last progress, result, error."""
    with _session(ctx) as client:
        record = client.job(job_id)
    if as_json:
        render.print_json(record)
    else:
        render.job(record)


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context,
    job_id: str,
    wait: Annotated[bool, typer.Option(help="Wait until it is cancelled.")] = False,
) -> None:
    """Cancel a job (queued or running)."""
    with _session(ctx) as client:
        client.cancel(job_id, wait=wait)
    console.print(f"{'cancelled' if wait else 'cancelling'} job {job_id}", highlight=False)


@jobs_app.command("stream")
def jobs_stream(
    ctx: typer.Context,
    job_id: str,
    after: Annotated[
        int | None, typer.Option("--after", help="Resume after this event id.")
    ] = None,
    as_json: Json = False,
) -> None:
    """Watch a job's events live (Ctrl+C stops watching; the job goes on)."""
    view = render.JobView(json_lines=as_json)
    with _session(ctx) as client:
        try:
            record = client.job(job_id)
            view.started(
                job_id, f"{record['operation']}, {record['state']}", "Ctrl+C stops watching"
            )
            render.follow(client, job_id, view, after)
        except KeyboardInterrupt:
            view.close()
            console.print(f"stopped watching job {job_id} (it goes on)", highlight=False)
            raise typer.Exit(INTERRUPTED) from None
        finally:
            view.close()
    if view.result and not as_json:
        render.print_json(view.result)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
