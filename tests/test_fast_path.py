"""Ray Serve's fast path (``serve_app.server.fast_path``): HAProxy in front of a replica that serves
HTTP itself, set up per server, answering only this machine when it listens on loopback."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from actors.core.config import Config
from serve_app.server.fast_path import (
    WRAPPER,
    FastPath,
    fast_path,
    haproxy_binary,
    sweep_leftovers,
    wrapper_path,
)
from tests.helpers import outside_address

RAY_VARS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_SOCKET_PATH")


def test_the_session_server_runs_haproxy_without_splicing(hive):
    assert hive.ingress == "haproxy"
    ours = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "haproxy"]
    mine = [p for p in ours if os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"].rsplit("/", 1)[0] in " ".join(p.info["cmdline"])]
    assert mine, [p.info["cmdline"] for p in ours]
    assert all("-dS" in p.info["cmdline"] for p in mine)


def test_the_session_server_was_up_once_haproxy_sent_straight_to_the_replica(hive):
    """Start-up waits for HAProxy to know the ingress replica (the first answers come
    through Serve's fallback proxy, and Ray then reloads HAProxy)."""
    workdir = Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert FastPath(workdir).direct()
    assert not FastPath(workdir / "none").direct()


def test_a_killed_servers_folder_is_removed_by_the_next_one():
    with fast_path("haproxy"):
        workdir = Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
        gone = subprocess.Popen(["true"])
        gone.wait()
        left = Path(str(workdir) + "-left")
        left.mkdir()
        (left / "rbee-owner").write_text(f"{gone.pid} 1")  # a process that is no more
        stranger = Path(str(workdir) + "-stranger")
        stranger.mkdir()  # not a server's folder: no owner named
        try:
            assert sweep_leftovers() == [left]
            assert workdir.is_dir() and stranger.is_dir() and not left.exists()
        finally:
            stranger.rmdir()


def test_the_replica_port_answers_only_this_machine(api, hive):
    """Under HAProxy the replica serves HTTP on a port of its own, which Ray may open on
    every interface: a loopback server refuses any client that is not this machine's
    loopback (403, if the connection is taken at all), and still answers through HAProxy."""
    assert api.get("/health").status_code == 200
    low, high = (int(os.environ[f"RAY_SERVE_DIRECT_INGRESS_{e}_HTTP_PORT"]) for e in ("MIN", "MAX"))
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    ports = sorted(p for p in range(low, high) if p in listening)
    assert ports, "the ingress replica listens on none of its ports"
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    try:
        answer = httpx.get(f"http://{outside}:{ports[0]}/health", timeout=10)
    except httpx.ConnectError:
        pass  # Ray bound it to loopback, as the server is
    else:
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "FORBIDDEN"
    assert httpx.get(f"http://127.0.0.1:{ports[0]}/health", timeout=10).status_code == 200




def test_the_wrapper_finds_the_real_haproxy_even_when_ray_points_at_it():
    """Ray's lookup (``RAY_SERVE_HAPROXY_BINARY_PATH``) names the wrapper: the wrapper must
    not find itself again (it would exec itself for ever)."""
    wrapper = wrapper_path()
    assert wrapper is not None and Path(wrapper).name == WRAPPER
    env = {k: v for k, v in os.environ.items() if k != "RBEE_HAPROXY_BINARY"}
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
    done = subprocess.run([wrapper, "-v"], env=env, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and "HAProxy version" in done.stdout, done


def test_fast_path_sets_this_instances_environment_and_restores_it():
    assert haproxy_binary() is not None
    before = {k: os.environ.get(k) for k in RAY_VARS}
    with fast_path("proxy") as on:
        assert on is None
        assert {k: os.environ.get(k) for k in RAY_VARS} == before
    with fast_path("haproxy") as on, fast_path("haproxy") as other:
        assert on and other
        workdir = Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
        assert workdir.is_dir() and os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert {k: os.environ.get(k) for k in RAY_VARS} == before
    assert not workdir.exists()


def test_the_ingress_setting():
    assert Config.load(env={}).server.ingress == "haproxy"
    assert Config.load(env={"RBEE_INGRESS": "proxy"}).server.ingress == "proxy"
    with pytest.raises(ValueError):
        Config.load(env={"RBEE_INGRESS": "nginx"})


def test_two_instances_get_their_own_files_and_ports():
    seen = []
    for _ in range(2):
        with fast_path("haproxy"):
            seen.append({k: os.environ[k] for k in os.environ if k.startswith("RAY_SERVE_")})
    assert seen[0]["RAY_SERVE_HAPROXY_SOCKET_PATH"] != seen[1]["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    # Every file Ray's HAProxy would put under its fixed /tmp/haproxy-serve goes in the
    # instance's own folder (removed with it): none is left behind or shared.
    import ray.serve._private.constants as serve_constants

    source = Path(inspect.getsourcefile(serve_constants) or "").read_text()
    fixed = set(re.findall(r'"(RAY_SERVE_[A-Z_]+)",\s*"/tmp/haproxy-serve', source))
    assert "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH" in fixed
    for env in seen:
        workdir = Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
        assert all(Path(env[name]).is_relative_to(workdir) for name in fixed), fixed - set(env)
    for env in seen:  # never Ray's fixed 8404, 9101, 30000, nor the ephemeral range
        ports = [int(env[k]) for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                                       "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT",
                                       "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")]  # fmt: skip
        assert len(set(ports)) == 6 and all(20_000 <= p < 30_000 for p in ports)


def test_two_servers_never_hold_the_same_ports():
    from serve_app.server.fast_path import BLOCK, reserve_ports

    with reserve_ports() as first, reserve_ports() as second:
        assert abs(first - second) >= BLOCK
        # a held block stays held: every later reservation lands elsewhere
        for _ in range(20):
            with reserve_ports() as other:
                assert abs(other - first) >= BLOCK and abs(other - second) >= BLOCK


def test_a_loopback_server_refuses_other_machines_and_a_public_one_does_not():
    from starlette.testclient import TestClient

    from serve_app.server.app import build_app

    here = "http://127.0.0.1"
    loopback = build_app(Config.load(env={}), registry=None)
    with TestClient(loopback, base_url=here, client=("192.0.2.9", 4000)) as outside:
        refused = outside.get("/v1/jobs")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"
    for address in ("127.0.0.1", "::1", "127.8.9.10"):
        with TestClient(loopback, base_url=here, client=(address, 4000)) as inside:
            assert inside.get("/nope").status_code == 404
    public = build_app(Config.load(env={}, server__host="0.0.0.0", server__api_token="t"), None)
    with TestClient(public, base_url=here, client=("192.0.2.9", 4000)) as outside:
        assert outside.get("/nope", headers={"Authorization": "Bearer t"}).status_code == 404


def test_headers_over_the_fronts_limit_are_a_400_and_the_server_goes_on(api):
    """HAProxy takes 16 KiB of request headers (its buffer); beyond, it answers 400 itself."""
    big = api.post("/v1/jobs", json={"operation": "hive_list"}, headers={"X-Pad": "9" * 17_000})
    assert big.status_code == 400
    assert api.post("/v1/jobs", json={"operation": "hive_list"}).status_code == 201
