"""The door (``serve_app.server.guards``), tried as a web page on another site and as a
DNS-rebinding page would send, against the session's real server behind HAProxy: a foreign
Host on every route, a foreign Origin with every content type on every route that changes
something, ids that would forge log lines, and the origins the config allows (CORS)."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from actors.core import logs
from actors.core.config import Config
from actors.core.table import new_job_id
from actors.registry_client import Registry
from serve_app.server.app import Api, build_app
from serve_app.server.guards import Authority, HostRule
from serve_app.server.jobstream import JobStream
from tests.helpers import job, random_model, submit, wait_for, wait_state

FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:{port}",
    "localhost.evil.example",
    "127.0.0.1.nip.io.evil.example:{port}",
    "localhost.:{port}.evil",
    "127.0.0.2.evil.example",
    "0x7f.0.0.1",
    "2130706433",
    "",
    "localhost:{port}:80",
    "[::1",
    "[fe80::1]:{port}",
    "10.0.0.1",
    "localhost:99999",
]
OWN_HOSTS = ["localhost", "localhost:{port}", "LOCALHOST.:{port}", "127.0.0.1:{port}", "[::1]:{port}", "127.5.6.7"]
FOREIGN_ORIGINS = [
    "http://evil.example",
    "https://evil.example",
    "null",
    "http://localhost:{other}",  # another port of this machine: another site
    "http://127.0.0.1.evil.example:{port}",
    "http://localhost:{port}/path",
    "file://",
    "http://localhost:{port}, http://evil.example",
]
CONTENT_TYPES = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json",
    None,
]
# What each route that changes something would get from a page, as harmless as can be.
BODIES: dict[str, Any] = {
    "/v1/jobs": {"operation": "model_download", "model": "fuzz/csrf"},
    "/v1/jobs/cancel": {"state": "running"},
    "/cancel": {"job_id": "{job}"},
    "/v1/completions": {"model": "fuzz/none", "prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"model": "fuzz/none", "messages": [{"role": "user", "content": "hi"}]},
}


def _routes() -> list[tuple[str, str]]:
    """(method, path template) of every route the app has, the page's files included."""
    out = []
    config = Config.load(env={})
    for route in Api(config, JobStream(config, Registry(None))).routes():
        if isinstance(route, Mount):
            out += [("GET", f"{route.path}/app.js"), ("HEAD", f"{route.path}/app.css")]
        else:
            assert isinstance(route, Route)
            out += [(method, route.path) for method in sorted(route.methods or ())]
    return out


ROUTES = _routes()
CHANGING = [(m, p) for m, p in ROUTES if m in ("POST", "DELETE")]
STREAMS = [("GET", "/v1/jobs/{job_id:job}/stream"), ("GET", "/v1/jobs/watch")]


@pytest.fixture
def done(finished_job) -> str:
    return finished_job


def _port(hive) -> int:
    return int(hive.url.rsplit(":", 1)[1])


def _fill(template: str, job_id: str) -> str:
    filled = template.replace("{job_id:job}", job_id).replace("{response_id}", job_id)
    return filled.replace("{job_id:rest}", "not-a-job")


def _body(path: str, job_id: str) -> bytes | None:
    body = BODIES.get(path)
    return None if body is None else json.dumps(body).replace("{job}", job_id).encode()


def _send(hive, method: str, path: str, headers: dict[str, str], body: bytes | None = None):
    with httpx.Client(base_url=hive.url, timeout=httpx.Timeout(30.0, read=10.0), verify=False) as client:
        with client.stream(method, path, headers=headers, content=body) as response:
            response.read()
            return response


def _refused(response: httpx.Response, status: int = 403) -> dict[str, Any]:
    assert response.status_code == status, (response.request.method, response.request.url, response.text)
    assert "access-control-allow-origin" not in response.headers
    if response.request.method == "HEAD":
        return {}
    return dict(response.json()["error"])


