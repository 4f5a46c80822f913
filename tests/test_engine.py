"""The engine's pure parts, without Ray or vLLM: the model's context, the length given to
vLLM, and what a failed load says."""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from actors.adapters.engine import (
    EngineWorker,
    _engine_process_reason,
    fit_max_model_len,
    last_exception_line,
    load_failure_message,
    model_context_len,
)
from actors.core.config import EngineConfig
from actors.core.errors import ModelLoadFailed

KV_CACHE_REFUSAL = (
    "ValueError: To serve at least one request with the model's max seq len (4194304), "
    "(2.0 GiB KV cache is needed, which is larger than the available KV cache memory "
    "(1.0 GiB). Based on the available memory, the estimated maximum model length is 2097024."
)
ENGINE_PROCESS_FAILED = (
    "Engine core initialization failed. See root cause above. Failed core proc(s): {}"
)


def _model(tmp_path: Path, config: object) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "key",
    [
        "max_position_embeddings",
        "n_positions",
        "max_seq_len",
        "seq_length",
        "max_sequence_length",
        "model_max_length",
    ],
)
def test_context_is_read_from_the_usual_keys(tmp_path, key):
    assert model_context_len(_model(tmp_path, {key: 512})) == 512


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 4096, "seq_length": 2048}, 2048),  # the smallest, as vLLM
        ({"max_position_embeddings": 8192, "model_max_length": 131072}, 131072),  # Command-R
        ({"max_position_embeddings": 32768.0}, 32768),
        ({"text_config": {"max_position_embeddings": 1024}, "max_position_embeddings": 9}, 1024),
        ({"max_position_embeddings": 512, "rope_scaling": None}, 512),
        ({"max_position_embeddings": 512, "rope_parameters": {"rope_type": "default"}}, 512),
        (
            {
                "max_position_embeddings": 512,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default"},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                },
            },
            512,
        ),
    ],
)
def test_context_is_read_as_vllm_reads_it(tmp_path, config, expected):
    assert model_context_len(_model(tmp_path, config)) == expected


@pytest.mark.parametrize(
    "config",
    [
        {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {"max_position_embeddings": 4096, "rope_scaling": {"factor": 4.0}},
        {"max_position_embeddings": 131072, "rope_parameters": {"rope_type": "llama3"}},
        {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "yarn", "factor": 4}},
        {
            "max_position_embeddings": 4096,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0}},
        },
        {"text_config": {"max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic"}}},
    ],
)
def test_scaled_rope_leaves_the_length_to_vllm(tmp_path, config):
    assert model_context_len(_model(tmp_path, config)) is None


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"hidden_size": 64},
        {"max_position_embeddings": None},
        {"max_position_embeddings": True},
        {"max_position_embeddings": -1},
        {"max_position_embeddings": 0},
        {"max_position_embeddings": "2048"},
        {"max_position_embeddings": 2048.5},
        [2048],
        "2048",
    ],
)
def test_nothing_usable_leaves_the_length_to_vllm(tmp_path, config):
    assert model_context_len(_model(tmp_path, config)) is None


