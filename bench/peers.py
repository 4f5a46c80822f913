"""rbee against the peers a user would pick instead, in one run, same model, same client.

    python bench/peers.py --peers DIR [--only A,B,C,rbee,A-uni,B-uni] [--reps 3] [--max-tokens 256]

``DIR`` holds the peers' scripts (``direct_asyncllm.py``, ``serve_and_bench.py``,
``run_vllm_server.sh``, ``run_serve_llm.py``, ``openai_stream_bench.py``). One after another,
alone on the machine: A vLLM's ``AsyncLLM`` driven in-process (the ceiling), B vLLM's own
OpenAI server, C Ray Serve LLM in its fastest mode (HAProxy, throughput-optimized, direct
streaming), and rbee's OpenAI endpoint (``rbee serve`` as ``make`` installs it); then A and B
again with vLLM's CPU engine as rbee runs it (``A-uni``, ``B-uni``: the model inside the
engine-core process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so an engine setting is never
counted as serving speed. The model is
the test suite's tiny Llama (random weights, 256 tokens a stream, no EOS), in a folder for
A, B and C and in a fresh rbee cache for rbee. C needs ``pyarrow``, which rbee does not: it
is installed once into ``build/peer-c`` and put on C's ``PYTHONPATH`` only.

Figures per server: tokens/s at 1 and 8 streams, first chunk, serving CPU per 1,000 tokens
(every process of the server's tree but the engine's own: EngineCore and its worker), by
process, and the rate of 1-token requests at 32 in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import ROOT, Run, free_port, log, main
from rich.table import Table

TINY = "bench/tiny-llama"
PEER_C_DEPS = ROOT / "build" / "peer-c"
#: A peer's name with this suffix runs vLLM's CPU engine as rbee does (``_env``)
UNIPROC = "-uni"


def configure(parser: Any) -> None:
    parser.add_argument("--peers", type=Path, required=True, help="the peers' scripts")
    parser.add_argument("--only", default="A,B,C,rbee,A-uni,B-uni",
                        help="which of A,B,C,rbee,A-uni,B-uni to run")  # fmt: skip
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep each server's log here")


def body(run: Run) -> dict[str, Any]:
    """rbee and its peers, one after another, on the tiny Llama."""
    args = run.args
    peers = args.peers.resolve()
    folder = run.scratch("tiny")
    files = _tiny_llama(folder)
    cache = run.scratch("cache")
    _into_cache(cache, files)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    reps = 1 if args.quick else args.reps
    common = ["--max-tokens", str(args.max_tokens), "--reps", str(reps)]
    if args.quick:
        common += ["--rps-requests", "64", "--disconnect-trials", "4"]
    results: dict[str, Any] = {}
    for name in only:
        log.print(f"[bold]{name}[/]: starting")
        env = _env(uniproc=name.endswith(UNIPROC))
        if name.removesuffix(UNIPROC) == "A":
            results[name] = _direct(peers, folder, args, reps, env)
        else:
            results[name] = _served(run, name, peers, folder, cache, common, env)
        log.print(f"[dim]{name}: {json.dumps(_figures(results[name]))}[/]")
    run.tables.append(_table(results))
    return {"servers": {name: _figures(r) for name, r in results.items()}, "raw": results}


def _tiny_llama(folder: Path) -> dict[str, Any]:
    from tests.tinymodel import build_tiny_llama

    return dict(build_tiny_llama(folder))


def _into_cache(cache: Path, files: dict[str, Any]) -> None:
    """The model in the Hugging Face cache layout, as a download would leave it."""
    from actors.adapters.cache import RepoLayout

    layout = RepoLayout.of(cache, TINY)
    commit = hashlib.sha1(TINY.encode()).hexdigest()
    for path, data in files.items():
        raw = data if isinstance(data, bytes) else Path(data).read_bytes()
        etag = hashlib.sha256(raw).hexdigest()
        layout.blob(etag).parent.mkdir(parents=True, exist_ok=True)
        layout.blob(etag).write_bytes(raw)
        layout.link(commit, path, etag)
    layout.write_ref("main", commit)


def _direct(peers: Path, folder: Path, args: Any, reps: int, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(peers / "direct_asyncllm.py"), str(folder),
           "--max-tokens", str(args.max_tokens), "--reps", str(reps)]  # fmt: skip
    if args.quick:
        cmd += ["--abort-trials", "4"]
    return _result(subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env))


def _served(
    run: Run, name: str, peers: Path, folder: Path, cache: Path, common: list[str],
    env: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    model = "tiny"
    peer = name.removesuffix(UNIPROC)
    if peer == "B":
        server = f"{peers / 'run_vllm_server.sh'} {folder} {port}"
        env["PYTHON"] = sys.executable
    elif peer == "C":
        _peer_c_deps()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PEER_C_DEPS), env.get("PYTHONPATH")]))
        env.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1",
                   RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING="1")  # fmt: skip
        env["RAY_TMPDIR"] = str(run.scratch("ray"))
        server = f"{sys.executable} {peers / 'run_serve_llm.py'} {folder} --port {port}"
    else:
        model = TINY
        config = run.scratch("rbee") / "rbee.yaml"
        config.write_text(json.dumps({"embedded": False, "preload": [TINY],
                                      "engine": {"max_model_len": 512}}))  # fmt: skip
        env.update(RBEE_CONFIG=str(config), RBEE_CACHE_DIR=str(cache),
                   RBEE_STATE_DIR=str(run.scratch("state")), RAY_TMPDIR=str(run.scratch("ray")))  # fmt: skip
        server = f"{Path(sys.executable).parent / 'rbee'} serve --port {port}"
    logfile = os.devnull
    if run.args.log_dir is not None:
        run.args.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = str(run.args.log_dir / f"{name}.log")
    cmd = [sys.executable, str(peers / "serve_and_bench.py"), "--server-cmd", server,
           "--ready-url", f"{base}/v1/models", "--ready-completion", f"{base}@{model}",
           "--log", logfile, "--", base, "--model", model, "--watch-pid", "{pid}",
           "--watch-comm", "EngineCore", "--server-pid", "{pid}", *common]  # fmt: skip
    return _result(subprocess.run(cmd, capture_output=True, text=True, timeout=5400, env=env))


def _peer_c_deps() -> None:
    if (PEER_C_DEPS / "pyarrow").is_dir():
        return
    log.print("[dim]C: installing pyarrow into build/peer-c (once)…[/]")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(PEER_C_DEPS),
                    "pyarrow"], check=True)  # fmt: skip


def _env(*, uniproc: bool = False) -> dict[str, str]:
    """The peers' environment; ``uniproc``: vLLM's CPU engine as rbee runs it (the model in
    the engine-core process, no worker process beside it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}
    if uniproc:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: what B and C are given, and rbee
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _result(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    return dict(json.loads(line[len("RESULT "):]))


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """The comparison's figures from one peer's RESULT (A's own shape, or the client's)."""
    bench = result.get("bench", result)
    if "error" in result or "bench_error" in result:
        return {"error": str(result.get("error") or result.get("bench_error"))[-300:]}
    cpu8 = bench.get("cpu_c8") or {}
    short = bench.get("short") or {}
    return {
        "tps_c1": bench.get("tps_c1"),
        "tps_c8": bench.get("tps_c8"),
        "ttft_ms_c1": bench.get("ttft_ms_c1"),
        "ttft_ms_c8": bench.get("ttft_ms_c8"),
        "serving_cpu_ms_per_ktok_c8": cpu8.get("serving_cpu_ms_per_ktok"),
        "serving_by_process_c8": cpu8.get("by_process_ms_per_ktok"),
        "engine_cpu_ms_per_ktok_c8": cpu8.get("engine_cpu_ms_per_ktok"),
        "short_rps": short.get("rps"),
        "short_p99_ms": (short.get("latency_ms") or {}).get("p99"),
        "startup_s": result.get("startup_first_completion_s") or result.get("startup_s"),
    }


def _table(results: dict[str, Any]) -> Table:
    table = Table(title="rbee and its peers (same run, tiny Llama, 256 tokens a stream)")
    for column in ("server", "tok/s 1", "tok/s 8", "first chunk 1 / 8", "serving CPU ms/1k (8)",
                   "1-token req/s (p99)"):  # fmt: skip
        table.add_column(column)
    for name, result in results.items():
        f = _figures(result)
        if "error" in f:
            table.add_row(name, f["error"][:60], "", "", "", "")
            continue
        table.add_row(
            name, _n(f["tps_c1"]), _n(f["tps_c8"]),
            f"{_n(f['ttft_ms_c1'], 1)} / {_n(f['ttft_ms_c8'], 1)} ms",
            _n(f["serving_cpu_ms_per_ktok_c8"]),
            f"{_n(f['short_rps'])} ({_n(f['short_p99_ms'])} ms)" if f["short_rps"] else "—",
        )  # fmt: skip
    return table


def _n(value: Any, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


if __name__ == "__main__":
    sys.exit(main("peers", body, configure))

