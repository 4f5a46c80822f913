"""A pytest plugin for vLLM's own test suite (``bench/vllm_suite.py``): its
``RemoteOpenAIServer`` starts no server but points at the one running at ``$SUITE_URL``.

Loaded with ``-p _vllm_suite_plugin`` before vLLM's tests are imported, so their
``from tests.utils import RemoteOpenAIServer`` reads this one. A test's server arguments are
kept on the object (``args``) but not applied: both servers run with the same settings.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import tests.utils as vllm_test_utils


class PointedServer(vllm_test_utils.RemoteOpenAIServer):  # type: ignore[misc]
    """The running server, with the clients and URLs of vLLM's test helper."""

    def __init__(self, model: str, vllm_serve_args: list[str], *_: Any, **__: Any) -> None:
        url = urlsplit(os.environ["SUITE_URL"])
        self.host, self.port, self.uds = url.hostname, url.port, None
        self.model, self.args = model, vllm_serve_args
        self.proc = None

    def __enter__(self) -> PointedServer:
        return self

    def __exit__(self, *_: Any) -> None:
        return None


vllm_test_utils.RemoteOpenAIServer = PointedServer
vllm_test_utils.RemoteVLLMServer = PointedServer
