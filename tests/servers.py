"""``rbee serve`` as a process of its own, for the tests that start one: its processes are
found by its session id and process tree, and only those are ever signalled."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from serve_app.server.fast_path import sweep_leftovers
from tests.conftest import free_port
from tests.helpers import wait_for

RBEE = str(Path(sys.executable).parent / "rbee")


def processes_of(leader: int) -> dict[int, float]:
    """The processes of the session ``leader`` started (its group, and Ray's workers, which
    have groups of their own) and everything under it. pid -> start time."""
    found: dict[int, float] = {}
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getsid(proc.pid) == leader:
                found[proc.pid] = proc.info["create_time"]
        except OSError:
            continue
    try:
        for child in psutil.Process(leader).children(recursive=True):
            found[child.pid] = child.create_time()
    except psutil.Error:
        pass
    return found


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    state_dir: Path
    log: Path

    def processes(self) -> dict[int, float]:
        """The server's processes (``processes_of``)."""
        return processes_of(self.process.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def alive(processes: dict[int, float]) -> list[int]:
    alive = []
    for pid, started in processes.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


_READY = "is serving on"  #: what ``rbee serve`` prints once it is up


@contextmanager
def serving(
    tmp_path: Path,
    cache_dir: Path | None = None,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    port: int | None = None,
    **config: Any,
) -> Iterator[Served]:
    """``rbee serve`` (with ``args``) in a new session, with a temp state dir, cache and Ray
    dir; ``env`` is added to its environment."""
    port = port or free_port()
    config_file = tmp_path / "rbee.yaml"
    config_file.write_text(yaml.safe_dump({"embedded": False, "preload": [], **config}))
    ray_dir = Path(tempfile.mkdtemp(prefix="rbee-ray-", dir="/tmp"))  # short: Ray's sockets
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RBEE_", "RAY_"))},
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": str(ray_dir),
        "RBEE_CONFIG": str(config_file),
        "RBEE_STATE_DIR": str(tmp_path / "state"),
        "RBEE_CACHE_DIR": str(cache_dir or tmp_path / "cache"),
        **(env or {}),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [RBEE, "serve", "--port", str(port), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(process, f"http://127.0.0.1:{port}", tmp_path / "state", log)
    seen: dict[int, float] = {}
    try:

        def healthy() -> bool:
            assert process.poll() is None, served.output()
            seen.update(served.processes())
            try:
                answered = httpx.get(f"{served.url}/health", timeout=5, verify=False).status_code == 200
            except httpx.HTTPError:
                return False
            return answered and _READY in served.output()  # (its HAProxy settled too)

        wait_for(healthy, timeout=180, interval=0.5)
        yield served
    finally:
        seen.update(served.processes())
        for pid in alive(seen):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        process.wait(timeout=30)
        shutil.rmtree(ray_dir, ignore_errors=True)
        sweep_leftovers()  # the HAProxy folder of the server just killed
