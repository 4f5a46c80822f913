"""Where rbee's serving CPU goes while 8 OpenAI streams run: py-spy's top frames, by process.

    python bench/hotspots.py [--checkout DIR] [--seconds 20] [--streams 8] [--max-tokens 256]

``rbee serve`` as ``bench/peers.py`` starts it (the tiny Llama preloaded, ``max_model_len``
512), from this checkout or, with ``--checkout``, from another one (an older commit in a
``git worktree``: the server starts there with its code first on ``PYTHONPATH``, so Ray's
workers run it too). After a warm-up round, every process of the server's tree is sampled by ``py-spy
record --nonblocking`` (50 Hz, idle threads left out) while rounds of ``--streams``
concurrent ``/v1/completions`` streams of ``--max-tokens`` tokens run back to back: the
processes on a request's way (``SAMPLED``); the others are only timed, as py-spy costs CPU
of its own on a small machine.

Per process: CPU milliseconds per 1,000 tokens streamed (from ``/proc``, the same split as
the peers' client: the engine's own processes apart), and the functions its samples were
in, by own time (the innermost frame) and, for rbee's and Ray's frames, by time under them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
from _common import Run, free_port, log, main
from peers import TINY, _into_cache, _tiny_llama
from rich.table import Table

#: a process whose name has one of these runs the engine itself (as the peers' client counts)
ENGINE = ("EngineCore", "VLLM::Worker", "VllmWorker")
#: the processes on a token's or a request's way, sampled (py-spy costs CPU of its own: the
#: others are only timed)
SAMPLED = (*ENGINE, "InferenceActor", "ServeReplica", "JobRegistry", "rbee serve")
SETTLE_S = 15.0  #: Serve settles after start-up (HAProxy reloads, the controller's rounds)
TOP = 6


def configure(parser: Any) -> None:
    parser.add_argument("--checkout", type=Path, default=None, help="serve this checkout's code")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to sample")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--log", type=Path, default=None, help="keep rbee serve's output here")
    parser.add_argument("--rate", type=int, default=50, help="py-spy's samples a second")


def body(run: Run) -> dict[str, Any]:
    """rbee's processes sampled by py-spy during back-to-back rounds of concurrent streams."""
    args = run.args
    seconds = 5.0 if args.quick else args.seconds
    cache = run.scratch("cache")
    _into_cache(cache, _tiny_llama(run.scratch("tiny")))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = _serve(run, port, cache, args.checkout)
    _ready(base, server)
    time.sleep(SETTLE_S)
    asyncio.run(_round(base, args.streams, args.max_tokens))  # warm: every process has run
    processes = _processes(server.pid)
    before = {pid: _cpu_ms(pid) for pid in processes}
    samples = run.scratch("py-spy")
    sampled = [pid for pid, name in processes.items() if any(w in name for w in SAMPLED)]
    spies = [_spy(pid, samples / f"{pid}.txt", args.rate, seconds) for pid in sampled]
    started = time.monotonic()
    tokens = asyncio.run(_rounds(base, args.streams, args.max_tokens, seconds))
    elapsed = time.monotonic() - started
    after = {pid: _cpu_ms(pid) for pid in processes}
    for spy in spies:
        spy.wait(timeout=60)
    per_k = 1000 / max(tokens, 1)
    found: dict[str, Any] = {}
    for pid, name in processes.items():
        cpu = (after[pid] - before[pid]) * per_k
        frames = _frames(samples / f"{pid}.txt")
        if cpu < 1 and not frames["samples"]:
            continue
        label = name if name not in found else f"{name} ({pid})"
        found[label] = {"cpu_ms_per_ktok": round(cpu, 1), "engine": _is_engine(name), **frames}
    serving = sum(p["cpu_ms_per_ktok"] for p in found.values() if not p["engine"])
    engine = sum(p["cpu_ms_per_ktok"] for p in found.values() if p["engine"])
    run.tables.append(_table(found))
    return {
        "checkout": str(args.checkout) if args.checkout else "this one",
        "tokens": tokens,
        "tok_s": round(tokens / elapsed, 1),
        "serving_cpu_ms_per_ktok": round(serving, 1),
        "engine_cpu_ms_per_ktok": round(engine, 1),
        "processes": found,
    }


