"""Start and stop a whole hive from Python: Ray, rbee's actors and the Serve app.

Used by ``rbee serve``, the tests and the benchmarks, so all three run the same thing.

Start-up ends when ``/health`` answers: the ``preload`` models are ``worker_spawn`` jobs
that run in the background (a failed or cancelled one is logged and shown by
``hive_status``; the server keeps serving). Shutdown is bounded: running jobs are cancelled
(and recorded), engines shut down, Ray stopped; what does not stop in time, or outlived a
Ray that was killed under it (a SIGTERM to the whole process group), is ended by force and
the shared memory its engines left in ``/dev/shm`` is removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from actors.adapters.embedded import LOCAL_ID
from actors.cluster import shutdown_cluster
from actors.core import logs
from actors.core.config import Config, ServerConfig
from actors.core.errors import JobCancelled
from actors.core.store import JobStore
from actors.core.table import JobState
from actors.naming import NAMESPACE, REGISTRY
from actors.procs import (
    children,
    end_trackers,
    is_resource_tracker,
    proc_stat,
    process_tree,
    running,
    shared_memory,
    unlink,
)
from actors.registry_client import Registry
from serve_app.server.deployment import APP_NAME, INGRESS
from serve_app.server.fast_path import FastPath, environ, fast_path, serve_host
from serve_app.server.guards import is_loopback

log = logging.getLogger("rbee.launch")

SHUTDOWN_S = 15.0  #: the whole shutdown, at most
_GRACEFUL_S = 10.0  #: then Ray's processes are ended by force
_CANCEL_S = 4.0  #: running jobs get this long to end as cancelled
_SCAN_S = 3.0  #: how often the processes under Ray and their shared memory are noted
_TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Hive:
    config: Config
    url: str
    dashboard_url: str | None
    preloads: dict[str, str] = field(default_factory=dict)  #: model -> its worker_spawn job
    stopped_cleanly: bool = True  #: False when shutdown had to end Ray's processes by force
    ingress: str | None = None  #: ``haproxy`` or ``proxy`` for a Ray of our own
    _watch: _PreloadWatch | None = field(default=None, repr=False)

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
        """Start Ray (or join ``address``), deploy rbee, wait for ``/health``, start the
        preloads; on exit cancel the jobs and stop engines, Ray and all it started, within
        ``SHUTDOWN_S``."""
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
        local = own_ray and address is None  #: a Ray of our own: its processes are ours
        leftovers = _Leftovers() if local else None
        url = f"http://{config.server.host}:{config.server.port}"
        hive = cls(config, url, None)
        stack = ExitStack()
        try:
            serve_bind = config.server.host
            fast = None
            if local:
                fast = stack.enter_context(fast_path(config.server.ingress, config.server.host))
                hive.ingress = "haproxy" if fast else "proxy"
                if fast:  # HAProxy alone faces the network; Serve's listeners are behind it
                    serve_bind = serve_host(config.server.host)
            if local:
                stack.enter_context(environ(LOOPBACK_RAY))
            if own_ray:
                context = _init_ray(address, ray_init or {}, loopback=local)
                if context.dashboard_url:
                    hive.dashboard_url = f"http://{context.dashboard_url}"
            if leftovers is not None:
                leftovers.watch()
            serve.start(
                http_options={"host": serve_bind, "port": config.server.port},
                proxy_location=config.server.proxy_location,
            )
            serve.run(INGRESS.bind(config), name=APP_NAME, route_prefix="/")
            _wait_healthy(url, config, fast)
            hive.preload()
            yield hive
        finally:
            try:
                hive.stopped_cleanly = hive._stop(own_ray=own_ray, local=local, leftovers=leftovers)
            finally:
                stack.close()

    def preload(self) -> dict[str, str]:
        """Submit a ``worker_spawn`` job for each ``preload`` model and watch them in the
        background; returns their job ids by model. Never waits for a load."""
        watch = self._watch = _PreloadWatch(self.url, self.config)
        self.preloads = watch.submit()
        watch.start()
        return self.preloads

    def _stop(self, *, own_ray: bool, local: bool, leftovers: _Leftovers | None) -> bool:
        """Cancel jobs, stop engines and Ray, within ``SHUTDOWN_S``; True if every step
        went by itself, False if one failed or Ray's processes had to be ended."""
        started = time.monotonic()
        log.info("rbee is shutting down: cancelling jobs, stopping engines and Ray")
        if self._watch is not None:
            self._watch.stop()
        phase = ["jobs"]
        failed: list[str] = []
        done = threading.Event()

        def step(name: str, call: Callable[[], object]) -> None:
            phase[0] = name
            try:
                call()
            except Exception as exc:  # the next steps run all the same
                failed.append(name)
                log.warning("shutdown: %s failed: %r", name, exc)

        def graceful() -> None:
            if ray.is_initialized():
                step("cancelling jobs", _cancel_jobs)
                if not local:
                    step("stopping Serve", serve.shutdown)
                step("stopping engines", shutdown_cluster)
            if own_ray:
                step("stopping Ray", ray.shutdown)
            done.set()

        threading.Thread(target=graceful, name="rbee-shutdown", daemon=True).start()
        interrupted: KeyboardInterrupt | None = None
        try:
            while not done.wait(0.1):
                if time.monotonic() - started > _GRACEFUL_S:
                    log.warning(
                        "Ray did not stop within %gs (still %s): ending its processes",
                        _GRACEFUL_S,
                        phase[0],
                    )
                    break
                if leftovers is not None and phase[0] != "stopping Ray" and leftovers.ray_gone():
                    log.warning("Ray's own processes are gone (a signal to the process group?)")
                    break
        except KeyboardInterrupt as exc:  # one more Ctrl+C: stop waiting for Ray
            interrupted = exc
        if leftovers is not None:
            leftovers.finish(patient=done.is_set() and not failed)
            if self.config.state_dir is not None:
                _settle_jobs(self.config)
        log.info("rbee stopped in %.1f s", time.monotonic() - started)
        if interrupted is not None:
            raise interrupted
        return done.is_set() and not failed


