"""The client side: the Python client of rbee's HTTP API (``api``), the ``rbee`` command
(``cli``) and its rendering (``render``). Nothing here imports Ray or the server."""

from serve_app.client.api import DEFAULT_URL as DEFAULT_URL
from serve_app.client.api import AsyncClient as AsyncClient
from serve_app.client.api import Client as Client
from serve_app.client.api import ServerError as ServerError
from serve_app.client.api import ServerUnavailable as ServerUnavailable
from serve_app.client.api import StreamEvent as StreamEvent
from serve_app.client.api import error_class as error_class
from serve_app.client.api import operation as operation
from serve_app.client.api import parse_event as parse_event
from serve_app.client.api import to_error as to_error
