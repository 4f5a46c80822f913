"""What the benchmarks share: a run harness that always cleans up, the hive, the fake hub,
SSE reading, percentiles and the output convention (a rich table, then one JSON line).

The scripts run as ``python bench/NAME.py``, so this directory is on ``sys.path``; the
repository root is added here so ``tests.fakehub`` imports too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Set before Ray or huggingface_hub are imported by anyone.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.fakehub import FakeHub  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000

#: progress lines go to stderr; the tables and the JSON line are the only stdout output
log = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, width=max(100, Console().width))

__all__ = [
    "MB",
    "FakeHub",
    "GiB",
    "HubProcess",
    "KiB",
    "MiB",
    "Run",
    "Sse",
    "client",
    "fmt_ms",
    "free_port",
    "hive_config",
    "job_state",
    "log",
    "main",
    "parse_size",
    "random_file",
    "read_sse",
    "start_hive",
    "submit_job",
    "summary",
    "wait_until",
]


# -- the run harness --------------------------------------------------------------------------
@dataclass
class Run:
    """One benchmark run: its arguments, a scratch directory and what to undo at the end."""

    args: argparse.Namespace
    stack: ExitStack
    workdir: Path
    tables: list[Table] = field(default_factory=list)

    def scratch(self, name: str) -> Path:
        """A fresh directory under the run's scratch dir."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        return path


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _still_cleaning(signum: int, frame: Any) -> None:
    log.print("[yellow]still cleaning up; SIGKILL abandons Ray's processes and temp files[/]")


def _install_signals() -> None:
    """Ctrl+C and SIGTERM both unwind through the run's cleanup: even when a shell that
    started us in the background left SIGINT ignored, and again after ``ray.init``, whose
    core worker installs its own SIGTERM handler (which dies without cleaning up)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)


def main(
    name: str,
    body: Callable[[Run], dict[str, Any]],
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``--quick`` (and the script's own flags), run ``body``, undo everything it
    started (even on Ctrl+C or SIGTERM), then print its tables and, last, one JSON line."""
    parser = argparse.ArgumentParser(prog=f"bench/{name}.py", description=body.__doc__)
    parser.add_argument("--quick", action="store_true", help="a small run for smoke tests")
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    _install_signals()
    stack = ExitStack()
    interrupted = False
    try:
        stack.callback(_ray_down)  # last: whatever a half-started hive left behind
        workdir = Path(tempfile.mkdtemp(prefix="rbee-b-"))  # short: Ray's socket paths
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        run = Run(args, stack, workdir)
        started, load = time.monotonic(), os.getloadavg()[0]
        figures = body(run)
        figures["wall_s"] = round(time.monotonic() - started, 1)
        # Others' work on the machine skews every figure; say how busy it was.
        figures["host"] = {"cpus": os.cpu_count(), "load_1m_start": round(load, 2),
                           "load_1m_end": round(os.getloadavg()[0], 2)}
        log.print(f"[dim]{name}: measured; cleaning up[/]")
    except KeyboardInterrupt:
        interrupted = True
        log.print(f"[yellow]{name}: interrupted; cleaning up[/]")
    finally:
        # Another Ctrl+C must not cut the cleanup short (SIGKILL still does).
        signal.signal(signal.SIGINT, _still_cleaning)
        signal.signal(signal.SIGTERM, _still_cleaning)
        stack.close()
    if interrupted:
        return 130
    for table in run.tables:
        out.print(table)
    sys.stdout.flush()
    print(json.dumps({"bench": name, "quick": args.quick, **figures}, separators=(",", ":")))
    return 0


def _ray_down() -> None:
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()


# -- the fake hub, the hive, HTTP -----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_file(path: Path, size: int, chunk: int = 8 * MiB) -> Path:
    """``size`` random bytes written in chunks (never all in memory)."""
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    return path


def hive_config(run: Run, hub_url: str, **downloads: Any) -> Any:
    """The hive's config: a fresh cache and state dir, a free port, our download settings,
    Serve's fast path (HAProxy) unless ``RBEE_INGRESS=proxy``."""
    from actors.core.config import Config

    return Config.load(
        env={},
        hub={"endpoint": hub_url},
        cache_dir=run.scratch("hf-cache"),
        state_dir=run.scratch("state"),
        server={
            "host": "127.0.0.1",
            "port": free_port(),
            "ingress": os.environ.get("RBEE_INGRESS") or "haproxy",
        },
        downloads=downloads,
        embedded=False,
        preload=[],
    )


