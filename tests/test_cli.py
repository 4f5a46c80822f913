"""The ``rbee`` CLI as a user runs it: a real process (a real pseudo-terminal where it matters)
against the real hive."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

from actors.core.events import Narration, Progress, Result, Token
from actors.core.operations import OPERATION_NAMES
from serve_app.client import render as cli_render
from serve_app.client.api import StreamEvent
from tests.conftest import free_port
from tests.helpers import job, random_model, wait_for, wait_state

MiB = 1 << 20
RBEE = str(Path(sys.executable).parent / "rbee")


def rbee(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RBEE_URL": url}
    return subprocess.run(
        [RBEE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def spawn(url: str, *args: str) -> pexpect.spawn:
    env = {**os.environ, "RBEE_URL": url, "TERM": "xterm-256color"}
    # ^C makes the tty drop its pending output, which may cut a UTF-8 bar character in half
    return pexpect.spawn(
        RBEE,
        list(args),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
        dimensions=(30, 160),
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def slow_hub(hub):
    hub.throttle_bps = MiB
    yield hub
    hub.throttle_bps = None


def _repo(hub, size: int, *, config: bool = True) -> str:
    return random_model(hub, size, "org/cli", config=config)


def _blobs(cache_dir: Path, repo: str) -> list[Path]:
    blobs = cache_dir / f"models--{repo.replace('/', '--')}" / "blobs"
    return list(blobs.iterdir()) if blobs.is_dir() else []


# -- Ctrl+C in a real terminal -----------------------------------------------------------------


def test_ctrl_c_cancels_the_download_on_the_server(api, hive, slow_hub, cache_dir):
    repo = _repo(slow_hub, 64 * MiB, config=False)
    child = spawn(hive.url, "model", "download", repo)
    child.expect(r"(job-[0-9a-f-]{36})")
    job_id = child.match.group(1)
    child.expect(r"[kMG]B/s")  # the live bar: bytes, rate, ETA
    assert (job(api, job_id)["progress"] or {}).get("bytes_done", 0) > 0
    child.sendintr()
    child.expect(f"cancelled job {job_id}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130, child.before
    record = job(api, job_id)
    assert record["state"] == "cancelled"
    left = _blobs(cache_dir, repo)
    assert [p for p in left if p.name.endswith(".incomplete")] == []
    assert left == [], "a half file stayed in the cache"


def test_ctrl_c_on_jobs_stream_stops_watching_but_not_the_job(api, hive, slow_hub):
    repo = _repo(slow_hub, 64 * MiB)
    download = spawn(hive.url, "model", "download", repo, "--json")
    download.expect(r'"job_id": "(job-[0-9a-f-]{36})"')
    job_id = download.match.group(1)
    watcher = spawn(hive.url, "jobs", "stream", job_id)
    watcher.expect(r"[kMG]B/s")
    watcher.sendintr()
    watcher.expect(f"stopped watching job {job_id}")
    watcher.expect(pexpect.EOF)
    watcher.close()
    assert watcher.exitstatus == 130
    assert job(api, job_id)["state"] == "running"
    download.sendintr()
    download.expect(pexpect.EOF)
    download.close()
    assert download.exitstatus == 130
    wait_state(api, job_id, "cancelled", timeout=10)


class FreezingProxy:
    """A TCP proxy to the hive; once ``frozen`` it forwards nothing more, either way, so a
    cancel request hangs as it would against a wedged server."""

    def __init__(self, upstream: str) -> None:
        self._upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.frozen = threading.Event()
        self._held: list[socket.socket] = []

    def __enter__(self) -> FreezingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        for sock in self._held:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(down)
            if self.frozen.is_set():
                continue
            up = socket.create_connection(self._upstream)
            self._held.append(up)
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                if not self.frozen.is_set():
                    sink.sendall(chunk)
        except OSError:
            pass


@pytest.mark.parametrize("again", [True, False], ids=["second-ctrl-c", "cancel-times-out"])
def test_a_wedged_server_never_holds_the_terminal(api, hive, slow_hub, again):
    repo = _repo(slow_hub, 64 * MiB)
    with FreezingProxy(hive.url) as proxy:
        child = spawn(proxy.url, "model", "download", repo)
        child.expect(r"(job-[0-9a-f-]{36})")
        job_id = child.match.group(1)
        child.expect(r"[kMG]B/s")
        proxy.frozen.set()
        child.sendintr()
        child.expect("cancelling job")  # the cancel now hangs on the frozen server ...
        started = time.monotonic()
        if again:
            child.sendintr()  # ... a second Ctrl+C exits at once
        else:
            child.expect(f"could not cancel job {job_id}: rbee did not answer within 2 s")
        child.expect(pexpect.EOF)
        took = time.monotonic() - started
        child.close()
    assert child.exitstatus == 130
    assert took < (1.5 if again else 4.0), f"exiting took {took:.1f}s"
    assert "cancelled job" not in (child.before or "")
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 200


# -- machine-readable output -------------------------------------------------------------------


def test_download_prints_the_path_and_json_output_parses(api, hive, hub, cache_dir):
    repo = _repo(hub, MiB)
    human = rbee(hive.url, "model", "download", repo)
    assert human.returncode == 0, human.stderr
    path = human.stdout.strip()
    assert Path(path).is_dir() and str(cache_dir) in path
    assert "downloaded" in human.stderr

    again = rbee(hive.url, "model", "download", repo, "--json")
    assert again.returncode == 0, again.stderr
    lines = [json.loads(line) for line in again.stdout.splitlines()]
    job_id = lines[0]["job_id"]
    assert [x["id"] for x in lines] == list(range(1, len(lines) + 1))
    assert {x["job_id"] for x in lines} == {job_id}
    assert lines[-1]["event"] == "result" and lines[-1]["data"]["path"] == path

    streamed = rbee(hive.url, "jobs", "stream", job_id, "--json")
    assert [json.loads(line) for line in streamed.stdout.splitlines()] == lines
    shown = json.loads(rbee(hive.url, "jobs", "show", job_id, "--json").stdout)
    assert shown["state"] == "completed" and shown["result"]["path"] == path
    listed = json.loads(rbee(hive.url, "jobs", "list", "--json", "--limit", "5").stdout)
    assert job_id in [j["job_id"] for j in listed]

    models = json.loads(rbee(hive.url, "model", "list", "--json").stdout)
    assert repo in [m["model"] for m in models["models"]]
    got = json.loads(rbee(hive.url, "model", "get", repo, "--json").stdout)
    assert got["model"] == repo and got["size_on_disk"] >= MiB
    status = json.loads(rbee(hive.url, "hive", "status", "--json").stdout)
    assert repo in status["models"]
    hives = json.loads(rbee(hive.url, "hive", "list", "--json").stdout)
    assert status["hive_id"] in [h["hive_id"] for h in hives["hives"]]

    gone = rbee(hive.url, "model", "rm", repo)
    assert gone.returncode == 0 and f"deleted {repo}" in gone.stdout
    assert not Path(path).exists()


def test_human_tables_show_whole_ids(api, hive):
    hive_id = json.loads(rbee(hive.url, "hive", "status", "--json").stdout)["hive_id"]
    listed = rbee(hive.url, "jobs", "list", "--limit", "3")
    assert listed.returncode == 0 and "hive_status" in listed.stdout
    newest = api.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]["job_id"]
    assert newest in listed.stdout
    status = rbee(hive.url, "hive", "status")
    assert hive_id in status.stdout and "cache_dir" in status.stdout
    assert "no preloads" in status.stderr  # the session hive preloads nothing
    assert json.loads(rbee(hive.url, "hive", "status", "--json").stdout)["preload"] == {}


# -- errors: one line, non-zero ----------------------------------------------------------------


def test_unknown_model_is_one_clear_line(hive):
    missing = rbee(hive.url, "model", "get", "org/absent")
    assert missing.returncode == 1 and missing.stdout == ""
    assert one_error_line(missing).startswith("error: MODEL_NOT_FOUND: ")
    assert "org/absent" in missing.stderr


def test_infer_with_an_unknown_model_is_one_clear_line(hive):
    result = rbee(hive.url, "infer", "Hello", "--model", "org/absent-model", "--max-tokens", "4")
    assert result.returncode == 1
    line = one_error_line(result)
    # 422 until the server knows the model's absence up front, or a failed job: both are clear.
    assert line.startswith(("error: MODEL_NOT_FOUND: ", "error: INVALID_REQUEST: ")), line


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("model", "download", "../etc/passwd"), "INVALID_REQUEST"),
        (("jobs", "show", "job-never"), "JOB_NOT_FOUND"),
        (("jobs", "cancel", "job-never", "--wait"), "JOB_NOT_FOUND"),
        (("jobs", "stream", "job-never"), "JOB_NOT_FOUND"),
        (("jobs", "list", "--state", "sleeping"), "INVALID_REQUEST"),
    ],
)
def test_server_errors_are_one_line_with_their_code(hive, args, code):
    result = rbee(hive.url, *args)
    assert result.returncode == 1
    assert one_error_line(result).startswith(f"error: {code}: ")


def test_a_server_that_is_not_running_is_one_clear_line():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("model", "list"), ("jobs", "list"), ("--server", url, "hive", "status")):
        result = rbee(url, *args)
        assert result.returncode == 1
        line = one_error_line(result)
        assert line == f"error: cannot reach rbee at {url} (is 'rbee serve' running?)"


def test_usage_errors_exit_2():
    result = rbee("http://127.0.0.1:9", "model", "download")
    assert result.returncode == 2
    assert rbee("http://127.0.0.1:9", "model", "frobnicate").returncode == 2


def test_jobs_cancel_of_a_running_job(api, hive, slow_hub):
    repo = _repo(slow_hub, 64 * MiB)
    job_id = api.post("/v1/jobs", json={"operation": "model_download", "model": repo}).json()[
        "job_id"
    ]
    wait_for(lambda: job(api, job_id)["state"] == "running")
    result = rbee(hive.url, "jobs", "cancel", job_id, "--wait")
    assert result.returncode == 0 and f"cancelled job {job_id}" in result.stderr
    assert job(api, job_id)["state"] == "cancelled"


# -- inference ---------------------------------------------------------------------------------

NO_INFERENCE = importlib.util.find_spec("vllm") is None or "infer" not in OPERATION_NAMES


def test_the_default_model_is_the_embedded_one():
    from actors.adapters.embedded import LOCAL_ID
    from serve_app.client.cli import DEFAULT_MODEL

    assert DEFAULT_MODEL == LOCAL_ID


@pytest.mark.skipif(NO_INFERENCE, reason="needs vllm and a server with the 'infer' operation")
def test_infer_prints_tokens_while_the_job_runs_and_ctrl_c_cancels_it(api, hive, worker):
    args = ("--model", worker["model"], "--max-tokens", "30000", "--ignore-eos")
    child = spawn(hive.url, "infer", "Once upon a time", *args)
    child.expect(r"\S")  # text on the terminal ...
    newest = api.get("/v1/jobs", params={"operation": "infer", "limit": 1}).json()["jobs"][0]
    assert newest["state"] == "running"  # ... while the job is still generating
    child.sendintr()
    child.expect(f"cancelled job {newest['job_id']}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert job(api, newest["job_id"])["state"] == "cancelled"


@pytest.mark.skipif(NO_INFERENCE, reason="needs vllm and a server with the 'infer' operation")
def test_infer_text_and_json_tokens(hive, worker):
    args = ("--model", worker["model"], "--max-tokens", "12", "--ignore-eos", "--seed", "7")
    human = rbee(hive.url, "infer", "Hello", *args)
    assert human.returncode == 0, human.stderr
    assert human.stdout.strip() and human.stdout.endswith("\n")
    streamed = rbee(hive.url, "infer", "Hello", *args, "--json")
    assert streamed.returncode == 0, streamed.stderr
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    tokens = [x["data"] for x in lines if x["event"] == "token"]
    assert [t["index"] for t in tokens] == sorted(t["index"] for t in tokens)
    assert tokens[-1]["index"] == 12
    assert lines[-1]["event"] == "result"
    assert lines[-1]["data"]["text"] == "".join(t["text"] for t in tokens)


@pytest.mark.skipif(NO_INFERENCE, reason="needs vllm and a server with the 'infer' operation")
def test_worker_list_shows_the_running_worker(hive, worker):
    listed = rbee(hive.url, "worker", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert worker["worker_id"] in [w["worker_id"] for w in json.loads(listed.stdout)["workers"]]
    table = rbee(hive.url, "worker", "list")
    assert worker["worker_id"] in table.stdout and worker["model"] in table.stdout
    missing = rbee(hive.url, "worker", "stop", "w-never")
    assert missing.returncode == 1
    one_error_line(missing)


def test_the_view_writes_each_token_as_it_arrives(capsys):
    view = cli_render.JobView(narration=False)
    view.started("job-1", "infer")
    shown = []
    for i, text in enumerate(["Once", " upon", " a time"], 1):
        view.show(StreamEvent(i, Token(text, i)))
        shown.append(capsys.readouterr().out)
    view.show(StreamEvent(4, Result({"text": "Once upon a time"})))
    view.close()
    assert shown == ["Once", " upon", " a time"]
    assert capsys.readouterr().out == "\n"


def test_the_view_in_json_mode_prints_one_object_per_event(capsys):
    view = cli_render.JobView(json_lines=True)
    view.started("job-1", "download")
    events = [
        Narration("download", "plan", "resolving", ts=1.0),
        Progress(bytes_done=1, bytes_total=2, rate_bps=1.0, eta_s=1.0, file="a"),
        Result({"path": "/p"}),
    ]
    for i, event in enumerate(events, 1):
        view.show(StreamEvent(i, event))
    view.close()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["id"], x["event"]) for x in lines] == [
        (1, "narration"),
        (2, "progress"),
        (3, "result"),
    ]
    assert lines[2]["data"] == {"path": "/p"} and view.result == {"path": "/p"}


def test_the_download_bar_shows_bytes_rate_and_eta():
    screen = io.StringIO()
    view = cli_render.JobView(console=Console(file=screen, force_terminal=True, width=120))
    for i, done in enumerate([0, MiB, 2 * MiB], 1):
        view.show(StreamEvent(i, Progress(done, 4 * MiB, float(MiB), 2.0, "model.bin")))
    view.close()
    text = screen.getvalue()
    assert "model.bin" in text and "2.1/4.2 MB" in text
    assert "1.0 MB/s" in text and "0:00:02" in text  # the server's rate and ETA
