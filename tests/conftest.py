"""Shared fixtures: one real local Ray cluster, the real Serve app and a real fake hub."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakehub import FakeHub

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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
def hive(hub: FakeHub, cache_dir: Path, ray_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from actors.config import Config
    from serve_app.launch import Hive

    config = Config.load(
        env={},
        hub={"endpoint": hub.url},
        cache_dir=cache_dir,
        state_dir=tmp_path_factory.mktemp("state"),
        server={"host": "127.0.0.1", "port": free_port(), "keepalive_s": 1.0},
        downloads={"concurrency": 2, "parallel_min_size": 4 << 20, "segments": 4, "retries": 3},
    )
    ray_init = {
        "num_cpus": 2,
        "include_dashboard": True,
        "dashboard_port": free_port(),
        "_temp_dir": str(ray_dir),
        "log_to_driver": False,
    }
    with Hive.start(config=config, ray_init=ray_init) as running:
        yield running


@pytest.fixture
def api(hive) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hive.url, timeout=30) as client:
        yield client