def test_a_foreign_host_is_refused_on_every_route_before_it_runs(hive, api, done):
    """DNS rebinding: a page on a name that resolves to 127.0.0.1 sends its own name as the
    Host. Every route answers 403 JSON and does nothing (no job is made or cancelled)."""
    port, seen = _port(hive), 0
    before = api.get("/v1/jobs", params={"limit": 10_000}).json()["jobs"]
    for method, template in ROUTES:
        path = _fill(template, done)
        for host in FOREIGN_HOSTS:
            headers = {"Host": host.format(port=port), "Content-Type": "application/json"}
            response = _send(hive, method, path, headers, _body(template, done))
            if response.status_code == 400 and "text/html" in response.headers.get("content-type", ""):
                continue  # HAProxy's own answer to a Host no HTTP/1.1 request may carry
            error = _refused(response)
            if method != "HEAD":  # (vLLM's routes answer in vLLM's shape: code is the status;
                # Anthropic's in Anthropic's: a type, no code)
                assert error["message"], error
                assert error.get("code", error.get("type")) in ("FORBIDDEN", 403, "permission_error")
            seen += 1
    assert seen >= len(ROUTES) * (len(FOREIGN_HOSTS) - 4)
    after = api.get("/v1/jobs", params={"limit": 10_000}).json()["jobs"]
    assert [j["job_id"] for j in after] == [j["job_id"] for j in before]
    assert [j["state"] for j in after] == [j["state"] for j in before]


@pytest.mark.parametrize("host", OWN_HOSTS)
def test_loopback_names_and_addresses_are_served_on_any_port(hive, host):
    response = _send(hive, "GET", "/v1/jobs?limit=1", {"Host": host.format(port=_port(hive))})
    assert response.status_code == 200, response.text


def test_a_request_without_a_host_is_refused(hive):
    """HTTP/1.0 may leave Host out; no browser does, and nothing names the server then."""
    import socket

    with socket.create_connection(("127.0.0.1", _port(hive)), timeout=10) as s:
        s.sendall(b"GET /v1/jobs HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403"), head
    assert json.loads(body)["error"]["code"] == "FORBIDDEN"


@pytest.fixture
def victim(api, hub) -> Iterator[str]:
    """A download that runs through the test (a slow hub): what a forged cancel would stop."""
    hub.throttle_bps = 128 << 10  # per connection: at most 0.5 MiB/s in 4 ranges, for 64 s
    job_id = submit(api, {"operation": "model_download", "model": random_model(hub, 32 << 20)})
    wait_state(api, job_id, "running")
    try:
        yield job_id
    finally:
        hub.throttle_bps = None
        api.delete(f"/v1/jobs/{job_id}")


def test_a_foreign_origin_is_refused_with_any_body_on_every_changing_route(hive, api, done, victim):
    """A page of another site can post a form or ``text/plain`` without asking first: every
    route that changes something refuses its Origin (403), whatever the body's type, and
    nothing happens: no job is made, the running download is not cancelled."""
    port, other, running = _port(hive), _port(hive) + 1, victim
    before = api.get("/v1/jobs", params={"limit": 10_000}).json()["jobs"]
    for method, template in CHANGING:
        path = _fill(template, new_job_id() if template.endswith("}") else done)
        for origin in FOREIGN_ORIGINS:
            for kind in CONTENT_TYPES:
                headers = {"Origin": origin.format(port=port, other=other)}
                if kind:
                    headers["Content-Type"] = kind
                _refused(_send(hive, method, path, headers, _body(template, running)))
    after = api.get("/v1/jobs", params={"limit": 10_000}).json()["jobs"]
    assert [(j["job_id"], j["state"]) for j in after] == [(j["job_id"], j["state"]) for j in before]
    assert job(api, running)["state"] == "running"


@pytest.mark.parametrize(("method", "template"), STREAMS)
def test_a_foreign_origin_cannot_follow_an_event_stream(hive, done, method, template):
    for origin in ("http://evil.example", "null"):
        _refused(_send(hive, method, _fill(template, done), {"Origin": origin}))


