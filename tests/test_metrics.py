"""rbee's metrics as the Ray dashboard and Prometheus read them (SPEC §9): scraped from the
session node's metrics endpoint while a download, an inference and a cancel run."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import random_model, read_sse, submit, wait_for, wait_state

MiB = 1 << 20
NO_INFERENCE = importlib.util.find_spec("vllm") is None

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("ray_rbee_")
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, tags), v in samples.items() if n == name and want <= tags)


def grown(before: Samples, now: Samples, name: str, **labels: str) -> float:
    """How much ``name`` grew, series by series (each process exports its own, labelled with
    its ``WorkerId``; the series of a process that ended may be gone from ``now``)."""
    want = set(labels.items())
    return sum(
        max(0.0, v - before.get((n, tags), 0.0))
        for (n, tags), v in now.items()
        if n == name and want <= tags
    )


def moved(port: int, name: str, by: float, before: Samples, **labels: str) -> Callable[[], bool]:
    return lambda: grown(before, scrape(port), name, **labels) >= by


def _positive(samples: Samples, name: str, **labels: str) -> Samples:
    want = set(labels.items())
    return {k: v for k, v in samples.items() if k[0] == name and want <= k[1] and v > 0}


def _repo(hub, size: int) -> str:
    return random_model(hub, size, "org/metrics")


def test_download_bytes_and_jobs_counters_move(api, hub, metrics_port):
    before = scrape(metrics_port)
    repo = _repo(hub, 2 * MiB)
    job_id = submit(api, {"operation": "model_download", "model": repo})
    assert read_sse(api, f"/v1/jobs/{job_id}/stream").sentinel == "[DONE]"
    # Every byte written counts: 2 MiB and the 2 of config.json.
    wait_for(moved(metrics_port, "ray_rbee_download_bytes_total", 2 * MiB + 2, before), 30)
    done = {"operation": "model_download", "state": "completed"}
    wait_for(moved(metrics_port, "ray_rbee_jobs_total", 1, before, **done), 30)
    hive_ids = {dict(tags).get("hive_id") for (n, tags) in scrape(metrics_port) if "download" in n}
    assert hive_ids - {None}, "download metrics carry the hive they ran on"


def test_a_running_download_shows_in_the_gauges_and_its_cancel_in_the_latency(
    api, hub, metrics_port
):
    before = scrape(metrics_port)
    hub.throttle_bps = MiB
    try:
        job_id = submit(api, {"operation": "model_download", "model": _repo(hub, 16 * MiB)})
        wait_state(api, job_id, "running")

        running = {"operation": "model_download", "state": "running"}
        live: Samples = {}  #: the gauges' series that showed the job (a gone process's stay)

        def running_and_moving() -> bool:
            now = scrape(metrics_port)
            live.update(_positive(now, "ray_rbee_jobs_current", **running))
            live.update(_positive(now, "ray_rbee_download_rate_bps"))
            names = {name for name, _ in live}
            return names == {"ray_rbee_jobs_current", "ray_rbee_download_rate_bps"}

        wait_for(running_and_moving, 30, interval=0.5)
        api.post(f"/v1/jobs/{job_id}/cancel")
        wait_state(api, job_id, "cancelled")
    finally:
        hub.throttle_bps = None
    wait_for(moved(metrics_port, "ray_rbee_cancel_latency_s_count", 1, before), 30)
    wait_for(moved(metrics_port, "ray_rbee_jobs_total", 1, before, state="cancelled"), 30)
    # The same series go back to 0 once the job is over.
    wait_for(lambda: all(scrape(metrics_port).get(key) == 0 for key in live), 30, interval=0.5)
    depths = [tags for (n, tags) in scrape(metrics_port) if n == "ray_rbee_queue_depth"]
    assert any(("operation", "model_download") in tags for tags in depths)


@pytest.mark.skipif(NO_INFERENCE, reason="needs vllm")
def test_tokens_and_workers_are_counted(api, worker, metrics_port):
    model = worker["model"]
    before = scrape(metrics_port)
    op = {"operation": "infer", "model": model, "prompt": "Once upon a time there was"}
    job_id = submit(api, {**op, "max_tokens": 24, "ignore_eos": True})
    assert read_sse(api, f"/v1/jobs/{job_id}/stream").sentinel == "[DONE]"
    counted = moved(metrics_port, "ray_rbee_tokens_total", 24, before, model=model)
    try:
        wait_for(counted, 30)
    except AssertionError:
        now = {k: v for k, v in scrape(metrics_port).items() if "tokens" in k[0]}
        was = {k: v for k, v in before.items() if "tokens" in k[0]}
        raise AssertionError(f"tokens counted before: {was}, now: {now}") from None
    # Tokens, not events: vLLM may put several tokens in one output under load.
    assert grown(before, scrape(metrics_port), "ray_rbee_tokens_total", model=model) == 24
    # An OpenAI request counts the completion tokens of its usage.
    request = {"model": model, "prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True}
    assert api.post("/v1/completions", json=request).json()["usage"]["completion_tokens"] == 10
    wait_for(moved(metrics_port, "ray_rbee_tokens_total", 34, before, model=model), 30)
    wait_for(lambda: total(scrape(metrics_port), "ray_rbee_workers", state="ready") >= 1, 30)


@pytest.mark.skipif(NO_INFERENCE, reason="needs vLLM")
def test_the_serving_port_has_rbees_series_and_each_engines(api, worker, metrics_port):
    """``GET /metrics`` on the serving port, as on vLLM's server: every engine's ``vllm:*``
    series, labelled by model and worker, and rbee's series as Ray exports them; a family
    once however many processes have its series."""

    def served() -> dict[str, list]:
        response = api.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        families = list(text_string_to_metric_families(response.text))
        names = [f.name for f in families]
        assert len(names) == len(set(names)), "a family written twice"
        assert all(n.startswith(("vllm:", "ray_rbee_")) for n in names), names
        return {f.name: f.samples for f in families}

    chat = {"model": worker["model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert api.post("/v1/chat/completions", json=chat).status_code == 200

    def both() -> dict[str, list] | None:
        families = served()
        return families if "ray_rbee_jobs" in families and "vllm:generation_tokens" in families else None

    families = wait_for(both, timeout=30, interval=1)
    made = [s for s in families["vllm:generation_tokens"] if s.name.endswith("_total")]
    mine = [s for s in made if s.labels.get("worker_id") == worker["worker_id"]]
    assert mine and mine[0].labels["model_name"] == worker["model"] and mine[0].value >= 1, made
    assert "vllm:num_requests_running" in families
    assert any(s.value >= 1 for s in families["ray_rbee_jobs"] if s.labels.get("operation") == "infer")
