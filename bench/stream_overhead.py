"""Tokens/s through the whole stack (HTTP SSE → Serve → registry → InferenceActor → vLLM)
divided by tokens/s of vLLM's AsyncLLM driven directly: same model, same run, at
concurrency 1 and 8. Target ≥ 0.95 (SPEC §11)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from _common import Run, client, log, main, read_sse
from _infer import Model, add_model_flag, hive_with_worker, prepare
from rich.table import Table

PROMPT = "Once upon a time, in a hive at the edge of a quiet meadow, there lived"


def _tokens_for(run: Run) -> int:
    if run.args.model == "smollm2":
        return 16 if run.args.quick else 64
    return 64 if run.args.quick else 256


def direct(model: Model, concurrency: int, max_tokens: int, rounds: int) -> dict[int, float]:
    """Tokens/s of AsyncLLM in this process, ``concurrency`` requests at once."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from actors.engine import WARMUP_PROMPT

    async def measure() -> dict[int, float]:
        engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=str(model.folder),
                enforce_eager=True,
                max_model_len=2048,
                disable_log_stats=True,
            )
        )
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=0.0,
                ignore_eos=True,
                output_kind=RequestOutputKind.DELTA,
            )
            async for _ in engine.generate(WARMUP_PROMPT, params, "warmup"):
                pass
            rates: dict[int, float] = {}
            for c in concurrency_levels(concurrency):
                best = 0.0
                for r in range(rounds):

                    async def one(i: int, c: int = c, r: int = r) -> int:
                        n = 0
                        async for out in engine.generate(PROMPT, params, f"d-{c}-{r}-{i}"):
                            n += len(out.outputs[0].token_ids)
                        return n

                    started = time.monotonic()
                    counts = await asyncio.gather(*(one(i) for i in range(c)))
                    best = max(best, sum(counts) / (time.monotonic() - started))
                rates[c] = best
            return rates
        finally:
            engine.shutdown()

    return asyncio.run(measure())


def concurrency_levels(top: int) -> list[int]:
    return [1, top]


def through_stack(
    url: str, model: Model, concurrency: int, max_tokens: int, rounds: int
) -> dict[int, float]:
    rates: dict[int, float] = {}
    for c in concurrency_levels(concurrency):
        best = 0.0
        for _ in range(rounds):
            counts = [0] * c

            def one(i: int, counts: list[int] = counts) -> None:
                op = {
                    "operation": "infer",
                    "model": model.model,
                    "prompt": PROMPT,
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                }
                with client(url) as http:
                    job = http.post("/v1/jobs", json=op).json()
                    stream = read_sse(http, f"/v1/jobs/{job['job_id']}/stream")
                    counts[i] = stream.of("token")[-1]["index"] if stream.of("token") else 0

            threads = [threading.Thread(target=one, args=(i,)) for i in range(c)]
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            best = max(best, sum(counts) / (time.monotonic() - started))
        rates[c] = best
    return rates


def body(run: Run) -> dict[str, Any]:
    """Whole-stack SSE tokens/s ÷ direct AsyncLLM tokens/s at concurrency 1 and 8."""
    model, config = prepare(run)
    max_tokens, rounds = _tokens_for(run), (1 if run.args.quick else 3)
    log.print(f"[dim]direct AsyncLLM on {model.model}, {max_tokens} tokens per request…[/]")
    plain = direct(model, 8, max_tokens, rounds)
    hive = hive_with_worker(run, model, config)
    log.print("[dim]the same through HTTP SSE…[/]")
    stack = through_stack(hive.url, model, 8, max_tokens, rounds)

    table = Table(
        title=f"stream overhead ({model.model}, {max_tokens} tokens/request, best of {rounds})"
    )
    for column in ("concurrency", "direct tok/s", "SSE tok/s", "ratio (target ≥ 0.95)"):
        table.add_column(column, justify="right")
    figures: dict[str, Any] = {"model": model.model, "max_tokens": max_tokens, "rounds": rounds}
    for c in concurrency_levels(8):
        ratio = stack[c] / plain[c] if plain[c] else float("nan")
        table.add_row(str(c), f"{plain[c]:.1f}", f"{stack[c]:.1f}", f"{ratio:.3f}")
        figures[f"c{c}"] = {
            "direct_tok_s": round(plain[c], 1),
            "sse_tok_s": round(stack[c], 1),
            "ratio": round(ratio, 3),
        }
    run.tables.append(table)
    return figures


if __name__ == "__main__":
    raise SystemExit(main("stream_overhead", body, add_model_flag))