def test_the_servers_own_origin_is_served(hive, api):
    """What the page sends: its own origin (Host and port), JSON."""
    own = f"http://127.0.0.1:{_port(hive)}"
    made = api.post("/v1/jobs", json={"operation": "hive_list"}, headers={"Origin": own})
    assert made.status_code == 201, made.text
    assert "access-control-allow-origin" not in made.headers  # same origin: no CORS needed
    named = f"http://localhost:{_port(hive)}"
    listed = api.get("/v1/jobs", headers={"Origin": named, "Host": f"localhost:{_port(hive)}"})
    assert listed.status_code == 200
    # The same page's origin on another Host is not the server's own.
    _refused(api.get("/v1/jobs", headers={"Origin": named}))


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx", "json", "application/json, text/plain"])
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/cancel", "/cancel", "/v1/completions", "/v1/chat/completions"])
def test_a_json_route_takes_json_only(api, kind, path):
    """Without an Origin too (curl's ``-d`` says form-urlencoded): 415, and no job."""
    count = len(api.get("/v1/jobs", params={"limit": 10_000}).json()["jobs"])
    body = json.dumps({"operation": "hive_list", "job_id": new_job_id(), "state": "queued"})
    response = api.post(path, content=body, headers={"Content-Type": kind})
    assert response.status_code == 415, response.text
    assert len(api.get("/v1/jobs", params={"limit": 10_000}).json()["jobs"]) == count


def test_a_body_needs_a_content_type_and_a_bodyless_post_does_not(api):
    bare = api.post("/v1/jobs", content=b'{"operation":"hive_list"}')
    assert bare.status_code == 415
    assert api.post(f"/v1/jobs/{new_job_id()}/cancel").status_code == 202  # curl -X POST
    # An empty body reads as nothing whatever its type (aiohttp types an empty POST
    # application/octet-stream): a cancel goes through, and no job is made of it.
    for kind in ("application/octet-stream", "text/plain"):
        empty = {"Content-Type": kind, "Content-Length": "0"}
        assert api.post(f"/v1/jobs/{new_job_id()}/cancel", headers=empty).status_code == 202
        assert api.post("/v1/jobs", headers=empty).status_code == 400
    typed = api.post("/v1/jobs", content=b'{"operation":"hive_list"}',
                     headers={"Content-Type": "Application/JSON; charset=utf-8"})  # fmt: skip
    assert typed.status_code == 201


FORGED = ["job-x\r\nFAKE-line", "job-x\x1b[5;41mred", "job-x\x00nul", "job-x\u0085next", "job-x\u2028sep", "job-x\u202eevil"]


def test_ids_that_would_forge_log_lines_are_404_and_never_logged_raw(api, ray_dir):
    """Percent-encoded CR/LF, ANSI escapes, NUL, NEL, U+2028 and a bidi override in a job
    id: every cancel form answers 404 (no redirect, nothing made of the Host), and no log
    line of the session holds one of them raw."""
    from urllib.parse import quote

    marker = uuid.uuid4().hex[:8]
    for forged in FORGED:
        forged += marker
        for response in (
            api.post(f"/v1/jobs/{quote(forged, safe='')}/cancel"),
            api.delete(f"/v1/jobs/{quote(forged, safe='')}"),
            api.get(f"/v1/jobs/{quote(forged, safe='')}/stream"),
            api.post("/cancel", json={"job_id": forged}),
            api.post("/v1/jobs/cancel", json={"job_ids": [forged]}),
        ):
            assert response.status_code == 404, (forged, response.text)
            assert "location" not in response.headers
    for path in ("/v1/jobs/%2F", "/v1/jobs/", "/ui", "/v1/jobs/job-x/"):
        response = api.get(path, headers={"Host": "localhost:1"})
        assert response.status_code == 404 and "location" not in response.headers, path
    # A well-formed unknown id is logged (its cancel warns), escaped where it is written.
    ghost = new_job_id()
    assert api.post(f"/v1/jobs/{ghost}/cancel").status_code == 202

    def logged() -> list[str]:
        return [line for line in _log_lines(ray_dir) if ghost in line]

    wait_for(logged, timeout=20, interval=0.2)
    lines = _log_lines(ray_dir)
    assert not [line for line in lines if line.startswith("FAKE-line")]
    raw = [line for line in lines if marker in line and not line.isprintable()]
    assert raw == []


def _log_lines(ray_dir: Path) -> list[str]:
    lines: list[str] = []
    for path in (ray_dir / "session_latest" / "logs").rglob("*"):
        if path.is_file() and path.suffix in (".out", ".err", ".log"):
            lines += path.read_text(errors="replace").split("\n")
    return lines