def start_hive(run: Run, config: Any, *, num_cpus: int = 2, dashboard: bool = False) -> Any:
    """A running hive (local Ray, rbee's actors, the Serve app), stopped when the run ends."""
    from serve_app.server.launch import Hive

    ray_init: dict[str, Any] = {
        "num_cpus": num_cpus,
        "include_dashboard": dashboard,
        "_temp_dir": str(run.scratch("r")),  # short: AF_UNIX paths are at most 107 bytes
        "log_to_driver": False,
    }
    if dashboard:
        ray_init["dashboard_port"] = free_port()
    log.print("[dim]starting the hive (Ray, actors, Serve)…[/]")
    started = time.monotonic()
    hive = run.stack.enter_context(Hive.start(config=config, ray_init=ray_init))
    _install_signals()
    log.print(f"[dim]hive up at {hive.url} in {time.monotonic() - started:.1f}s[/]")
    return hive


def client(base_url: str, **kwargs: Any) -> httpx.Client:
    kwargs.setdefault("timeout", 60.0)
    return httpx.Client(base_url=base_url, trust_env=False, **kwargs)


def submit_job(api: httpx.Client, op: dict[str, Any]) -> str:
    """``POST /v1/jobs``; the job's id (anything but a 201 is an error)."""
    response = api.post("/v1/jobs", json=op)
    if response.status_code != 201:
        raise RuntimeError(f"submit {op}: {response.status_code} {response.text}")
    return str(response.json()["job_id"])


def job_state(api: httpx.Client, job_id: str) -> str:
    return str(api.get(f"/v1/jobs/{job_id}").json()["state"])


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.1)


@dataclass
class Sse:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sentinel: str | None = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [data for event, data in self.events if event == kind]


def read_sse(
    http: httpx.Client,
    path: str,
    *,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    timeout: float = 600.0,
) -> Sse:
    """Follow a job stream until its sentinel; ``on_event(kind, data)`` sees each event as it
    arrives (it may make HTTP calls of its own on another client)."""
    from serve_app import sse

    result = Sse()
    parser = sse.Parser()
    with http.stream("GET", path, timeout=timeout) as response:
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.read()!r}")
        for line in response.iter_lines():
            frame = parser.feed(line)
            if frame is None:
                continue
            if frame.kind is None:
                result.sentinel = frame.data
                break
            data = frame.json()
            result.events.append((frame.kind, data))
            if on_event is not None:
                on_event(frame.kind, data)
    return result


# -- figures ----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """n, p50, p99, max, mean of ``values`` (rounded)."""
    if not values:
        return {"n": 0, "min": None, "p50": None, "p99": None, "max": None, "mean": None}
    return {
        "n": len(values),
        "min": round(float(min(values)), digits),
        "p50": round(percentile(values, 50), digits),
        "p99": round(percentile(values, 99), digits),
        "max": round(float(max(values)), digits),
        "mean": round(sum(values) / len(values), digits),
    }


def fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def parse_size(text: str) -> int:
    """``1GiB``, ``64MiB``, ``512k``, ``1000000`` → bytes."""
    units = {"": 1, "b": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": MiB, "mib": MiB, "mb": MB,
             "g": GiB, "gib": GiB, "gb": 1000 * MB}
    raw = text.strip().lower()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    if unit not in units or not number:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(number) * units[unit])


# -- the fake hub in its own process ---------------------------------------------------------
def _hub_process(conn: Any) -> None:
    """Serve a :class:`FakeHub` and obey ``(command, argument)`` messages until told to stop
    or the parent goes away (the pipe closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    with FakeHub() as hub:
        conn.send(hub.url)
        while True:
            try:
                command, arg = conn.recv()
            except (EOFError, OSError):
                return
            if command == "stop":
                conn.send(("ok", None))
                return
            try:
                if command == "add_repo":
                    result: Any = hub.add_repo(arg[0], arg[1])
                elif command == "throttle":
                    hub.throttle_bps, result = arg, None
                elif command == "count":
                    result = hub.count(*arg)
                else:
                    raise ValueError(f"unknown command {command!r}")
                conn.send(("ok", result))
            except Exception as exc:
                conn.send(("error", repr(exc)))


class HubProcess:
    """A :class:`FakeHub` served from a child process, so its threads never compete with the
    client being measured for this interpreter's GIL. Same calls as the hub, by message."""

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_hub_process, args=(child,), name="fakehub", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(60):
            self.stop()
            raise RuntimeError("the fake hub process did not start")
        self.url: str = self._conn.recv()

    def _call(self, command: str, arg: Any = None) -> Any:
        self._conn.send((command, arg))
        status, result = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"fake hub: {command}: {result}")
        return result

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path]) -> str:
        return str(self._call("add_repo", (repo_id, files)))

    def set_throttle(self, bps: int | None) -> None:
        self._call("throttle", bps)

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        return int(self._call("count", (method, path_contains)))

    def stop(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", None))
                self._conn.poll(10)
            except OSError:
                pass
            self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._conn.close()

    def __enter__(self) -> HubProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
