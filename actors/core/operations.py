"""The operations a client can submit (SPEC §3), validated strictly: unknown fields are refused."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.core.errors import InvalidRequest, UnsafePath

# Matched with ``fullmatch``: ``$`` would also match before a final newline.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_URL = re.compile(r"https?://[^/]+(/.*)?", re.DOTALL)
_WORKER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

MAX_ID_CHARS = 128
"""The longest id (hive, worker, job) a client may give."""
_ID_RULE = "1 to {} characters without whitespace or control characters"


def is_id(value: str, max_chars: int = MAX_ID_CHARS) -> bool:
    """1 to ``max_chars`` characters, none of them whitespace or control characters.

    ``str.isprintable`` is False for every control, format, surrogate and separator
    character but the ASCII space, which is refused on its own.
    """
    return 0 < len(value) <= max_chars and value.isprintable() and " " not in value


def check_id(value: str, what: str = "id", max_chars: int = MAX_ID_CHARS) -> str:
    """``value`` if it ``is_id``, else ``InvalidRequest`` naming ``what``."""
    if not is_id(value, max_chars):
        raise InvalidRequest(f"{what} must be {_ID_RULE.format(max_chars)}, got {value!r:.80}")
    return value


def _id_chars(max_chars: int) -> AfterValidator:
    """The ``is_id`` rule as pydantic metadata (a ValueError, so the error names the field)."""

    def check(value: str) -> str:
        if not is_id(value, max_chars):
            raise ValueError(f"must be {_ID_RULE.format(max_chars)}")
        return value

    return AfterValidator(check)


Id = Annotated[str, _id_chars(MAX_ID_CHARS)]
"""A hive or worker id."""
Revision = Annotated[str, _id_chars(256)]
Glob = Annotated[str, _id_chars(512)]
Url = Annotated[str, _id_chars(4096)]


def check_model_id(model: str) -> str:
    """``org/name`` with nothing that could leave the cache (``..``, ``/`` at either end, NUL)."""
    if not _MODEL_ID.fullmatch(model) or ".." in model:
        raise UnsafePath(f"model id must look like 'org/name', got {model!r:.100}")
    return model


def check_relative_path(path: str, what: str = "file name") -> str:
    """A path inside a repository: relative, no ``..`` part, no NUL, no backslash."""
    parts = path.split("/")
    if (
        not path
        or "\x00" in path
        or "\\" in path
        or path.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UnsafePath(f"{what} {path!r} would leave the model's folder")
    return path


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hive_id: Id | None = None


class ModelDownload(_Op):
    operation: Literal["model_download"]
    model: str
    revision: Revision = "main"
    files: list[Glob] | None = Field(default=None, max_length=256)
    vendor: Literal["hf", "url"] = "hf"
    url: Url | None = None

    _model = field_validator("model")(classmethod(lambda cls, v: check_model_id(v)))

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str) -> str:
        if "\x00" in v or ".." in v or v.startswith("/") or "\\" in v:
            raise UnsafePath(f"revision {v!r} is not a branch, tag or commit")
        return v

    @field_validator("files")
    @classmethod
    def _globs(cls, v: list[str] | None) -> list[str] | None:
        for glob in v or ():
            check_relative_path(glob, "files glob")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not _URL.fullmatch(v):
            raise ValueError("url must be an http(s) address")
        return v


class ModelList(_Op):
    operation: Literal["model_list"]


class ModelGet(_Op):
    operation: Literal["model_get"]
    model: str
    _model = field_validator("model")(classmethod(lambda cls, v: check_model_id(v)))


class ModelDelete(_Op):
    operation: Literal["model_delete"]
    model: str
    _model = field_validator("model")(classmethod(lambda cls, v: check_model_id(v)))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


#: The routes of vLLM's server a worker answers: ``/v1/chat/completions`` (``chat``), its
#: ``/batch`` (``chat_batch``), ``/v1/completions``, ``/tokenize``, ``/detokenize``,
#: SageMaker's ``/invocations`` (a chat or a completion, by what its body reads as), and
#: Anthropic's ``/v1/messages`` and its ``/count_tokens``, and OpenAI's ``/v1/responses``.
OpenAiApi = Literal[
    "chat", "chat_batch", "completions", "tokenize", "detokenize", "invocations",
    "messages", "count_tokens", "responses",
]  # fmt: skip


class OpenAiCall(BaseModel):
    """A request to one of vLLM's routes as its client sent it: the worker reads it with
    vLLM's own models."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    api: OpenAiApi
    request: dict[str, Any]
    #: The response a response goes on from (``previous_response_id``), and its messages,
    #: as its job's result keeps them.
    previous: dict[str, Any] | None = None