def open_without_token(server: ServerConfig) -> bool:
    """True when the server listens beyond this machine (anything but 127.0.0.0/8, ::1 or
    localhost: ``0.0.0.0``, ``::``, a LAN address, any other host name) with no API token."""
    return server.api_token is None and not is_loopback(server.host)


LOOPBACK_RAY = {
    # Ray's own setting for a machine that is no cluster (its default on macOS and Windows):
    # the node's address is 127.0.0.1, and every server Ray starts binds it.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # the address vLLM gives its engines' own connections (torch.distributed's store)
    "VLLM_HOST_IP": "127.0.0.1",
}
"""The environment of a Ray rbee starts itself: it serves this machine alone, so every port
it opens (GCS, raylet, the workers' gRPC, the dashboard and its agents, the metrics
exporter, the engines') listens on loopback (SPEC §7). Peers on a network are the business
of ``ray start`` and ``rbee serve --address``."""


def _init_ray(address: str | None, options: dict[str, Any], *, loopback: bool) -> Any:
    """``ray.init``, keeping this process's SIGTERM handler (Ray's exits without cleaning up);
    with ``loopback``, a Ray of this machine alone (``LOOPBACK_RAY``)."""
    from ray._private import ray_constants

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when imported: this process imported
    # it before knowing how it would start it, so the reading is set here for the start.
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    if loopback:
        ray_constants.ENABLE_RAY_CLUSTER = False
        options = {"_node_ip_address": "127.0.0.1", **options}
    try:
        return ray.init(address=address, namespace=NAMESPACE, **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _cancel_jobs() -> None:
    """Cancel every queued and running job and wait (at most ``_CANCEL_S``) until the
    registry has recorded them as cancelled."""
    registry = Registry(ray.get_actor(REGISTRY, namespace=NAMESPACE))
    asyncio.run(_cancel_all(registry))


async def _cancel_all(registry: Registry) -> None:
    cancel = registry.cancel(None, correlation_id="shutdown", wait=True)
    try:
        answer = await asyncio.wait_for(cancel, _CANCEL_S)
    except TimeoutError:
        log.warning("some jobs were still unfinished after %gs", _CANCEL_S)
        return
    if answer.job_ids:
        log.info("cancelled %d unfinished jobs", len(answer.ended))


def _settle_jobs(config: Config) -> None:
    """Record as cancelled the jobs a killed registry could not (it went with Ray)."""
    store = JobStore(config.state_dir, keep=config.retain_jobs, lock_wait_s=0.5)
    try:
        ended = store.settle(JobState.CANCELLED, JobCancelled("rbee shut down during the job"))
    finally:
        store.close()
    if ended:
        log.info("recorded %d unfinished jobs as cancelled", len(ended))


class _PreloadWatch:
    """The preload jobs: submitted at start-up, then watched by a thread that logs how each
    ends. A failure or a cancel is a warning, never the end of the server."""

    def __init__(self, url: str, config: Config) -> None:
        token = config.server.api_token
        self._client = httpx.Client(
            base_url=url,
            timeout=30,
            headers={"Authorization": f"Bearer {token.get_secret_value()}"} if token else {},
        )
        self._config = config
        self._jobs: dict[str, str] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rbee-preload", daemon=True)

    def submit(self) -> dict[str, str]:
        for model in self._config.preload:
            if model == LOCAL_ID and not self._config.embedded:
                log.info("not preloading %s: the embedded model is off (embedded: false)", model)
                continue
            # A request that came first may have started one already: that one is used.
            op = {"operation": "worker_spawn", "model": model, "reuse": True}
            try:
                response = self._client.post("/v1/jobs", json=op)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("could not start preloading %s: %s", model, exc)
                continue
            job_id = self._jobs[model] = response.json()["job_id"]
            log.info("preloading %s in the background (job %s)", model, job_id)
        return dict(self._jobs)

    def start(self) -> None:
        if self._jobs:
            self._thread.start()
        else:
            self._client.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=0.5)

    def _watch(self) -> None:
        pending = dict(self._jobs)
        try:
            while pending and not self._stopping.wait(1.0):
                for model, job_id in list(pending.items()):
                    try:
                        record = self._client.get(f"/v1/jobs/{job_id}").json()
                    except (httpx.HTTPError, ValueError):
                        continue
                    if record.get("state") in _TERMINAL:
                        del pending[model]
                        _report(model, record)
        finally:
            self._client.close()


