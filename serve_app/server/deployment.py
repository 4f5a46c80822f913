"""The Ray Serve deployment that hosts the Starlette ingress.

``serve run configs/serve.yaml`` imports ``serve_app.server.deployment:app_builder``; ``rbee serve``
binds ``INGRESS`` itself. Either way the replica brings up (or finds) rbee's actors.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from actors.cluster import ensure_cluster
from actors.config import Config
from serve_app.server.app import build_app

APP_NAME = "rbee"


class Ingress:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._registry = ensure_cluster(config)

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self._config, self._registry)


# Serve's decorators, applied as calls: a class decorator does not change what a type
# checker thinks the class is, and ``INGRESS.bind`` is what Serve adds.
INGRESS = serve.deployment(
    name="rbee-ingress",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=10_000,
)(serve.ingress()(Ingress))


def app_builder(args: dict[str, Any]) -> Application:
    """Builder for ``serve run``/``serve deploy``: ``args`` may name a ``config`` file."""
    return INGRESS.bind(Config.load(args.get("config")))