def test_one_log_record_is_one_line():
    """The formatter every rbee process writes with: a value's CR, LF, NUL, ESC, C1 controls,
    U+2028/2029 and bidi overrides come out escaped; a traceback keeps its own lines, each
    indented so none passes for a log line."""
    record = logging.LogRecord("rbee.t", logging.WARNING, __file__, 1, "cancel of %s", ("".join(FORGED),), None)
    line = logs.OneLine(logs.FORMAT).format(_with_job(record))
    assert "\n" not in line and "\r" not in line and line.isprintable(), line
    assert "job-x\\x0d\\x0aFAKE-line" in line and "\\x1b[5;41m" in line and "\\u2028" in line
    try:
        raise ValueError("bad\nINFO rbee forged")
    except ValueError:
        import sys

        record = logging.LogRecord("rbee.t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = logs.OneLine(logs.FORMAT).format(_with_job(record)).split("\n")
    assert out[0].endswith("job_id=- cid=-") and all(x.startswith("    ") for x in out[1:])


def _with_job(record: logging.LogRecord) -> logging.LogRecord:
    logs.with_job(record)
    return record


# -- the rules themselves (no server) ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost.:7835", ("localhost", 7835)),
        ("[::1]:80", ("::1", 80)),
        ("127.0.0.1", ("127.0.0.1", None)),
        ("", None),
        ("a b", None),
        ("localhost:", None),
        ("localhost:x", None),
        ("localhost:99999", None),
        ("user@localhost", None),
        ("[::1", None),
        ("[nothex]:1", None),
        ("localhost/x", None),
        ("h" * 254, None),
    ],
)
def test_host_headers_parse_strictly(value, parsed):
    got = Authority.parse(value)
    assert (got and (got.host, got.port)) == parsed


def test_the_hosts_a_server_answers_to():
    def rule(**server: Any) -> HostRule:
        return HostRule.of(Config.load(env={}, server=server).server)

    loopback = rule()
    assert all(loopback.allows(h) for h in ("localhost", "127.0.0.1", "::1", "127.9.9.9"))
    assert not any(loopback.allows(h) for h in ("evil.example", "localhost.evil", "10.0.0.1", "0.0.0.0"))
    named = rule(host="rbee.lan", allowed_hosts=["*.corp.example", "Box.Example.", "[fd00::5]"])
    assert all(named.allows(h) for h in ("rbee.lan", "a.corp.example", "box.example", "fd00::5"))
    assert not any(named.allows(h) for h in ("corp.example", "xcorp.example", "10.1.1.1"))
    wildcard = rule(host="0.0.0.0")  # any IP literal: no DNS answer makes a page's Host one
    assert wildcard.allows("192.0.2.7") and wildcard.allows("fd00::1")
    assert not wildcard.allows("evil.example")
    assert rule(allowed_hosts=["*"]).allows("anything.at.all")
    with pytest.raises(ValueError):
        Config.load(env={}, server={"allowed_hosts": ["evil .example"]})
    with pytest.raises(ValueError):
        Config.load(env={}, server={"allowed_origins": ["*"]})
    env = {"RBEE_ALLOWED_HOSTS": "rbee.lan, *.corp.example", "RBEE_ALLOWED_ORIGINS": "http://localhost:3000/"}
    server = Config.load(env=env).server
    assert server.allowed_hosts == ["rbee.lan", "*.corp.example"]
    assert server.allowed_origins == ["http://localhost:3000"]
    assert Config.load(env={}, server={"allowed_origins": ["HTTPS://x.example:443"]}).server.allowed_origins == ["https://x.example"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=st.text(max_size=40) | st.from_regex(r"[a-z0-9.\-\[\]:]{0,30}", fullmatch=True))
def test_no_host_but_loopbacks_passes_the_default_rule(host):
    """Whatever a Host says, the default rule lets through loopback and nothing else."""
    parsed = Authority.parse(host)
    if parsed is not None and HostRule.of(Config.load(env={}).server).allows(parsed.host):
        import ipaddress

        assert parsed.host == "localhost" or ipaddress.ip_address(parsed.host).is_loopback


