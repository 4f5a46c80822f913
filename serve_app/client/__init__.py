"""The client side: the Python client of rbee's HTTP API (``api``), the ``rbee`` command
(``cli``) and its rendering (``render``). Nothing here imports Ray or the server."""

from serve_app.client.api import (
    DEFAULT_URL,
    AsyncClient,
    Client,
    ServerError,
    ServerUnavailable,
    StreamEvent,
    error_class,
    operation,
    parse_event,
    to_error,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "Client",
    "ServerError",
    "ServerUnavailable",
    "StreamEvent",
    "error_class",
    "operation",
    "parse_event",
    "to_error",
]
