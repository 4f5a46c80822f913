"""Names of rbee's actors in the Ray namespace ``rbee`` (the dashboard shows these)."""

NAMESPACE = "rbee"
REGISTRY = "rbee:registry"


def hive_id_of(node_id: str) -> str:
    return node_id[:16]


def hive_name(hive_id: str) -> str:
    return f"rbee:hive:{hive_id}"


def download_name(hive_id: str) -> str:
    return f"rbee:download:{hive_id}"


def worker_name(worker_id: str) -> str:
    return f"rbee:worker:{worker_id}"