# -- the origins the config allows: CORS for them, and for them alone ----------------------


@pytest.fixture(scope="module")
def cors(hive) -> Iterator[TestClient]:
    import ray

    from actors.naming import NAMESPACE, REGISTRY

    config = Config.load(env={"RBEE_ALLOWED_ORIGINS": "http://localhost:3000", "RBEE_API_TOKEN": "s3cret"})
    registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
    app = build_app(config, registry)
    with TestClient(app, base_url="http://127.0.0.1:7835", client=("127.0.0.1", 50000)) as client:
        yield client


def test_an_allowed_origin_gets_cors_for_itself_alone(cors):
    page = "http://localhost:3000"
    preflight = cors.options("/v1/jobs", headers={
        "Origin": page, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
        "Access-Control-Request-Private-Network": "true",
    })  # fmt: skip
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == page
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert preflight.headers["access-control-allow-private-network"] == "true"
    listed = cors.get("/v1/jobs", headers={"Origin": page, "Authorization": "Bearer s3cret"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == page
    assert "x-job-id" in listed.headers["access-control-expose-headers"].lower()
    # Its 401 is readable by it too (the page can then ask for the token).
    refused = cors.get("/v1/jobs", headers={"Origin": page})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == page
    for other in ("http://localhost:3001", "http://evil.example", "null"):
        answer = cors.options("/v1/jobs", headers={"Origin": other, "Access-Control-Request-Method": "POST"})
        assert answer.status_code == 403 and "access-control-allow-origin" not in answer.headers
        answer = cors.post("/v1/jobs", json={"operation": "hive_list"},
                           headers={"Origin": other, "Authorization": "Bearer s3cret"})  # fmt: skip
        assert answer.status_code == 403 and "access-control-allow-origin" not in answer.headers


def test_tokens_by_header_or_as_basics_password(cors):
    import base64

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    for good in ("Bearer s3cret", basic("rbee", "s3cret"), basic("", "s3cret"), "basic " + basic("x", "s3cret")[6:]):
        assert cors.get("/v1/jobs?limit=1", headers={"Authorization": good}).status_code == 200, good
    for bad in (basic("s3cret", ""), basic("rbee", "S3CRET"), basic("rbee", "s3cret "), "Basic s3cret",
                "Basic " + base64.b64encode(b"s3cret").decode(), "Basic !!!!", basic("a:b", "s3cret")[:-2]):  # fmt: skip
        response = cors.get("/v1/jobs?limit=1", headers={"Authorization": bad})
        assert response.status_code == 401, bad
        assert response.headers["www-authenticate"] == "Bearer"
    two = [("authorization", "Bearer s3cret"), ("authorization", "Bearer s3cret")]
    assert cors.get("/v1/jobs?limit=1", headers=two).status_code == 401


def test_the_pages_files_need_the_token_and_ask_the_browser_for_it(cors):
    """With a token set the page's files are guarded like any route: the browser is asked
    (HTTP Basic, the token as the password) before anything of the page is sent."""
    import base64

    for path in ("/", "/sw.js", "/ui/app.js", "/ui/app.css", "/ui/nope.js"):
        refused = cors.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith('Basic realm="rbee"')
        assert refused.json()["error"]["code"] == "UNAUTHORIZED"
        assert "<html" not in refused.text.lower()
    creds = "Basic " + base64.b64encode(b"me:s3cret").decode()
    assert cors.get("/", headers={"Authorization": creds}).text.lstrip().lower().startswith("<!doctype html")
    assert cors.get("/ui/app.js", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert cors.get("/health").status_code == 200  # the one path without the token


def test_every_4xx_of_the_door_is_json_in_the_routes_own_shape(cors):
    openai = cors.post("/v1/chat/completions", json={}, headers={"Origin": "http://evil.example"})
    assert openai.status_code == 403 and set(openai.json()["error"]) == {"message", "type", "param", "code"}
    plain = cors.post("/v1/jobs", json={}, headers={"Origin": "http://evil.example"})
    assert plain.status_code == 403 and set(plain.json()["error"]) == {"code", "message"}
    assert re.fullmatch(r"cid-[0-9a-f]{16}", plain.headers["x-correlation-id"])