def test_a_missing_or_broken_config_leaves_the_length_to_vllm(tmp_path):
    assert model_context_len(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    assert model_context_len(tmp_path) is None
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00")
    assert model_context_len(tmp_path) is None


def test_the_context_of_a_config_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(max_position_embeddings=512, head_dim=32).save_pretrained(tmp_path)
    assert model_context_len(tmp_path) == 512


@pytest.mark.parametrize(
    ("configured", "own", "expected"),
    [
        (None, 512, None),  # vLLM takes the model's own
        (None, None, None),
        (2048, 512, 512),  # capped at the model's
        (256, 512, 256),
        (512, 512, 512),
        (2048, None, 2048),  # unknown: vLLM decides whether it fits
    ],
)
def test_the_length_given_to_vllm(configured, own, expected):
    assert fit_max_model_len(configured, own) == expected


def test_the_max_model_len_setting_defaults_to_the_models_own():
    assert EngineConfig().max_model_len is None
    assert EngineConfig(max_model_len=4096).max_model_len == 4096
    with pytest.raises(ValidationError):
        EngineConfig(max_model_len=8)


def test_the_exception_line_ends_the_last_traceback():
    stderr = "\n".join(
        [
            "INFO something unrelated",
            "Process EngineCore_DP0:",
            "Traceback (most recent call last):",
            '  File "/x/multiprocessing/process.py", line 314, in _bootstrap',
            "    self.run()",
            "KeyError: 'first'",
            "",
            "During handling of the above exception, another exception occurred:",
            "",
            "Traceback (most recent call last):",
            '  File "/x/vllm/v1/core/kv_cache_utils.py", line 1037, in _check_enough',
            "    raise ValueError(",
            "    ^^^^^^^^^^^^^^^^",
            KV_CACHE_REFUSAL,
            "WARNING a line that came after",
        ]
    )
    assert last_exception_line(stderr) == KV_CACHE_REFUSAL


def test_the_exception_line_is_found_in_vllms_log_too():
    prefix = "(EngineCore pid=5637) ERROR 11-24 09:00:40 [core.py:1510] "
    log = "\n".join(
        prefix + line
        for line in [
            "EngineCore failed to start.",
            "Traceback (most recent call last):",
            '  File "/x/vllm/v1/engine/core.py", line 1493, in run_engine_core',
            "    engine_core = EngineCoreProc(*args, engine_index=dp_rank, **kwargs)",
            KV_CACHE_REFUSAL,
        ]
    )
    assert last_exception_line(log) == KV_CACHE_REFUSAL


@pytest.mark.parametrize("output", ["", "no traceback here\nValueError: not after one\n"])
def test_no_traceback_no_exception_line(output):
    assert last_exception_line(output) is None


def test_a_kv_cache_refusal_names_rbees_settings():
    exc = RuntimeError(ENGINE_PROCESS_FAILED)
    exc.add_note(f"the engine process said: {KV_CACHE_REFUSAL}")
    config = EngineConfig(kv_cache_gib=1.0)
    message = load_failure_message("org/long", exc, config, own_len=4194304)
    assert message.startswith(f"org/long: RuntimeError: {ENGINE_PROCESS_FAILED}")
    assert KV_CACHE_REFUSAL in message
    assert "engine.max_model_len (now the model's own, 4194304)" in message
    assert "engine.kv_cache_gib on CPU (now 1)" in message
    assert "engine.gpu_memory_utilization on GPU (now 0.85)" in message
    assert "\n" not in message


def test_an_unexplained_engine_failure_points_at_the_log_and_the_settings():
    config = EngineConfig(max_model_len=4096)
    message = load_failure_message("org/m", RuntimeError(ENGINE_PROCESS_FAILED), config, 8192)
    assert "vLLM's reason is in the worker's log" in message
    assert "engine.max_model_len (now 4096)" in message
    assert "engine.kv_cache_gib" in message


def test_a_refused_length_keeps_vllms_line_not_pydantics():
    class ModelConfig(BaseModel):
        max_model_len: int

        @field_validator("max_model_len")
        @classmethod
        def fits(cls, value: int) -> int:
            raise ValueError(
                f"User-specified max_model_len ({value}) is greater than the derived "
                "max_model_len (max_position_embeddings=512.0 or model_max_length=None in "
                "model's config.json)."
            )

    with pytest.raises(ValidationError) as refused:
        ModelConfig(max_model_len=2048)
    message = load_failure_message("org/m", refused.value, EngineConfig(max_model_len=2048), None)
    assert message.startswith(
        "org/m: ValidationError: User-specified max_model_len (2048) is greater than"
    )
    assert "1 validation error" not in message
    assert "engine.max_model_len (now 2048)" in message


def test_an_unrelated_failure_gets_no_advice_about_the_context():
    exc = OSError("model.safetensors: header too large\nmore detail")
    message = load_failure_message("org/m", exc, EngineConfig(), 2048)
    assert message == "org/m: OSError: model.safetensors: header too large"


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    saved = os.dup(2)
    with path.open("ab") as file:
        os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def test_a_failed_engine_process_is_explained_from_the_shared_stderr(tmp_path):
    log = tmp_path / "worker.err"
    log.write_text("Traceback (most recent call last):\nKeyError: 'from before the load'\n")
    with _stderr_to(log), pytest.raises(RuntimeError) as failed, _engine_process_reason():
        os.write(2, f"Traceback (most recent call last):\n  File 'x'\n{KV_CACHE_REFUSAL}\n".encode())
        raise RuntimeError(ENGINE_PROCESS_FAILED)
    assert failed.value.__notes__ == [f"the engine process said: {KV_CACHE_REFUSAL}"]


def test_other_failures_are_left_as_they_are(tmp_path):
    with _stderr_to(tmp_path / "worker.err"), pytest.raises(ValueError) as failed:
        with _engine_process_reason():
            os.write(2, b"Traceback (most recent call last):\nKeyError: 'x'\n")
            raise ValueError("bad dtype")
    assert not hasattr(failed.value, "__notes__")


async def test_a_load_gets_the_capped_length_and_fails_saying_what_to_change(tmp_path, caplog):
    model = _model(tmp_path, {"max_position_embeddings": 512})
    given: list[EngineConfig] = []

    async def refusing(path: Path, config: EngineConfig) -> object:
        given.append(config)
        raise RuntimeError(ENGINE_PROCESS_FAILED)

    worker = EngineWorker("w-1", "org/short", refusing)
    engine_log = logging.getLogger("rbee.engine")
    engine_log.addHandler(caplog.handler)  # the rbee loggers may not propagate
    try:
        with caplog.at_level(logging.INFO, "rbee.engine"), pytest.raises(ModelLoadFailed) as failed:
            await worker.load(model, EngineConfig(max_model_len=2048))
    finally:
        engine_log.removeHandler(caplog.handler)
    assert [c.max_model_len for c in given] == [512]
    assert "engine.max_model_len 2048 is longer than the model's context; using its 512" in (
        caplog.text
    )
    assert worker.stats()["max_model_len_capped_from"] == 2048
    assert "engine.max_model_len (now 512)" in failed.value.message
    assert pickle.loads(pickle.dumps(failed.value)).message == failed.value.message
