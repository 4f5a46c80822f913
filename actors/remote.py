"""Ray's ``remote`` for actor classes, and its node list, as a type checker sees them.

Ray types the keyword form of ``ray.remote`` for tasks only, and a class decorator does not
change what a type checker thinks the class is: ``@ray.remote(max_concurrency=...)`` on a
class hides its ``.options``. ``actor_class`` is the same call, typed as Ray types
``ray.remote(cls)``; the classes themselves stay plain (and usable without Ray).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import ray
from ray.actor import ActorClass

T = TypeVar("T")


def actor_class(cls: type[T], **options: Any) -> ActorClass[T]:
    """``ray.remote(**options)(cls)``."""
    decorate = cast(Callable[[type[T]], ActorClass[T]], ray.remote(**options))
    return decorate(cls)


def nodes() -> list[dict[str, Any]]:
    """Every node Ray knows of, alive or not (``ray.nodes``; it blocks on the GCS)."""
    found: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return found


def node_view(node: dict[str, Any]) -> dict[str, Any]:
    """What ``hive_status`` tells of a node from Ray's entry for it (``{}``: nothing known)."""
    resources = node.get("Resources", {})
    return {
        "address": node.get("NodeManagerAddress"),
        "alive": bool(node.get("Alive", True)),
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
        "memory_bytes": resources.get("memory", 0),
    }


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in nodes() if n.get("Alive")]
