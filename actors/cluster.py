"""Bring rbee's actors up on a Ray cluster (idempotent: get them if they exist)."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.core.config import Config
from actors.download_actor import DownloadActor
from actors.hive import Hive
from actors.naming import NAMESPACE, REGISTRY, download_name, hive_id_of, hive_name
from actors.registry import JobRegistry
from actors.remote import actor_class, alive_nodes

# Each of these waits on I/O (num_cpus=0: the engines own the cores) with many calls in flight.
HIVE = actor_class(Hive, num_cpus=0, max_concurrency=1000)
DOWNLOADS = actor_class(DownloadActor, num_cpus=0, max_concurrency=1000)
JOBS = actor_class(JobRegistry, num_cpus=0, max_concurrency=10_000)
ON_HEAD = {"node:__internal_head__": 0.001}
"""Ray's own resource of the head node: what must outlive any other node runs there."""


def ensure_cluster(config: Config) -> Any:
    """Start (or find) the registry and a hive with its download actor on every alive node."""
    ensure_hives(config, [node["NodeID"] for node in alive_nodes()])
    registry: Any = JOBS.options(
        name=REGISTRY,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,  # comes back with the jobs it saved under state_dir
        resources=ON_HEAD,  # where state_dir is: a node that leaves never takes it along
    ).remote(config)
    ray.get(registry.ready.remote())
    return registry


def ensure_hives(config: Config, node_ids: list[str]) -> None:
    """Start (or find) a hive and its download actor on each of these nodes."""
    common = {
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,  # a crashed hive comes back; its jobs fail as WORKER_DIED
    }
    for node_id in node_ids:
        hive_id = hive_id_of(node_id)
        on_node = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        HIVE.options(name=hive_name(hive_id), scheduling_strategy=on_node, **common).remote(
            config, hive_id, node_id
        )
        DOWNLOADS.options(
            name=download_name(hive_id), scheduling_strategy=on_node, **common
        ).remote(config, hive_id)


def shutdown_cluster() -> None:
    """Stop the engines, then kill rbee's detached actors (the registry first)."""
    names = [REGISTRY]
    hives = []
    for node in alive_nodes():
        hive_id = hive_id_of(node["NodeID"])
        names += [hive_name(hive_id), download_name(hive_id)]
        try:
            hives.append(ray.get_actor(hive_name(hive_id), namespace=NAMESPACE))
        except ValueError:
            pass
    try:
        ray.get([h.stop_workers.remote() for h in hives], timeout=60)
    except Exception:  # a dead hive has no engines left to stop
        pass
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            pass
