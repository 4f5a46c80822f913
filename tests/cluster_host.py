"""A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), run as a process of
its own (the test session's process is already a driver of another Ray).

Reads commands on stdin, one per line, and answers each with one JSON line on stdout:
``add <name> <gpus>`` starts a node (fake GPUs, its own ``RBEE_NODE_CACHE_DIR`` under the
folder given as argv[1]) and answers ``{"node_id"}``; ``remove <name>`` kills that node's
processes; ``quit`` stops the cluster. The first line out is ``{"address"}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ray.cluster_utils import Cluster

# Nodes that die are noticed in about a second rather than Ray's usual 15+.
FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 250,
    "health_check_failure_threshold": 4,
    "metrics_report_interval_ms": 1000,
}


def main() -> None:
    caches = Path(sys.argv[1])
    head = {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = {}
    say({"address": cluster.address, "node_id": cluster.head_node.node_id})
    try:
        for line in sys.stdin:
            verb, *args = line.split()
            if verb == "add":
                name, gpus = args[0], int(args[1])
                env = {"RBEE_NODE_CACHE_DIR": str(caches / name)}
                node = nodes[name] = cluster.add_node(num_cpus=1, num_gpus=gpus, env_vars=env)
                say({"node_id": node.node_id})
            elif verb == "remove":
                cluster.remove_node(nodes.pop(args[0]), allow_graceful=False)
                say({"removed": args[0]})
            elif verb == "quit":
                break
    finally:
        cluster.shutdown()


def say(answer: dict[str, str]) -> None:
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
