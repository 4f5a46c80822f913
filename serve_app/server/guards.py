"""Who may ask, decided at the door before any route runs (SPEC §7).

Nothing that reaches the socket is trusted because it reached it: a web page in the user's
own browser can send requests to 127.0.0.1. Two middlewares, with Starlette's
``CORSMiddleware`` between them for the origins the config allows (and for them alone):

- ``Door``: the client's address (a loopback server answers only its own machine), the
  ``Host`` (DNS rebinding: a name the server was not given is refused) and the ``Origin``
  (a page of another site is refused, whatever it sends). A request without ``Origin``
  (curl, the SDKs, the CLI) is served: browsers always send one across origins.
- ``Credentials``: the API token (every path but ``/health``; the page's files ask the
  browser for it as HTTP Basic's password, the API takes it as a Bearer token too) and the
  body's type (``application/json`` only: a form or ``text/plain`` post never makes a job).

Starlette's ``TrustedHostMiddleware`` is not used: it answers a plain-text 400 (SPEC §7
wants JSON 403), builds ``www.`` redirects from the Host it refuses, and has no notion of
loopback addresses or of a wildcard bind.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from actors.core.config import ServerConfig
from actors.core.errors import Forbidden, RbeeError, Unauthorized, UnsupportedMediaType
from serve_app.server.errors import Shape, response_for

log = logging.getLogger("rbee.http")

WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", ""})
"""Binds on every interface."""
PUBLIC_PATHS = frozenset({"/health"})
"""The paths that need no token."""
PAGE_PREFIXES = ("/ui/",)
PAGE_PATHS = frozenset({"/", "/sw.js"})
"""The web page's files: with a token set, the browser is asked for it (HTTP Basic)."""
BASIC_CHALLENGE = 'Basic realm="rbee", charset="UTF-8"'
_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE", "QUERY"})

# Matched with ``fullmatch``. A name (letters, digits, '-', '_', '.'), an IPv4 address or a
# bracketed IPv6 one, then an optional port; nothing else (no userinfo, no spaces, no path).
_HOST = re.compile(
    r"(?P<host>[a-z0-9_.-]{1,253}|\[(?P<ipv6>[0-9a-f:.]{2,45})\])(?::(?P<port>[0-9]{1,5}))?",
    re.ASCII | re.IGNORECASE,
)
_ORIGIN = re.compile(r"(?P<scheme>https?)://(?P<authority>[^/?#\s]+)", re.ASCII | re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_BEARER = re.compile(r"[ \t]*bearer[ \t]+([^ \t]+)[ \t]*", re.IGNORECASE | re.ASCII)
_BASIC = re.compile(r"[ \t]*basic[ \t]+([A-Za-z0-9+/]+={0,2})[ \t]*", re.IGNORECASE | re.ASCII)
_JSON_TYPE = re.compile(r"[ \t]*application/json[ \t]*(;.*)?", re.IGNORECASE | re.DOTALL)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, ``[::1]``, or a name) is this machine's loopback only."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower().rstrip(".") == "localhost":
        return True
    address = _address(host)
    return address is not None and address.is_loopback


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 (not loopback to Python before 3.13)
    return address


@dataclass(frozen=True, slots=True)
class Authority:
    """A parsed ``Host`` header (or an origin's host and port): lowercased, without a final
    dot, IPv6 without brackets; ``port`` None when not given."""

    host: str
    port: int | None

    @classmethod
    def parse(cls, value: str) -> Authority | None:
        found = _HOST.fullmatch(value)
        if found is None:
            return None
        host = (found["ipv6"] or found["host"]).lower().rstrip(".")
        if found["ipv6"] is not None and _address(host) is None:
            return None
        port = int(found["port"]) if found["port"] else None
        if not host or (port is not None and port > 65535):
            return None
        return cls(host, port)


@dataclass(frozen=True, slots=True)
class HostRule:
    """The Host names and addresses a server answers to, any port."""

    names: frozenset[str]
    domains: tuple[str, ...]  #: ``.example.com`` for ``*.example.com``
    any_address: bool  #: a wildcard bind: any IP literal (no DNS answer can make one)
    anything: bool  #: ``*``: the check is off

    @classmethod
    def of(cls, server: ServerConfig) -> HostRule:
        given = [*server.allowed_hosts]
        bind = server.host.strip().lower()
        wildcard = bind in WILDCARDS
        if not wildcard:
            given.append(bind.removeprefix("[").removesuffix("]").rstrip("."))
        names = {"localhost", "127.0.0.1", "::1"}
        domains = []
        for entry in given:
            if entry.startswith("*."):
                domains.append(entry[1:])
            else:
                address = _address(entry)
                names.add(str(address) if address is not None else entry)
        return cls(frozenset(names), tuple(domains), wildcard, "*" in given)

    def allows(self, host: str) -> bool:
        if self.anything or host in self.names or host.endswith(self.domains):
            return True
        address = _address(host)
        if address is None:
            return False
        return address.is_loopback or self.any_address or str(address) in self.names


