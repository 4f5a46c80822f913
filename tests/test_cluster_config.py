"""cluster.yaml passes the checks `ray up` makes before it calls AWS, and the Grafana
dashboard shows rbee's metrics: no Ray started, no network."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
DASHBOARD = ROOT / "configs" / "grafana" / "rbee.json"

# rbee's metrics as Ray's Prometheus exporter names them (Ray adds the `ray_` prefix).
METRICS = {
    "ray_rbee_jobs_total",
    "ray_rbee_jobs_current",
    "ray_rbee_queue_depth",
    "ray_rbee_cancel_latency_s",
    "ray_rbee_download_bytes_total",
    "ray_rbee_download_rate_bps",
    "ray_rbee_tokens_total",
    "ray_rbee_workers",
}

INSTALL = re.compile(r"\bpip install -e '\.\[(\w+)\]'")


def load_cluster() -> dict[str, Any]:
    config = yaml.safe_load(CLUSTER.read_text())
    assert isinstance(config, dict)
    return config


def launcher_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to the file before it talks to the cloud (commands._bootstrap_config):
    merge the provider's defaults, then validate against ray-schema.json and its own rules.
    (In between it asks AWS for the instance types' resources; ours are declared.)"""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict[str, Any]:
    return launcher_checks(load_cluster())


def setup_of(prepared: dict[str, Any], node_type: str) -> list[str]:
    """The setup commands a node of this type runs, chosen as the launcher chooses them."""
    if node_type == prepared["head_node_type"]:
        return list(prepared["head_setup_commands"])  # setup_commands + head_setup_commands
    spec = prepared["available_node_types"][node_type]
    return list(spec.get("worker_setup_commands", prepared["worker_setup_commands"]))


def start_command(commands: list[str]) -> str:
    [start] = [c for c in commands if re.search(r"\bray start\b", c)]
    return start


