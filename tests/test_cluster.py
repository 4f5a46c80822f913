"""rbee on a Ray cluster of many nodes (SPEC §9), built on this machine: a head and worker
nodes with fake GPUs and a cache folder each (``tests/cluster_host.py``), and ``rbee serve
--address`` joining it. A hive on every node, jobs routed by ``hive_id`` and to where the
model is, nodes that join and leave.

The cluster lives in a process of its own (this session's process is already a driver of
another Ray); only the processes these tests started are ever ended.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from actors.naming import hive_id_of
from tests.conftest import free_port
from tests.helpers import random_model, read_sse, submit, wait_for, wait_state
from tests.servers import alive, processes_of, serving

MiB = 1 << 20
NO_INFERENCE = importlib.util.find_spec("vllm") is None


@dataclass
class Nodes:
    process: subprocess.Popen[str]
    address: str
    caches: Path
    ids: dict[str, str]  #: node name -> node id ("head" included)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the cluster host died on {command!r}"
        return dict(json.loads(line))

    def add(self, name: str, gpus: int) -> str:
        self.ids[name] = self.ask(f"add {name} {gpus}")["node_id"]
        return self.ids[name]

    def remove(self, name: str) -> None:
        self.ask(f"remove {name}")

    def hive(self, name: str) -> str:
        return hive_id_of(self.ids[name])


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    """A head (no GPU) and nodes ``a`` and ``b`` with one fake GPU each."""
    root = Path(tempfile.mkdtemp(prefix="rbee-cluster-"))
    ray_dir = tempfile.mkdtemp(prefix="rbee-ray-", dir="/tmp")  # short: Ray's socket paths
    env = {  # a cluster of its own: none of the session's Ray or Serve settings
        **{k: v for k, v in os.environ.items() if not k.startswith(("RBEE_", "RAY_"))},
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": ray_dir,
    }
    host = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("cluster_host.py")), str(root / "caches")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert host.stdout is not None
    first = json.loads(host.stdout.readline())
    cluster = Nodes(host, first["address"], root / "caches", {"head": first["node_id"]})
    seen: dict[int, float] = {}
    try:
        cluster.add("a", 1)
        cluster.add("b", 1)
        seen |= processes_of(host.pid)
        yield cluster
    finally:
        seen |= processes_of(host.pid)
        try:
            cluster.ask("quit")
            host.wait(timeout=60)
        except Exception:
            pass
        for pid in alive(seen):  # whatever of ours is left
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        host.wait(timeout=30)
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def api(nodes: Nodes, hub, tmp_path_factory) -> Iterator[httpx.Client]:
    """``rbee serve --address`` joined to the cluster; the head keeps its own cache. Serve's
    proxy runs on the head only: the nodes share this machine, and proxies on each would
    share one port (SO_REUSEPORT), so a request could land on a node being removed."""
    folder = tmp_path_factory.mktemp("on-cluster")
    config = {
        "hub": {"endpoint": hub.url},
        "downloads": {"stall_s": 2.0},
        "server": {"proxy_location": "HeadOnly"},
    }
    with (
        serving(folder, nodes.caches / "head", args=("--address", nodes.address), **config) as on,
        httpx.Client(base_url=on.url, timeout=60) as client,
    ):
        yield client


def _run(api: httpx.Client, op: dict[str, Any], deadline_s: float = 120) -> dict[str, Any]:
    stream = read_sse(api, f"/v1/jobs/{submit(api, op)}/stream", deadline_s=deadline_s)
    assert stream.sentinel == "[DONE]", stream.events
    return dict(stream.of("result")[0])


def _hives(api: httpx.Client) -> dict[str, dict[str, Any]]:
    return {h["hive_id"]: h for h in _run(api, {"operation": "hive_list"})["hives"]}


def _cached(nodes: Nodes, name: str, repo: str) -> bool:
    return (nodes.caches / name / f"models--{repo.replace('/', '--')}" / "snapshots").is_dir()


def _repo(hub, size: int) -> str:
    return random_model(hub, size, "org/nodes")


def test_every_node_has_a_hive_with_its_resources_and_cache(api, nodes):
    hives = wait_for(lambda: len(h := _hives(api)) == 3 and h, timeout=60)
    assert set(hives) == {nodes.hive(n) for n in ("head", "a", "b")}
    for name, gpus in (("head", 0), ("a", 1), ("b", 1)):
        hive = hives[nodes.hive(name)]
        assert hive["node_id"] == nodes.ids[name] and hive["alive"] and hive["answered"]
        assert (hive["gpus"], hive["free_gpus"]) == (gpus, gpus)
        assert hive["cpus"] > 0 and hive["workers"] == [] and "gpu_memory" in hive
        assert Path(hive["cache_dir"]) == nodes.caches / name
    status = _run(api, {"operation": "hive_status", "hive_id": nodes.hive("b")})
    assert status["node_id"] == nodes.ids["b"]


def test_a_download_routed_by_hive_id_lands_in_that_nodes_cache(api, nodes, hub):
    repo = _repo(hub, MiB)
    done = _run(api, {"operation": "model_download", "model": repo, "hive_id": nodes.hive("b")})
    assert done["model"] == repo
    assert [_cached(nodes, n, repo) for n in ("head", "a", "b")] == [False, False, True]
    listed = _run(api, {"operation": "model_list", "hive_id": nodes.hive("b")})["models"]
    assert repo in [m["model"] for m in listed]
    nowhere = submit(api, {"operation": "model_list", "hive_id": "0" * 16})
    sentinel = read_sse(api, f"/v1/jobs/{nowhere}/stream").sentinel
    assert sentinel is not None and sentinel.startswith("[ERROR]") and "unknown hive" in sentinel


@pytest.mark.skipif(NO_INFERENCE, reason="needs vllm")
def test_infer_runs_where_the_model_is_and_downloads_go_where_a_gpu_is_free(
    api, nodes, hub, tiny_model
):
    a = nodes.hive("a")
    _run(api, {"operation": "model_download", "model": tiny_model, "hive_id": a})
    assert _cached(nodes, "a", tiny_model) and not _cached(nodes, "b", tiny_model)
    infer = {"operation": "infer", "model": tiny_model, "prompt": "Once upon a time there"}
    result = _run(api, {**infer, "max_tokens": 8, "ignore_eos": True}, deadline_s=300)
    assert result["usage"]["completion_tokens"] == 8
    hives = _hives(api)
    (worker,) = hives[a]["workers"]
    assert worker["worker_id"] == result["worker_id"] and worker["node_id"] == nodes.ids["a"]
    assert hives[a]["free_gpus"] == 0 and hives[nodes.hive("b")]["workers"] == []
    # A second request goes to the worker that is there: no new one anywhere.
    again = _run(api, {**infer, "max_tokens": 4})
    assert again["worker_id"] == worker["worker_id"]
    # a's GPU is taken: a model downloaded with no hive_id goes to b, which has one free.
    repo = _repo(hub, MiB)
    _run(api, {"operation": "model_download", "model": repo})
    assert [_cached(nodes, n, repo) for n in ("head", "a", "b")] == [False, False, True]
    stop = {"operation": "worker_stop", "worker_id": worker["worker_id"], "hive_id": a}
    _run(api, stop)
    assert _hives(api)[a]["workers"] == []


def test_a_node_that_joins_gets_its_hive(api, nodes):
    joined = hive_id_of(nodes.add("c", 0))
    hives = wait_for(lambda: joined in (h := _hives(api)) and h, timeout=60, interval=1)
    assert hives[joined]["node_id"] == nodes.ids["c"]


def test_a_node_that_leaves_fails_its_job_cleanly_and_leaves_hive_list(api, nodes, hub):
    hub.throttle_bps = MiB
    try:
        repo = _repo(hub, 16 * MiB)
        op = {"operation": "model_download", "model": repo, "hive_id": nodes.hive("b")}
        job_id = submit(api, op)
        wait_for(lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"], timeout=60)
        nodes.remove("b")
        failed = wait_state(api, job_id, "failed", timeout=60)
    finally:
        hub.throttle_bps = None
    assert failed["error"]["code"] == "WORKER_DIED", failed["error"]
    assert failed["error"]["retriable"] is True
    sentinel = read_sse(api, f"/v1/jobs/{job_id}/stream").sentinel
    assert sentinel is not None and sentinel.startswith("[ERROR]")
    gone = nodes.hive("b")
    hives = wait_for(lambda: gone not in (h := _hives(api)) and h, timeout=60, interval=1)
    assert nodes.hive("a") in hives
    running = api.get("/v1/jobs", params={"state": "running"}).json()["jobs"]
    assert running == []


# -- `ray start --head`, then `rbee serve --address auto` or `serve deploy` ------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def ray_started(cwd: Path, env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """``ray start --head`` in ``cwd`` (with ``env`` added), dashboard on a free port; the
    environment that finds it (``RAY_TMPDIR``: ``auto``; ``RAY_DASHBOARD``: its address).
    Everything it started is ended afterwards, and nothing else."""
    ray_dir = tempfile.mkdtemp(prefix="rbee-ray-", dir="/tmp")  # short: Ray's socket paths
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RBEE_", "RAY_"))}
    found = {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_dir}
    dashboard = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = [ray_cli, "start", "--head", f"--port={free_port()}", "--num-cpus=2"]
    head += [f"--dashboard-port={dashboard}", "--disable-usage-stats"]
    # In a session of its own: every process it leaves running (Ray's daemons, their agents
    # and workers) is found by that session and ended, and nothing else.
    starter = subprocess.Popen(
        head, env={**clean, **found, **(env or {})}, cwd=cwd, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, err = starter.communicate(timeout=180)
        assert starter.returncode == 0, err[-2000:]
        yield {**clean, **found, "RAY_DASHBOARD": f"http://127.0.0.1:{dashboard}"}
    finally:
        for pid in alive(processes_of(starter.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_rbee_serve_joins_a_ray_started_with_ray_start(tmp_path, hub):
    with ray_started(tmp_path) as ray_env:
        repo = _repo(hub, MiB)
        config = {"hub": {"endpoint": hub.url}}
        with (
            serving(
                tmp_path, args=("--address", "auto"), env={"RAY_TMPDIR": ray_env["RAY_TMPDIR"]},
                **config,
            ) as on,
            httpx.Client(base_url=on.url, timeout=60) as api,
        ):  # fmt: skip
            (hive,) = _hives(api).values()
            assert hive["answered"] and hive["cache_dir"] == str(tmp_path / "cache")
            assert _run(api, {"operation": "model_download", "model": repo})["model"] == repo
            assert "Connecting to existing Ray cluster" in on.output()


def _serve_yaml(tmp_path: Path) -> int:
    """``configs/serve.yaml`` as is but for a free port, at ``tmp_path/serve.yaml``; the port."""
    port = free_port()
    serve_yaml = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    assert serve_yaml["applications"][0]["args"]["config"] == "configs/rbee.yaml"
    serve_yaml["http_options"]["port"] = port
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_yaml))
    return port


def _serves_a_download(
    port: int, hub, cache: Path, still_up: Callable[[], None] = lambda: None
) -> None:
    """rbee on ``port`` comes up (``still_up`` checks what serves it meanwhile), downloads
    into ``cache`` and serves its page."""
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        still_up()
        try:
            return httpx.get(f"{url}/health", timeout=5, verify=False).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=120, interval=1)
    with httpx.Client(base_url=url, timeout=60) as api:
        repo = _repo(hub, MiB)
        assert _run(api, {"operation": "model_download", "model": repo})["model"] == repo
        assert (cache / f"models--{repo.replace('/', '--')}").is_dir()
        assert api.get("/").status_code == 200


def test_serve_deploy_of_configs_serve_yaml_on_a_ray_started_elsewhere(tmp_path, hub):
    """The documented ``serve deploy configs/serve.yaml``, to a Ray started in another
    folder: rbee's config (``args.config: configs/rbee.yaml``) is found in its checkout, and
    the RBEE_* env vars given to ``ray start`` apply."""
    started_in = tmp_path / "elsewhere"
    started_in.mkdir()
    port = _serve_yaml(tmp_path)
    rbee_env = {
        "RBEE_HUB_ENDPOINT": hub.url,
        "RBEE_CACHE_DIR": str(tmp_path / "cache"),
        "RBEE_STATE_DIR": str(tmp_path / "state"),
    }
    with ray_started(started_in, rbee_env) as ray_env:
        serve_cli = str(Path(sys.executable).with_name("serve"))
        deploy = [serve_cli, "deploy", str(tmp_path / "serve.yaml"), "-a", ray_env["RAY_DASHBOARD"]]
        deployed = subprocess.run(
            deploy, env=ray_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
        )
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        _serves_a_download(port, hub, tmp_path / "cache")


def test_serve_run_of_configs_serve_yaml(tmp_path, hub):
    """The documented ``serve run configs/serve.yaml``: Ray's own tooling starts a Ray of
    its own and rbee on it, with the RBEE_* env vars of its shell."""
    port = _serve_yaml(tmp_path)
    ray_dir = tempfile.mkdtemp(prefix="rbee-ray-", dir="/tmp")  # short: Ray's socket paths
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RBEE_", "RAY_"))},
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": ray_dir,
        "RBEE_HUB_ENDPOINT": hub.url,
        "RBEE_CACHE_DIR": str(tmp_path / "cache"),
        "RBEE_STATE_DIR": str(tmp_path / "state"),
    }
    serve_cli = str(Path(sys.executable).with_name("serve"))
    log = (tmp_path / "serve-run.log").open("wb")
    running = subprocess.Popen(
        [serve_cli, "run", str(tmp_path / "serve.yaml")], env=env, cwd=REPO_ROOT,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    seen: dict[int, float] = {}
    try:

        def up() -> None:
            assert running.poll() is None, (tmp_path / "serve-run.log").read_text()[-3000:]
            seen.update(processes_of(running.pid))

        _serves_a_download(port, hub, tmp_path / "cache", up)
    finally:
        seen.update(processes_of(running.pid))
        for pid in alive(seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        running.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_a_config_file_is_found_where_ray_started_then_in_the_checkout(tmp_path):
    from serve_app.server.deployment import config_file

    assert config_file("configs/rbee.yaml", tmp_path) == REPO_ROOT / "configs" / "rbee.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rbee.yaml").write_text("{}")
    assert config_file("configs/rbee.yaml", tmp_path) == tmp_path / "configs" / "rbee.yaml"
    assert config_file(str(tmp_path / "x.yaml"), REPO_ROOT) == tmp_path / "x.yaml"
    with pytest.raises(FileNotFoundError, match="absolute path"):
        config_file("configs/nope.yaml", tmp_path)