class _Guard:
    """A middleware that lets a request through once ``check`` passes, and answers the error
    it raises (JSON, in the shape of the route's API: ``shapes`` by path, rbee's elsewhere)
    otherwise."""

    def __init__(
        self, app: ASGIApp, server: ServerConfig, shapes: Mapping[str, Shape] | None = None
    ) -> None:
        self.app = app
        self._shapes = dict(shapes or {})
        self.setup(server)

    def setup(self, server: ServerConfig) -> None:
        raise NotImplementedError

    def check(self, scope: Scope) -> None:
        raise NotImplementedError

    def challenge(self, path: str) -> str:
        """What a 401 asks for."""
        return "Bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self.check(scope)
        except RbeeError as exc:
            path = scope["path"]
            shape = self._shapes.get(path, "rbee")
            refusal = response_for(exc, shape, challenge=self.challenge(path))
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Door(_Guard):
    """The client's address, the Host and the Origin, before anything else."""

    def setup(self, server: ServerConfig) -> None:
        self._loopback_only = is_loopback(server.host)
        self._hosts = HostRule.of(server)
        self._origins = frozenset(server.allowed_origins)

    def check(self, scope: Scope) -> None:
        client = scope.get("client")
        if self._loopback_only and client and not is_loopback(str(client[0])):
            raise Forbidden(
                "this rbee server answers only its own machine (server.host is loopback)"
            )
        hosts = _values(scope, b"host")
        authority = Authority.parse(hosts[0]) if len(hosts) == 1 else None
        if authority is None or not self._hosts.allows(authority.host):
            shown = repr(hosts[0][:200]) if len(hosts) == 1 else f"of {len(hosts)} Host headers"
            log.info("refused a request for the Host %s", shown)
            raise Forbidden(
                f"this rbee server does not answer to the Host {shown}: a name it was not "
                "given may be a DNS-rebinding page; add it to server.allowed_hosts "
                "(RBEE_ALLOWED_HOSTS)"
            )
        origins = _values(scope, b"origin")
        if origins and not (len(origins) == 1 and self._origin_allowed(origins[0], authority)):
            log.info("refused a request from the origin %r", origins[0][:200])
            raise Forbidden(
                f"requests from the web origin {origins[0][:200]!r} are refused: add it to "
                "server.allowed_origins (RBEE_ALLOWED_ORIGINS) to let its pages use rbee"
            )

    def _origin_allowed(self, origin: str, authority: Authority) -> bool:
        """The server's own origin (the one the request is addressed to), or one the config
        allows. ``null`` (a sandboxed frame, a file, a redirect) is nobody's."""
        if origin.lower().rstrip("/") in self._origins:
            return True
        found = _ORIGIN.fullmatch(origin)
        theirs = Authority.parse(found["authority"]) if found else None
        if found is None or theirs is None:
            return False
        default = _DEFAULT_PORTS[found["scheme"].lower()]
        # A Host without a port is the default one of the scheme the client used.
        return theirs.host == authority.host and (theirs.port or default) == (
            authority.port or default
        )


class Credentials(_Guard):
    """The API token and the body's content type, for whoever got through the door."""

    def setup(self, server: ServerConfig) -> None:
        token = server.api_token
        self._token = token.get_secret_value().encode() if token else None

    def challenge(self, path: str) -> str:
        """The page's files ask the browser for the token (Basic, as the password)."""
        page = path in PAGE_PATHS or path.startswith(PAGE_PREFIXES)
        return BASIC_CHALLENGE if page else "Bearer"

    def check(self, scope: Scope) -> None:
        if self._token is not None and scope["path"] not in PUBLIC_PATHS:
            given = _values(scope, b"authorization")
            if len(given) != 1 or not self._matches(given[0]):
                raise Unauthorized(
                    "a valid 'Authorization: Bearer <token>' header is required (in a "
                    "browser: the token as the password, any user name)"
                )
        if scope["method"] in _CHANGING:
            _check_json(Headers(scope=scope))

    def _matches(self, header: str) -> bool:
        assert self._token is not None
        given = _token_of(header)
        return given is not None and hmac.compare_digest(given, self._token)


def _token_of(header: str) -> bytes | None:
    """The token of ``Bearer <token>`` (the scheme in any case, RFC 7235), or the password
    of ``Basic <base64 of user:password>``, as the bytes sent; None for anything else."""
    # Starlette decodes header values as latin-1: encoding back gives the very bytes sent.
    if found := _BEARER.fullmatch(header):
        return found.group(1).encode("latin-1")
    if found := _BASIC.fullmatch(header):
        try:
            pair = base64.b64decode(found.group(1), validate=True)
        except binascii.Error:
            return None
        _, colon, password = pair.partition(b":")
        return password if colon and password else None
    return None


def _check_json(headers: Headers) -> None:
    """A body must be JSON, and say so: a web page's form or ``text/plain`` post ("simple"
    requests, sent across sites without asking) never reaches a route. An empty body is
    nothing to read, whatever type it is given."""
    given = headers.getlist("content-type")
    sized = headers.get("content-length", "0").strip("0 ")
    bodyless = not headers.get("transfer-encoding") and not sized
    if bodyless:  # nothing is read, so nothing is made of it (aiohttp types an empty POST)
        return
    if given:
        if len(given) > 1 or not _JSON_TYPE.fullmatch(given[0]):
            raise UnsupportedMediaType(
                f"the body must be 'Content-Type: application/json', not {given[0][:100]!r}"
            )
    else:
        raise UnsupportedMediaType("a body needs 'Content-Type: application/json'")


def _values(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


def guarded(
    app: ASGIApp, server: ServerConfig, shapes: Mapping[str, Shape] | None = None
) -> ASGIApp:
    """``app`` behind the door, the allowed origins' CORS, and the credentials check."""
    app = Credentials(app, server, shapes)
    if server.allowed_origins:
        app = CORSMiddleware(
            app,
            allow_origins=server.allowed_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "last-event-id", "x-correlation-id"],
            expose_headers=["x-job-id", "x-correlation-id", "location"],
            allow_private_network=True,  # a page of the network's calling this machine
        )
    return Door(app, server, shapes)
