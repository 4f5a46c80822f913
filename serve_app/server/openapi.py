"""``GET /openapi.json``: an OpenAPI 3.1 document of every route, made from the routes
themselves (paths, methods, path parameters, each handler's docstring) and from the models
that read the bodies: rbee's operations for ``POST /v1/jobs``, and vLLM's own request models
for the routes the workers answer, where vLLM is installed beside the ingress (else those
bodies are named, not spelled out; their schemas are made once, in a process of their own).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from starlette.routing import BaseRoute, Route

from actors.core.operations import Operation
from actors.core.table import JOB_ID

if TYPE_CHECKING:
    from serve_app.server.errors import Shape

log = logging.getLogger("rbee.openapi")

#: Where a route's body is read: ``POST /v1/jobs`` by the operations, a worker's route by
#: vLLM's model (module, class) of that route.
VLLM_BODIES: dict[str, tuple[str, str]] = {
    "/v1/completions": ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    "/v1/chat/completions": (
        "vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"
    ),
    "/v1/chat/completions/batch": (
        "vllm.entrypoints.openai.chat_completion.protocol", "BatchChatCompletionRequest"
    ),
    "/tokenize": ("vllm.entrypoints.serve.tokenize.protocol", "TokenizeRequest"),
    "/detokenize": ("vllm.entrypoints.serve.tokenize.protocol", "DetokenizeRequest"),
    "/v1/responses": ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest"),
    "/v1/messages": ("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest"),
    "/v1/messages/count_tokens": (
        "vllm.entrypoints.anthropic.protocol", "AnthropicCountTokensRequest"
    ),
}  # fmt: skip
#: Routes whose answer is an event stream (SSE), always or with ``"stream": true``.
STREAMS = frozenset({"/v1/jobs/{job_id}/stream", "/v1/jobs/watch"})
STREAMABLE = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/invocations", "/v1/messages", "/v1/responses"}
)

_RBEE_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_VLLM_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer", "description": "the HTTP status"},
            },
        }
    },
}
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
#: The schema of the errors of each shape (``serve_app.server.errors``).
_ERRORS = {"rbee": "Error", "openai": "VllmError", "anthropic": "AnthropicError"}
_VLLM = "vllm."  #: vLLM's models' names among the schemas (rbee's have none)
_PATH_PARAM = re.compile(r"{(\w+)(?::(\w+))?}")


def document(routes: Iterable[BaseRoute], shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``; ``shapes``: the routes of vLLM's (OpenAI's,
    Anthropic's) APIs, by the shape of their errors."""
    schemas: dict[str, Any] = {
        "Error": _RBEE_ERROR, "VllmError": _VLLM_ERROR, "AnthropicError": _ANTHROPIC_ERROR
    }  # fmt: skip
    operation = _lift(TypeAdapter(Operation), "Operation", schemas)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or ":rest}" in route.path:
            continue  # the page's files (a mount) and the catch-all 404 of odd job ids
        path = _PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            body = None
            if method == "POST" and path == "/v1/jobs":
                body = operation
            elif method == "POST" and path in shapes:
                body = _vllm_body(path, schemas)
            error = _ERRORS[shapes.get(path, "rbee")]
            paths.setdefault(path, {})[method.lower()] = _operation(
                route, path, method, body, error=error
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rbee",
            "version": _version(),
            "description": "Jobs for LLM work on Ray: downloads and inference you can watch "
            "live and really cancel, and the routes of vLLM's OpenAI-compatible server "
            "(Anthropic's Messages too).",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _operation(
    route: Route, path: str, method: str, body: dict[str, Any] | None, error: str
) -> dict[str, Any]:
    summary, _, description = _doc(route.endpoint).partition("\n\n")
    op: dict[str, Any] = {
        "operationId": f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "summary": " ".join(summary.split()) or f"{method} {path}",
        "responses": {
            "200": {"description": "the answer", "content": _answers(path)},
            "4XX": {
                "description": "the caller's fault",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}
                },
            },
        },
    }
    if description.strip():
        op["description"] = " ".join(description.split())
    params = [
        {"name": name, "in": "path", "required": True, "schema": _param_schema(kind)}
        for name, kind in _PATH_PARAM.findall(route.path)
    ]
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _answers(path: str) -> dict[str, Any]:
    if path in STREAMS:
        return {"text/event-stream": {"schema": {"type": "string"}}}
    json = {"application/json": {"schema": {"type": "object"}}}
    if path in STREAMABLE:
        return {**json, "text/event-stream": {"schema": {"type": "string"}}}
    if path == "/metrics":
        return {"text/plain": {"schema": {"type": "string", "description": "Prometheus text"}}}
    if path in ("/", "/sw.js"):
        return {"text/html" if path == "/" else "text/javascript": {"schema": {"type": "string"}}}
    return json


def _param_schema(kind: str) -> dict[str, Any]:
    if kind == "job":
        return {"type": "string", "pattern": f"^{JOB_ID.pattern}$"}
    return {"type": "string"}


def _doc(endpoint: Callable[..., Any]) -> str:
    target = getattr(endpoint, "__wrapped__", endpoint)
    if isinstance(target, functools.partial):
        target = target.func
    return inspect.getdoc(target) or ""


def _lift(adapter: TypeAdapter[Any], name: str, schemas: dict[str, Any]) -> dict[str, Any]:
    """``adapter``'s JSON schema, its definitions moved into ``schemas``; a reference to it."""
    schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def _vllm_body(path: str, schemas: dict[str, Any]) -> dict[str, Any]:
    """vLLM's request model of ``path``, spelled out when vLLM is installed here."""
    where = VLLM_BODIES.get(path)
    if where is None:  # (/invocations: a chat or a completion)
        return {
            "anyOf": [_vllm_body(p, schemas) for p in ("/v1/chat/completions", "/v1/completions")]
        }
    module, name = where
    key = _VLLM + name
    if key not in schemas:
        spelled = vllm_schemas()
        for def_name, value in spelled.get("$defs", {}).items():
            schemas.setdefault(def_name, value)
        schemas[key] = spelled.get(name) or {
            "type": "object",
            "description": f"vLLM's {name} ({module})",
        }
    return {"$ref": f"#/components/schemas/{key}"}


@functools.cache
def vllm_schemas() -> dict[str, Any]:
    """The JSON schemas of vLLM's request models by name, their definitions under ``$defs``;
    worked out in a process of its own (vLLM's models import torch: ~0.5 GiB and seconds the
    ingress need not keep). Empty where vLLM is not installed."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "serve_app.server.openapi"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return dict(json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.info("openapi: vLLM's request models named, not spelled out: %r", exc)
        return {}


def _spell_vllm() -> dict[str, Any]:
    out: dict[str, Any] = {"$defs": {}}
    for module, name in VLLM_BODIES.values():
        try:
            reads = getattr(importlib.import_module(module), name)
        except ImportError:
            continue
        template = f"#/components/schemas/{_VLLM}{{model}}"
        schema = TypeAdapter(reads).json_schema(ref_template=template)
        out["$defs"].update({_VLLM + k: v for k, v in schema.pop("$defs", {}).items()})
        out[name] = schema
    return out


@functools.cache
def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("rbee")
    except metadata.PackageNotFoundError:
        return "0"


if __name__ == "__main__":  # what vllm_schemas runs
    logging.disable(logging.CRITICAL)
    with contextlib.redirect_stdout(sys.stderr):  # (vLLM's imports may print)
        spelled = _spell_vllm()
    print(json.dumps(spelled))
