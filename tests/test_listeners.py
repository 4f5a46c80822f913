"""What the server listens on, and how long it waits for a client (SPEC §7): with a loopback
host every socket of its whole process tree is bound to loopback (Ray's, HAProxy's, the
engine's); half-open and slowloris connections are dropped and never starve ``/health``; a
wildcard bind keeps Ray on loopback and bounds what one address of the network may hold."""

from __future__ import annotations

import ipaddress
import os
import resource
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from serve_app.server.fast_path import HTTP_REQUEST_S, PER_SOURCE, haproxy_binary, harden
from tests.helpers import outside_address, wait_for
from tests.servers import serving

REPLICA_GRPC = "ray::ServeReplica"
"""Ray Serve's replica opens its inter-deployment gRPC server on ``[::]:0`` (fixed in Ray
Serve's replica, guarded by Ray's token authentication): the one socket Ray gives no way
to bind elsewhere (README, Security)."""


def _listeners(root: int) -> list[tuple[str, str, str, int]]:
    """(process name, kind, address, port) of every listening TCP socket and every bound UDP
    socket of ``root`` and the processes under it (``/proc/net/*`` matched to the sockets
    each process holds)."""
    found = []
    try:
        tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return found
    for proc in tree:
        try:
            name = proc.name()
            for conn in proc.net_connections("inet"):
                if conn.type == socket.SOCK_STREAM and conn.status != psutil.CONN_LISTEN:
                    continue
                if conn.type == socket.SOCK_DGRAM and conn.raddr:
                    continue  # connected: it takes only its peer's datagrams
                found.append((name, conn.type.name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _beyond_loopback(listeners: list[tuple[str, str, str, int]]) -> tuple[list, list]:
    """The listeners on another address than loopback: Ray Serve's replica gRPC apart."""
    outside = [item for item in listeners if not _loopback(item[2])]
    replica = [item for item in outside if item[0].startswith(REPLICA_GRPC) and item[2] == "::"]
    return [item for item in outside if item not in replica], replica


def test_every_socket_of_a_loopback_server_listens_on_loopback(hive, worker):
    """The session's server (its Ray, Serve, HAProxy and a running vLLM engine): no socket
    of its process tree is bound to another address."""
    listeners = _listeners(os.getpid())
    names = {item[0] for item in listeners}
    # The scan sees all of it: Ray's daemons, HAProxy, the actors and the engine's worker.
    assert {"gcs_server", "raylet", "haproxy"} <= names, names
    assert any(name.startswith("ray::InferenceActor") for name in names), names
    others, replica = _beyond_loopback(listeners)
    assert others == []
    assert len(replica) <= 1, replica


@contextmanager
def _half_open(port: int, count: int, source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """``count`` connections that each send the first line of a request and nothing more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1_000)), hard))
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.settimeout(5)
            s.bind((source, 0))
            s.connect(("127.0.0.1" if source.startswith("127.") else source, port))
            s.sendall(b"GET /health HTTP/1.1\r\n")
            held.append(s)
        yield held
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _served(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, verify=False).status_code == 200
    except httpx.HTTPError:
        return False


def _haproxy_pids(root: int) -> set[int]:
    found = set()
    for proc in psutil.Process(root).children(recursive=True):
        try:
            if proc.name() == "haproxy":
                found.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _settled_haproxy(root: int, alone_s: float = 5.0) -> set[int] | None:
    """The one HAProxy of the server, once it is the only one and has run ``alone_s``."""
    pids = _haproxy_pids(root)
    if len(pids) != 1:
        return None
    try:
        age = time.time() - psutil.Process(next(iter(pids))).create_time()
    except psutil.NoSuchProcess:
        return None
    return pids if age >= alone_s else None


def _closed_by_server(held: list[socket.socket], within_s: float) -> tuple[int, set[bytes]]:
    """How many of ``held`` the server closes within ``within_s``, and the first bytes of
    what it said to them."""
    sel = selectors.DefaultSelector()
    for s in held:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed, said = 0, set()
    end = time.monotonic() + within_s
    while closed < len(held) and time.monotonic() < end:
        for key, _ in sel.select(0.5):
            try:
                said.add(key.fileobj.recv(64)[:30])  # type: ignore[union-attr]
            except OSError:
                said.add(b"")
            sel.unregister(key.fileobj)
            closed += 1
    sel.close()
    return closed, said


def _health_s(url: str) -> float:
    started = time.monotonic()
    response = httpx.get(f"{url}/health", timeout=5)
    assert response.status_code == 200
    return time.monotonic() - started


def test_five_thousand_half_open_connections_do_not_starve_health(hive):
    port = int(hive.url.rsplit(":", 1)[1])
    started = time.monotonic()
    with _half_open(port, 5_000) as held:
        assert len(held) == 5_000
        times = [_health_s(hive.url) for _ in range(5)]
        assert max(times) < 1.0, times
        # Headers not complete within HTTP_REQUEST_S: every one is answered 408 and closed.
        closed, said = _closed_by_server(held, HTTP_REQUEST_S + 10 - (time.monotonic() - started))
    assert closed == 5_000
    assert said == {b"HTTP/1.1 408 Request Time-out\r\n"[:30]}
    assert _health_s(hive.url) < 1.0


def test_slowloris_connections_are_dropped(hive):
    """64 clients that each send one more header line every second never finish theirs:
    the server drops them all once the request's time is up."""
    port = int(hive.url.rsplit(":", 1)[1])
    with _half_open(port, 64) as held:
        started, alive = time.monotonic(), list(held)
        while alive and time.monotonic() - started < HTTP_REQUEST_S + 10:
            for s in list(alive):
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    alive.remove(s)
            assert _health_s(hive.url) < 1.0
            time.sleep(1)
        assert alive == [], f"{len(alive)} slow clients outlived {HTTP_REQUEST_S + 10}s"
        assert time.monotonic() - started > HTTP_REQUEST_S - 1  # not closed for another reason


def test_the_running_haproxy_reads_rbees_bounds(hive):
    """The configuration Ray wrote for the session's HAProxy, hardened by ``rbee-haproxy``
    before HAProxy read it; HAProxy itself accepts it."""
    workdir = Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    (config,) = workdir.glob("*/haproxy.cfg")
    text = config.read_text()
    assert "# rbee:" in text
    binds = [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]
    assert binds and all(b.startswith("127.0.0.1:") for b in binds), binds
    assert f"timeout http-request {HTTP_REQUEST_S}s" in text
    assert f"sc0_conn_cur gt {PER_SOURCE}" in text
    assert harden(text).count("stick-table") == 1 or "# rbee:" in text  # written once
    binary = haproxy_binary()
    assert binary is not None
    check = subprocess.run(
        [binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stderr


def test_harden_rebinds_only_what_ray_opens_everywhere():
    ray_like = "\n".join([
        "global", "    maxconn 4096", "defaults", "    timeout client 3600s",
        "frontend prometheus", "    bind :9101", "frontend http_frontend", "    bind *:8000",
        "backend b", "    server s 10.0.0.5:30000 check", "listen stats", "  bind *:8404",
    ])  # fmt: skip
    out = harden(ray_like).splitlines()
    assert "    bind 127.0.0.1:9101" in out and "  bind 127.0.0.1:8404" in out
    assert "    bind *:8000" in out  # the server's own bind is the user's choice
    assert "    server s 10.0.0.5:30000 check" in out
    assert out[out.index("defaults") + 1] == f"    timeout http-request {HTTP_REQUEST_S}s"
    frontend = out.index("frontend http_frontend")
    assert "track-sc0 src unless { src 127.0.0.0/8 ::1 }" in out[frontend + 4]
    # Serve binds loopback under the fast path; HAProxy's frontend takes the server's host.
    behind = ray_like.replace("bind *:8000", "bind 127.0.0.1:8000")
    for host, bind in (("0.0.0.0", "*:8000"), ("::", "[::]:8000"), ("192.0.2.4", "192.0.2.4:8000")):
        out = harden(behind, host).splitlines()
        assert f"    bind {bind}" in out and "    bind 127.0.0.1:9101" in out


def test_a_wildcard_bind_keeps_ray_on_loopback_and_bounds_each_address(tmp_path):
    """``rbee serve --host 0.0.0.0`` without a token: it warns; only the HTTP port is open
    to the network; any IP literal of this machine is a Host it answers to, a name is not;
    one address of the network holds at most PER_SOURCE connections, and loopback still
    gets ``/health`` while it does."""
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    with serving(tmp_path, args=("--host", "0.0.0.0")) as served:
        port = int(served.url.rsplit(":", 1)[1])
        assert "no API token" in served.output()
        door = [("haproxy", "0.0.0.0", port)]

        def settled() -> tuple[list, list]:  # HAProxy is reloaded as the app comes up
            others, replica = _beyond_loopback(_listeners(served.process.pid))
            return [(n, a, p) for n, _, a, p in others] == door and (others, replica)

        _, replica = wait_for(settled, timeout=20, interval=0.5)
        assert len(replica) <= 1, replica
        there = f"http://{outside}:{port}"
        assert httpx.get(f"{there}/v1/jobs?limit=1", timeout=10).status_code == 200
        named = httpx.get(
            f"{there}/v1/jobs", headers={"Host": f"rbee-rebound.example:{port}"}, timeout=10
        )
        assert named.status_code == 403
        # HAProxy counts per process, and Ray starts a new one on each change of Serve's
        # targets (one or two follow a start): the flood goes to one HAProxy that has been
        # alone for a while, and that one answers the requests.
        haproxy = wait_for(lambda: _settled_haproxy(served.process.pid), timeout=60)
        began = time.monotonic()
        with _half_open(port, PER_SOURCE, source=outside):
            flood_s = time.monotonic() - began
            # Connected is not yet counted: HAProxy counts a connection when it takes it from
            # the listener's queue. One from loopback (never counted) is taken after every
            # flood connection queued before it; a probe from the address before that would
            # take a flood connection's place, and the flood would hold one less.
            assert _served(f"http://127.0.0.1:{port}/health")
            refused = 0
            for _ in range(20):
                try:
                    response = httpx.get(f"{there}/health", timeout=2, verify=False)
                    refused += response.status_code != 200
                except httpx.HTTPError:
                    refused += 1
            assert _haproxy_pids(served.process.pid) == haproxy  # (a reload counts anew)
            # that address has all it may hold
            assert refused == 20, f"{refused} of 20 refused; HAProxy {haproxy}, flood {flood_s:.1f}s"
            assert _health_s(served.url) < 1.0  # loopback is not counted with it

        def served_again() -> bool:
            try:
                return httpx.get(f"{there}/health", timeout=2, verify=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(served_again, timeout=10, interval=0.2)