def _report(model: str, record: dict[str, Any]) -> None:
    state, error = record["state"], record.get("error") or {}
    if state == "completed":
        worker = (record.get("result") or {}).get("worker_id")
        log.info("preloaded %s: worker %s is ready", model, worker)
        return
    why = f"{error.get('code')}: {error.get('message')}" if error else state
    log.warning(
        "preloading %s %s (job %s): %s; rbee keeps serving ('rbee hive status' shows it)",
        model,
        "was cancelled" if state == "cancelled" else "failed",
        record["job_id"],
        why,
    )


class _Leftovers:
    """The processes our own Ray started (its daemons, its workers, their vLLM engine
    processes) and the ``/dev/shm`` segments they map, noted every few seconds.

    A SIGTERM to the process group ends the raylet first: the workers and engines outlive
    it, and an engine killed mid-way leaves its shared memory behind. ``finish`` ends what
    is still running and removes those segments. Processes are told apart from a reused
    pid by their start time.
    """

    def __init__(self) -> None:
        self._before = children(os.getpid())
        self._roots: dict[int, str] = {}  #: Ray's daemons: pid -> command name (for logs)
        self._seen: dict[int, str] = {}  #: pid -> start time
        self._segments: set[Path] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rbee-leftovers", daemon=True)

    def watch(self) -> None:
        """Note Ray's daemons (started by ``ray.init`` just now) and start watching."""
        self._adopt()
        self.scan()
        self._thread.start()

    def ray_gone(self) -> bool:
        """Whether one of Ray's daemons has died: a signal to the process group reaches them
        all, and its dashboard and monitors die at once, before the raylet drains."""
        return any(not self._alive(pid) for pid in self._roots)

    def finish(self, *, patient: bool, grace_s: float = 2.0) -> None:
        """End every noted process still running (SIGTERM, then SIGKILL), then remove the
        shared-memory segments they mapped. ``patient``: Ray stopped by itself, and its
        workers get a moment to follow."""
        self._stopping.set()
        self._adopt()
        self.scan()
        alive = [pid for pid in self._seen if self._alive(pid)]
        deadline = time.monotonic() + (1.0 if patient else 0.0)
        while (alive := [p for p in alive if self._alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive:
            level = logging.INFO if patient else logging.WARNING
            log.log(level, "ending %d processes Ray left running", len(alive))
        # Python's resource trackers go last: each removes the semaphores of the processes
        # it serves once those are gone (and ignores SIGTERM).
        trackers = [pid for pid in alive if is_resource_tracker(pid)]
        alive = [pid for pid in alive if pid not in trackers]
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
            self.scan()  # an engine still starting maps new segments up to its end
            for pid in alive:
                with suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while (alive := [p for p in alive if self._alive(p)]) and time.monotonic() < deadline:
                time.sleep(0.05)
                self.scan()
        if killed := end_trackers(trackers, self._alive, alive):
            log.warning("killed %d resource trackers that had not finished", len(killed))
        removed = [path for path in sorted(self._segments) if unlink(path)]
        if removed:
            log.info("removed %d shared-memory segments left in /dev/shm", len(removed))

    def scan(self) -> None:
        tree = process_tree()
        with self._lock:
            todo = [pid for pid in (*self._roots, *self._seen) if self._alive(pid)]
            while todo:
                pid = todo.pop()
                if pid not in self._seen and (stat := proc_stat(pid)) is not None:
                    self._seen[pid] = stat[2]
                todo.extend(child for child in tree.get(pid, ()) if child not in self._seen)
            alive = [pid for pid in self._seen if self._alive(pid)]
        for pid in alive:
            self._segments.update(shared_memory(pid))

    def _adopt(self) -> None:
        with self._lock:
            if self._roots:
                return
            for pid in children(os.getpid()) - self._before:
                with suppress(OSError):
                    self._roots[pid] = Path(f"/proc/{pid}/comm").read_text().strip()

    def _loop(self) -> None:
        while not self._stopping.wait(_SCAN_S):
            try:
                self.scan()
            except Exception as exc:  # /proc is read best-effort
                log.debug("scanning Ray's processes failed: %r", exc)

    def _alive(self, pid: int) -> bool:
        return running(pid, self._seen.get(pid))


def _wait_healthy(url: str, config: Config, fast: FastPath | None, timeout: float = 120.0) -> None:
    """Until ``/health`` answers, and, on the fast path, HAProxy sends requests straight to
    the ingress replica: the first answers come through Serve's fallback proxy, and the
    HAProxy Ray starts once the replica is known counts no connection the old one holds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    else:
        raise TimeoutError(f"rbee did not become healthy at {url}: {last!r}")
    while fast is not None and not fast.direct():
        if time.monotonic() > deadline:
            log.warning("HAProxy still sends requests through Serve's fallback proxy")
            return
        time.sleep(0.1)