#: What an ``infer`` with ``openai`` may give besides it: the request says the rest.
_WITH_OPENAI = frozenset({"operation", "model", "openai", "hive_id", "worker_id"})


class Infer(_Op):
    """Generate text. Give ``prompt`` (raw text), ``messages`` (the chat template applies)
    or ``openai`` (an OpenAI request, whose own parameters then apply)."""

    operation: Literal["infer"]
    model: str
    prompt: str | None = Field(default=None, max_length=200_000)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=256)
    max_tokens: int = Field(default=256, ge=1, le=32_768)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=10_000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=8
    )
    ignore_eos: bool = False
    openai: OpenAiCall | None = None
    worker_id: Id | None = None

    _model = field_validator("model")(classmethod(lambda cls, v: check_model_id(v)))

    @model_validator(mode="after")
    def _one_input(self) -> Infer:
        given = [self.prompt, self.messages, self.openai]
        if sum(x is not None for x in given) != 1:
            raise ValueError("give exactly one of 'prompt', 'messages' and 'openai'")
        if self.openai is not None:
            if extra := sorted(self.model_fields_set - _WITH_OPENAI):
                raise ValueError(f"with 'openai', its request's parameters apply: not {extra}")
            if self.openai.request.get("model") != self.model:
                raise ValueError("'model' and the OpenAI request's 'model' differ")
        return self


class WorkerSpawn(_Op):
    """Start a worker for ``model``; with ``reuse``, a worker of the hive that already serves
    it (or is loading it) is the answer instead of a second one."""

    operation: Literal["worker_spawn"]
    model: str
    device: Literal["cpu", "gpu"] | None = None
    worker_id: str | None = None
    reuse: bool = False

    _model = field_validator("model")(classmethod(lambda cls, v: check_model_id(v)))

    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, v: str | None) -> str | None:
        # It becomes part of a Ray actor's name: only characters safe everywhere.
        if v is not None and not _WORKER_ID.fullmatch(v):
            raise ValueError("must be 1 to 64 of A-Z a-z 0-9 . _ -")
        return v


class WorkerList(_Op):
    operation: Literal["worker_list"]


class WorkerStop(_Op):
    operation: Literal["worker_stop"]
    worker_id: Id


class HiveList(_Op):
    operation: Literal["hive_list"]


class HiveStatus(_Op):
    operation: Literal["hive_status"]


Operation = Annotated[
    ModelDownload
    | ModelList
    | ModelGet
    | ModelDelete
    | Infer
    | WorkerSpawn
    | WorkerList
    | WorkerStop
    | HiveList
    | HiveStatus,
    Field(discriminator="operation"),
]

_adapter: TypeAdapter[Any] = TypeAdapter(Operation)


def parse_operation(body: object) -> Operation:
    """Validate a request body into an operation, or raise ``InvalidRequest``."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with an 'operation' field")
    try:
        return _adapter.validate_python(body)  # type: ignore[no-any-return]
    except UnsafePath:
        raise
    except ValidationError as exc:
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, UnsafePath):
                raise UnsafePath(cause.message) from None
        raise InvalidRequest(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


OPERATION_NAMES = frozenset(
    cls.model_fields["operation"].annotation.__args__[0]  # type: ignore[union-attr]
    for cls in (
        ModelDownload,
        ModelList,
        ModelGet,
        ModelDelete,
        Infer,
        WorkerSpawn,
        WorkerList,
        WorkerStop,
        HiveList,
        HiveStatus,
    )
)
