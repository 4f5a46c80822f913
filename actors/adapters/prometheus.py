"""Prometheus text for ``GET /metrics``, with prometheus_client: each engine's ``vllm:*``
series as its worker has them (labelled with the worker's id and the model's), and
the merge of several texts into one exposition (a family once, however many workers and
nodes have its series)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Families:
    """A collector of given families (prometheus_client writes them out)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def _text(families: Iterable[Metric]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode()


def engine_series(worker_id: str, model: str) -> str:
    """The ``vllm:*`` series of this process's engine (vLLM's Prometheus stat logger writes
    them to prometheus_client's registry), each labelled ``worker_id``, and ``model_name``
    the model's id (vLLM's is the path it loaded)."""
    from prometheus_client import REGISTRY

    families = []
    for metric in REGISTRY.collect():
        if not metric.name.startswith("vllm:"):
            continue
        family = Metric(metric.name, metric.documentation, metric.type, metric.unit)
        for s in metric.samples:
            labels = {**s.labels, "model_name": model, "worker_id": worker_id}
            family.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        families.append(family)
    return _text(families)


def merged(texts: Iterable[str], keep: tuple[str, ...] = ()) -> str:
    """One exposition of several: each family once, with the samples of all (those whose
    family name starts with one of ``keep``, when given)."""
    by_name: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if keep and not family.name.startswith(keep):
                continue
            into = by_name.get(family.name)
            if into is None:
                into = by_name[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            into.samples.extend(family.samples)
    return _text(_deduplicated(by_name.values()))


def _deduplicated(families: Iterable[Metric]) -> Iterator[Metric]:
    """Families whose samples name each series once (the first text's wins)."""
    for family in families:
        seen: set[tuple[str, Any]] = set()
        samples = []
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            if key not in seen:
                seen.add(key)
                samples.append(s)
        family.samples = samples
        yield family