def test_cluster_yaml_passes_the_launchers_validation(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_every_node_type_installs_rbee(prepared: dict[str, Any]) -> None:
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for node_type in prepared["available_node_types"]:
        installs = [m.group(1) for c in setup_of(prepared, node_type) for m in INSTALL.finditer(c)]
        assert installs, f"{node_type}: no `pip install -e '.[extra]'` in its setup"
        assert set(installs) <= extras, f"{node_type}: unknown extra in {installs}"
        setup = " ; ".join(setup_of(prepared, node_type))
        assert "venv" in setup, f"{node_type}: no venv is created"
    gpu_types = [t for t in prepared["available_node_types"] if t != prepared["head_node_type"]]
    for node_type in gpu_types:
        installs = [m.group(1) for c in setup_of(prepared, node_type) for m in INSTALL.finditer(c)]
        assert "gpu" in installs, f"{node_type}: the official vllm (the gpu extra) is not installed"


def test_the_repo_is_copied_but_not_the_local_venv(prepared: dict[str, Any]) -> None:
    assert "." in prepared["file_mounts"].values()
    assert ".venv" in prepared["rsync_exclude"]


def test_head_starts_ray_with_serves_fast_path_and_the_autoscaler(prepared: dict[str, Any]) -> None:
    start = start_command(prepared["head_start_ray_commands"])
    # env assignments are in the same command, before `ray start`
    before = start[: start.index("ray start")]
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in before
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in before
    for flag in (
        "--head",
        "--port=6379",
        "--dashboard-host=0.0.0.0",
        "--metrics-export-port=8080",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
    ):
        assert flag in start.split(), flag


def test_workers_join_the_head(prepared: dict[str, Any]) -> None:
    start = start_command(prepared["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in start.split()
    assert "--metrics-export-port=8080" in start.split()
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in start[: start.index("ray start")]


def test_gpu_workers_autoscale(prepared: dict[str, Any]) -> None:
    workers = {
        name: spec
        for name, spec in prepared["available_node_types"].items()
        if name != prepared["head_node_type"]
    }
    gpu = {
        name: spec
        for name, spec in workers.items()
        if spec["resources"].get("GPU", 0) >= 1
        or re.match(r"(g|p)\d", spec["node_config"]["InstanceType"])
    }
    assert gpu, "no worker type with GPUs"
    for name, spec in gpu.items():
        assert spec["max_workers"] > spec["min_workers"], name
        assert spec["max_workers"] <= prepared["max_workers"], name
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])


def _set(path: tuple[str, ...], value: Any) -> Any:
    def breaking(config: dict[str, Any]) -> None:
        *parents, last = path
        node = config
        for key in parents:
            node = node[key]
        node[last] = value

    return breaking


@pytest.mark.parametrize(
    ("breaking", "error", "message"),
    [
        pytest.param(
            _set(("max_worker",), 4),
            jsonschema.ValidationError,
            r"'max_worker' was unexpected",
            id="unknown-top-level-key",
        ),
        pytest.param(
            _set(("max_workers",), "many"),
            jsonschema.ValidationError,
            r"'many' is not of type 'integer'",
            id="max_workers-not-an-integer",
        ),
        pytest.param(
            _set(("available_node_types", "gpu_worker", "resources", "GPU"), "1"),
            jsonschema.ValidationError,
            r"'1' is not of type 'integer'",
            id="resource-not-an-integer",
        ),
        pytest.param(
            _set(("available_node_types", "gpu_worker", "min_worker"), 1),
            jsonschema.ValidationError,
            r"'min_worker' was unexpected",
            id="unknown-node-type-key",
        ),
        pytest.param(
            _set(("worker_start_ray_commands",), [["ray", "start"]]),
            jsonschema.ValidationError,
            r"is not of type 'string'",
            id="command-not-a-string",
        ),
        pytest.param(
            _set(("head_node_type",), "cpu_head"),
            ValueError,
            r"`head_node_type` must be one of `available_node_types`",
            id="unknown-head-type",
        ),
        pytest.param(
            _set(("available_node_types", "gpu_worker", "min_workers"), 5),
            ValueError,
            r"global `max_workers` is smaller than the sum of `min_workers`",
            id="min_workers-above-max_workers",
        ),
    ],
)
def test_a_broken_config_is_refused(breaking: Any, error: type[Exception], message: str) -> None:
    config = load_cluster()
    launcher_checks(copy.deepcopy(config))  # unbroken, it passes
    breaking(config)
    with pytest.raises(error, match=message):
        launcher_checks(config)


# --- Grafana ---------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def metrics_in(expr: str) -> set[str]:
    return {
        re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"ray_rbee_[a-z_]+", expr)
    }


def test_dashboard_is_rbees_and_picks_a_prometheus() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "rbee"
    assert dashboard["title"] == "rbee"
    assert dashboard["schemaVersion"] >= 36
    [datasource] = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"


def test_every_panel_is_placed_titled_and_uses_the_datasource_variable() -> None:
    panels = panels_of(load_dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in panels:
        assert panel.get("title"), panel["id"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        for holder in [panel, *panel["targets"]]:
            datasource = holder["datasource"]
            uid = datasource["uid"] if isinstance(datasource, dict) else datasource
            assert uid == "${datasource}", panel["title"]


def test_dashboard_shows_exactly_rbees_metrics() -> None:
    shown: set[str] = set()
    for panel in panels_of(load_dashboard()):
        for target in panel.get("targets", []):
            named = metrics_in(target["expr"])
            assert named, f"{panel['title']}: {target['expr']} names no rbee metric"
            assert named <= METRICS, f"{panel['title']}: unknown {named - METRICS}"
            for counter in (n for n in named if n.endswith("_total")):
                assert re.search(rf"(rate|increase)\(\s*{counter}\b", target["expr"]), counter
            if "_bucket" in target["expr"]:
                assert "histogram_quantile(" in target["expr"] and re.search(
                    r"\ble\b", target["expr"]
                )
            shown |= named
    assert shown == METRICS, f"not on any panel: {METRICS - shown}"