def _spy(pid: int, out: Path, rate: int, seconds: float) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).parent / "py-spy"
    cmd = [str(py_spy), "record", "--nonblocking", "--full-filenames", "-r", str(rate), "-d", str(int(seconds)),
           "-f", "raw", "-o", str(out), "-p", str(pid)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _serve(run: Run, port: int, cache: Path, checkout: Path | None) -> subprocess.Popen[bytes]:
    config = run.scratch("rbee") / "rbee.yaml"
    config.write_text(json.dumps({"embedded": False, "preload": [TINY],
                                  "engine": {"max_model_len": 512}}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}
    env.update(RBEE_CONFIG=str(config), RBEE_CACHE_DIR=str(cache), RAY_AUTH_MODE="disabled",
               RBEE_STATE_DIR=str(run.scratch("state")), RAY_TMPDIR=str(run.scratch("ray")),
               VLLM_CPU_KVCACHE_SPACE="1")  # fmt: skip
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout.resolve()), env.get("PYTHONPATH")]))
    rbee = Path(sys.executable).parent / "rbee"
    logfile = (run.args.log or run.workdir / "serve.log").open("wb")
    # started in the checkout: Ray puts the driver's folder first on its workers' path
    server = subprocess.Popen([str(rbee), "serve", "--port", str(port)], env=env, stdout=logfile,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              cwd=checkout)  # fmt: skip
    run.stack.callback(_stop, server)
    return server


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _ready(base: str, server: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    body = {"model": TINY, "prompt": "Hi", "max_tokens": 1}
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"rbee serve exited with {server.returncode}")
        try:
            if httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200:
                log.print("[dim]hotspots: rbee serves the tiny Llama[/]")
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("rbee never served the tiny Llama")


async def _stream(client: httpx.AsyncClient, max_tokens: int) -> int:
    body = {"model": TINY, "prompt": "Once upon a time", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}  # fmt: skip
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunks += 1
    return chunks


async def _round(base: str, streams: int, max_tokens: int) -> int:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        return sum(await asyncio.gather(*(_stream(client, max_tokens) for _ in range(streams))))


async def _rounds(base: str, streams: int, max_tokens: int, seconds: float) -> int:
    tokens, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        tokens += await _round(base, streams, max_tokens)
    return tokens


def _processes(root: int) -> dict[int, str]:
    """pid -> name of every process under the server that Ray or rbee runs (by its title)."""
    found = {}
    for proc in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        title = cmdline[0] if cmdline else proc.name()
        if title.endswith("python") or "python" in Path(title).name:
            title = " ".join(Path(part).name for part in cmdline[:3])
        found[proc.pid] = title[:60]
    return found


def _is_engine(name: str) -> bool:
    return any(word in name for word in ENGINE)


def _cpu_ms(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return (times.user + times.system) * 1000


def _frames(path: Path) -> dict[str, Any]:
    """py-spy's raw samples: the innermost frames by own time, and rbee's frames by time
    spent under them (each frame counted once per sample)."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"samples": 0, "own": [], "rbee": []}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]  # fmt: skip
        if not frames:
            continue
        own[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames if _ours(f)}:
            under[frame] += n

    def share(counts: Counter[str]) -> list[list[Any]]:
        return [[frame, round(100 * n / total, 1)] for frame, n in counts.most_common(TOP)]

    return {"samples": total, "own": share(own), "rbee": share(under)}


def _ours(frame: str) -> bool:
    return any(f"/{part}/" in frame for part in ("actors", "serve_app"))


def _short(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``func (module.py)``: lines merged, paths cut."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(file).parts
    tail = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({tail})"


def _table(found: dict[str, Any]) -> Table:
    table = Table(title="rbee's processes during the rounds: CPU ms / 1k tokens, py-spy's top frames")
    for column in ("process", "CPU ms/1k", "own time (innermost frame, % of samples)", "under rbee's frames"):
        table.add_column(column)
    ranked = sorted(found.items(), key=lambda kv: -kv[1]["cpu_ms_per_ktok"])
    for name, p in ranked:
        own = "\n".join(f"{pct:>5}% {frame}" for frame, pct in p["own"])
        ours = "\n".join(f"{pct:>5}% {frame}" for frame, pct in p["rbee"][:4])
        label = f"{name} (engine)" if p["engine"] else name
        table.add_row(label, f"{p['cpu_ms_per_ktok']:.0f}", own, ours)
    return table


if __name__ == "__main__":
    raise SystemExit(main("hotspots", body, configure))
