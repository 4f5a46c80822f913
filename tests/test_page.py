"""The web page (SPEC §12) in a real headless Chromium, driven by Playwright, against the real
server: what a person running a hive sees and clicks.

Chromium is Debian's (``make test`` installs it; Playwright's own browser download is never
used). Without it these tests fail: they never skip. Screenshots of the page go to
``build/screenshots`` (or ``$RBEE_SCREENSHOTS``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.helpers import job, random_model, submit, wait_for, wait_state
from tests.servers import serving

pytestmark = pytest.mark.ray

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("RBEE_SCREENSHOTS") or ROOT / "build" / "screenshots")
CHROMIUM = os.environ.get("RBEE_TEST_CHROMIUM", "/usr/bin/chromium")
# As root and on a machine with no way out: no sandbox, no GPU, and none of Chromium's own
# calls home (each would be refused, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install chromium)")
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


class Watched:
    """A page and what went wrong in it: script errors, console errors, refused requests."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        # A request the page expects to fail (a 401, a server stopped on purpose) is logged
        # by Chromium as a console error: the tests that cause one clear the list.
        if message.type == "error":
            self.errors.append(f"console: {message.text}")


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    watched = Watched(context.new_page())
    yield watched
    context.close()


@pytest.fixture
def page(watched: Watched, hive) -> Iterator[Page]:
    """The session server's page, loaded, its jobs feed up; no script error by the end."""
    watched.page.goto(hive.url)
    expect(watched.page.locator("#count")).to_contain_text(re.compile(r"\d+ jobs? · \d+ shown"))
    yield watched.page
    assert watched.errors == []


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def row(page: Page, job_id: str) -> Any:
    return page.locator(f'#jobs tr[data-job-id="{job_id}"]')


def fills(page: Page, job_id: str) -> float:
    """How far the row's progress bar is filled, in percent (0 if not yet)."""
    width = row(page, job_id).locator(".progress .fill").evaluate("e => e.style.width")
    return float(width.rstrip("%") or 0) if width else 0.0


def job_of(page: Page, model: str, timeout: float = 20) -> str:
    """The id of the newest row of ``model``."""
    found = page.locator("#jobs tr", has=page.locator(".model", has_text=model)).first
    expect(found).to_be_visible(timeout=timeout * 1000)
    return str(found.get_attribute("data-job-id"))


MARK_CANCELLING = """id => {
  const tr = document.querySelector(`#jobs tr[data-job-id="${id}"]`);
  window.__cancellingAfterMs = null;
  tr.addEventListener("click", () => { window.__clickedAt = performance.now(); }, {capture: true});
  new MutationObserver(() => {
    if (tr.dataset.cancelling === "true" && window.__cancellingAfterMs === null)
      window.__cancellingAfterMs = performance.now() - window.__clickedAt;
  }).observe(tr, {attributes: true});
}"""


def blobs(cache_dir: Path, model: str) -> list[Path]:
    folder = cache_dir / f"models--{model.replace('/', '--')}" / "blobs"
    return list(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def slow_hub(hub):
    hub.throttle_bps = 256 << 10
    yield hub
    hub.throttle_bps = None


# --- downloads and cancel -------------------------------------------------------------------


def test_a_download_started_on_the_page_moves_and_its_cancel_removes_the_partial(
    page: Page, api: httpx.Client, slow_hub, cache_dir: Path
):
    model = random_model(slow_hub, 3 * MiB, "org/page")
    page.fill("#download-model", model)
    page.click("#download-form button[type=submit]")
    job_id = job_of(page, model)
    expect(row(page, job_id)).to_have_attribute("data-state", "running", timeout=20_000)

    seen: list[float] = []

    def moved() -> bool:
        seen.append(fills(page, job_id))
        return len(set(seen)) >= 3 and seen[-1] > seen[0]

    wait_for(moved, timeout=20, interval=0.3)
    assert 0 < seen[-1] < 100
    expect(row(page, job_id).locator(".progress-text")).to_contain_text(re.compile(r"KiB/s|MiB/s"))
    shot(page, "download-running")

    # At once, before the server answers: the row says it is being cancelled. (Noted as it
    # happens: a fast server may end the job before a poll of the row would see it.)
    page.evaluate(MARK_CANCELLING, job_id)
    row(page, job_id).locator("button.cancel").click()
    wait_for(lambda: page.evaluate("window.__cancellingAfterMs") is not None, timeout=5)
    assert page.evaluate("window.__cancellingAfterMs") < 1000
    expect(row(page, job_id)).to_have_attribute("data-state", "cancelled", timeout=5_000)
    expect(row(page, job_id).locator("button.cancel")).to_have_count(0)
    assert job(api, job_id)["state"] == "cancelled"
    left = blobs(cache_dir, model)
    assert [p for p in left if p.name.endswith(".incomplete")] == []
    assert [p for p in left if p.stat().st_size >= MiB] == []  # model.bin never landed


def test_bulk_cancel_stops_the_filtered_jobs_and_leaves_the_others(
    page: Page, api: httpx.Client, slow_hub
):
    # Two downloads run (the session's concurrency), two wait; a finished job stays as it is.
    done = submit(api, {"operation": "hive_list"})
    downloads = [
        submit(api, {"operation": "model_download", "model": random_model(slow_hub, 2 * MiB)})
        for _ in range(4)
    ]
    wait_state(api, done, "completed")
    for job_id in downloads:
        expect(row(page, job_id)).to_be_visible(timeout=10_000)
    page.select_option("#filter-operation", "model_download")
    expect(row(page, done)).to_be_hidden()
    page.select_option("#filter-state", "")
    expect(page.locator("#bulk-cancel")).to_contain_text(re.compile(r"Cancel [4-9]\d* shown"))
    page.click("#bulk-cancel")
    page.click("#bulk-confirm")
    for job_id in downloads:
        expect(row(page, job_id)).to_have_attribute("data-state", "cancelled", timeout=5_000)
    assert [job(api, j)["state"] for j in downloads] == ["cancelled"] * 4
    assert job(api, done)["state"] == "completed"
    page.select_option("#filter-operation", "")
    expect(row(page, done)).to_be_visible()
    expect(row(page, done)).to_have_attribute("data-state", "completed")


# --- inference --------------------------------------------------------------------------------


def test_an_infer_started_on_the_page_shows_its_tokens_as_they_come(
    page: Page, api: httpx.Client, worker, tiny_model: str
):
    expect(page.locator(f'#infer-model option[value="{tiny_model}"]')).to_have_count(1, timeout=15_000)
    page.select_option("#infer-model", tiny_model)
    prompt = "Tell me a long story about the sea and the ships on it"
    page.fill("#infer-prompt", prompt)
    page.fill("#infer-max-tokens", "64")
    requests: list[Any] = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.method == "POST" else None)
    page.click("#infer-form button[type=submit]")
    expect(page.locator("#panel")).to_be_visible(timeout=5_000)
    tokens = page.locator("#panel-tokens")
    expect(tokens).not_to_be_empty(timeout=30_000)
    job_id = str(page.locator("#jobs tr.selected").get_attribute("data-job-id"))
    shot(page, "infer-running")
    expect(page.locator("#panel-end")).to_have_text("completed", timeout=60_000)
    expect(row(page, job_id)).to_have_attribute("data-state", "completed")
    expect(row(page, job_id).locator(".progress-text")).to_contain_text("tokens")
    expect(page.locator("#panel-result")).to_be_visible()
    # The panel and the row count the tokens the engine made.
    made = json.loads(page.locator("#panel-result").text_content() or "{}")["usage"]
    counted = re.compile(rf"(^|\D){made['completion_tokens']} tokens")
    expect(page.locator("#panel-progress")).to_contain_text(counted)
    expect(row(page, job_id).locator(".progress-text")).to_contain_text(counted)
    # What the panel shows is what the job made, token for token.
    events = api.get(f"/v1/jobs/{job_id}/stream", timeout=30).text
    assert tokens.text_content() == "".join(e["text"] for e in _token_events(events))
    assert row(page, job_id).locator("button.cancel").count() == 0
    # Sent as a chat message by default (the model's chat template applies), then as raw text.
    def sent() -> list[dict[str, Any]]:
        return [r for r in requests if isinstance(r, dict) and r.get("operation") == "infer"]

    (chat,) = sent()
    assert chat["messages"] == [{"role": "user", "content": prompt}] and "prompt" not in chat
    page.select_option("#infer-as", "prompt")
    page.click("#infer-form button[type=submit]")
    wait_for(lambda: len(sent()) == 2, timeout=10)
    assert sent()[1]["prompt"] == prompt and "messages" not in sent()[1]
    plain = page.locator(f"#jobs tr.selected:not([data-job-id='{job_id}'])")
    expect(plain).to_have_attribute("data-state", "completed", timeout=60_000)


def test_a_long_generation_streams_into_the_panel_and_its_cancel_stops_it(
    page: Page, api: httpx.Client, worker, tiny_model: str
):
    page.evaluate(WATCH_TOKENS)
    op = {"operation": "infer", "model": tiny_model, "prompt": "Once upon a time in a hive",
          "max_tokens": 30_000, "ignore_eos": True}  # fmt: skip
    job_id = submit(api, op)
    row(page, job_id).click()
    expect(page.locator("#panel-state")).to_have_text("running", timeout=30_000)
    # The text grows step by step while the job runs, and the row counts its tokens.
    wait_for(lambda: len(set(page.evaluate("window.__tokenLengths"))) >= 10, timeout=30)
    expect(row(page, job_id).locator(".progress-text")).to_contain_text(re.compile(r"[1-9]\d* tokens"))
    page.click("#panel-cancel")
    expect(page.locator("#panel-end")).to_have_text("cancelled", timeout=5_000)
    expect(row(page, job_id)).to_have_attribute("data-state", "cancelled")
    grown = page.evaluate("window.__tokenLengths")
    assert grown == sorted(grown)
    page.wait_for_timeout(500)
    assert page.evaluate("window.__tokenLengths")[-1] == grown[-1]  # nothing after the end
    record = job(api, job_id)
    assert record["state"] == "cancelled"
    assert record["error"]["code"] == "CANCELLED"


WATCH_TOKENS = """() => {
  window.__tokenLengths = [];
  const out = document.getElementById("panel-tokens");
  new MutationObserver(() => window.__tokenLengths.push(out.textContent.length))
    .observe(out, {childList: true, characterData: true, subtree: true});
}"""


def _token_events(body: str) -> list[dict[str, Any]]:
    from serve_app import sse

    parser, found = sse.Parser(), []
    for line in body.splitlines():
        frame = parser.feed(line)
        if frame is not None and frame.kind == "token":
            found.append(frame.json())
    return found


# --- every state, the hives, the forms ------------------------------------------------------


def test_jobs_in_every_state_with_screenshots(page: Page, api: httpx.Client, slow_hub):
    """The page with a job of each state, shot whole and filtered by each state."""
    completed = submit(api, {"operation": "hive_list"})
    failed = submit(api, {"operation": "model_get", "model": "nobody/nothing"})
    running = [
        submit(api, {"operation": "model_download", "model": random_model(slow_hub, 4 * MiB)})
        for _ in range(2)
    ]
    queued = submit(api, {"operation": "model_download", "model": random_model(slow_hub, MiB)})
    cancelled = submit(api, {"operation": "model_download", "model": random_model(slow_hub, MiB)})
    assert api.delete(f"/v1/jobs/{cancelled}").status_code == 200
    states = {completed: "completed", failed: "failed", queued: "queued", cancelled: "cancelled"}
    states |= dict.fromkeys(running, "running")
    try:
        for job_id, state in states.items():
            expect(row(page, job_id)).to_have_attribute("data-state", state, timeout=15_000)
        wait_for(lambda: all(fills(page, j) > 0 for j in running), timeout=20, interval=0.3)
        assert row(page, failed).get_attribute("title").startswith("MODEL_NOT_FOUND")
        expect(row(page, queued).locator("button.cancel")).to_have_count(1)
        expect(row(page, completed).locator("button.cancel")).to_have_count(0)
        for job_id in running:  # a rate once a second of bytes has been measured
            expect(row(page, job_id).locator(".progress-text")).to_contain_text("/s")
        row(page, running[0]).click()
        expect(page.locator("#panel-narration li").first).to_be_visible(timeout=5_000)
        shot(page, "jobs")
        page.click("#panel-close")
        expect(page.locator("#panel")).to_be_hidden()
        for state in ("queued", "running", "completed", "failed", "cancelled"):
            page.select_option("#filter-state", state)
            shown = page.locator("#jobs tbody tr:visible")
            expect(shown.first).to_be_visible()
            assert set(shown.evaluate_all("rows => rows.map(r => r.dataset.state)")) == {state}
            shot(page, f"jobs-{state}")
        page.select_option("#filter-state", "")
    finally:
        for job_id in [*running, queued]:
            api.post(f"/v1/jobs/{job_id}/cancel")


def test_the_hives_show_their_workers_and_a_worker_stops_from_the_page(
    page: Page, api: httpx.Client, worker, tiny_model: str
):
    spawn = {"operation": "worker_spawn", "model": tiny_model, "device": "cpu", "worker_id": "w-page"}
    wait_state(api, submit(api, spawn), "completed", timeout=180)
    hive = page.locator("#hives .hive").first
    expect(hive.locator('.worker[data-worker-id="w-main"]')).to_be_visible(timeout=15_000)
    expect(hive).to_contain_text(tiny_model)
    page.locator("#hives").scroll_into_view_if_needed()
    shot(page, "hives")
    doomed = hive.locator('.worker[data-worker-id="w-page"]')
    expect(doomed).to_be_visible(timeout=15_000)
    doomed.locator("button.worker-stop").click()
    expect(doomed).to_have_count(0, timeout=30_000)
    expect(hive.locator('.worker[data-worker-id="w-main"]')).to_be_visible()

    def listed() -> list[str]:
        return [w["worker_id"] for h in api.get("/v1/hives").json()["hives"] for w in h["workers"]]

    assert "w-page" not in listed() and "w-main" in listed()


def test_a_refused_form_shows_the_servers_message_as_text(page: Page, watched: Watched):
    hostile = 'x/<img src=x onerror="window.pwned=1">'
    page.fill("#download-model", hostile)
    page.click("#download-form button[type=submit]")
    expect(page.locator("#form-error")).to_contain_text("<img src=x", timeout=5_000)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#form-error img").count() == 0
    assert [e for e in watched.errors if "422" not in e] == []
    watched.errors.clear()  # Chromium logs the refused request: expected here


# --- a token, and a server that goes away ---------------------------------------------------


def test_the_token_guards_the_page_and_the_banner_when_the_server_is_gone(
    browser: Browser, tmp_path: Path
):
    """With a token set, nothing of the page comes without it: the browser is asked for it
    (HTTP Basic: the token as the password), a wrong one is refused, the right one opens the
    page, whose requests then carry it; it never lands in the page's storage."""
    with serving(tmp_path, env={"RBEE_API_TOKEN": "s3cret-page"}) as served:
        refused = httpx.get(served.url, timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHORIZED"
        assert refused.headers["www-authenticate"].startswith('Basic realm="rbee"')
        # The browser is asked: with no token to give, it gets nothing of the page; with a
        # wrong one, the 401 again.
        context = browser.new_context()
        try:
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                context.new_page().goto(served.url)
        finally:
            context.close()
        context = browser.new_context(http_credentials={"username": "rbee", "password": "wrong"})
        try:
            again = context.new_page().goto(served.url)
            assert again is not None and again.status == 401
            assert again.json()["error"]["code"] == "UNAUTHORIZED"
        finally:
            context.close()
        right = {"username": "rbee", "password": "s3cret-page"}
        context = browser.new_context(viewport={"width": 1280, "height": 800}, http_credentials=right)
        try:
            _offline_after_a_token(Watched(context.new_page()), served)
        finally:
            context.close()


def _offline_after_a_token(watched: Watched, served: Any) -> None:
    page = watched.page
    page.goto(served.url)
    dialog = page.locator("#token-dialog")
    expect(page.locator("#count")).to_contain_text(re.compile(r"\d+ jobs? · \d+ shown"), timeout=10_000)
    expect(page.locator("#hives .hive")).to_have_count(1, timeout=15_000)
    expect(dialog).to_be_hidden()  # the browser had it: the page never asks again
    page.reload()
    expect(page.locator("#hives .hive")).to_have_count(1, timeout=15_000)
    expect(dialog).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0 and page.evaluate("localStorage.length") == 0
    job_id = submit(
        httpx.Client(base_url=served.url, headers={"Authorization": "Bearer s3cret-page"}),
        {"operation": "hive_list"},
    )
    expect(row(page, job_id)).to_have_attribute("data-state", "completed", timeout=15_000)
    expect(page.locator("#banner")).to_be_hidden()
    assert page.evaluate("navigator.serviceWorker.ready.then(() => true)")

    os.killpg(served.process.pid, signal.SIGTERM)  # its supervisor stops it
    served.process.wait(timeout=30)
    banner = page.locator("#banner")
    expect(banner).to_be_visible(timeout=10_000)
    expect(banner).to_contain_text("Cannot reach the rbee server")
    expect(row(page, job_id)).to_be_visible()  # what was there stays, never a blank page
    shot(page, "offline")
    # A reload with the server gone: the page still comes (its own files are kept), and
    # says the server cannot be reached.
    page.reload()
    expect(banner).to_be_visible(timeout=10_000)
    expect(banner).to_contain_text("Cannot reach the rbee server")
    expect(page.locator("#download-form")).to_be_visible()
    # The failed requests of a stopped server are expected here (Chromium logs each).
    watched.errors = [e for e in watched.errors if not e.startswith("console:")]
    assert watched.errors == []


# --- 500 jobs ----------------------------------------------------------------------------------

LONG_TASKS = """
window.__long = [];
new PerformanceObserver(list => {
  for (const entry of list.getEntries()) window.__long.push(entry.duration);
}).observe({type: "longtask", buffered: true});
"""


def test_the_page_stays_smooth_with_500_jobs(watched: Watched, hive, api: httpx.Client):
    """Timing goals are in ``bench/page.py``; here generous bounds, so a regression shows."""
    page = watched.page
    page.add_init_script(LONG_TASKS)
    have = len(api.get("/v1/jobs", params={"limit": 600}).json()["jobs"])
    made = [submit(api, {"operation": "worker_list"}) for _ in range(max(0, 520 - have))]
    for job_id in made:
        wait_state(api, job_id, "completed", "failed")
    started = time.monotonic()
    page.goto(hive.url)
    wait_for(lambda: page.evaluate("window.rbeePage.rendered()") >= 500, timeout=20, interval=0.05)
    loaded = time.monotonic() - started
    # Jobs keep coming while 500 are shown: each is on the page within a second or so.
    for _ in range(50):
        job_id = submit(api, {"operation": "worker_list"})
    expect(row(page, job_id)).to_have_attribute("data-state", "completed", timeout=10_000)
    switched = time.monotonic()
    page.select_option("#filter-operation", "worker_list")
    page.select_option("#filter-state", "completed")
    page.select_option("#filter-state", "")
    page.select_option("#filter-operation", "")
    switching = time.monotonic() - switched
    page.mouse.wheel(0, 20_000)
    page.wait_for_timeout(300)
    long_tasks = page.evaluate("window.__long")
    print(f"500 jobs: on screen in {loaded:.2f}s, filters {switching:.2f}s, long tasks {long_tasks}")
    assert loaded < 10 and switching < 5
    assert max(long_tasks, default=0) < 1_000, long_tasks
    assert watched.errors == []


def test_a_hostile_file_name_from_the_hub_shows_as_text(page: Page, api: httpx.Client, hub):
    """What a hub sends is untrusted: a file named like markup is shown as its name."""
    name = '<img src=x onerror="window.pwned=1">.json'
    repo = random_model(hub, 1024, "org/markup")
    hub.add_repo(repo, {"config.json": b"{}", name: b"{}"})
    job_id = submit(api, {"operation": "model_download", "model": repo})
    row(page, job_id).click()
    expect(page.locator("#panel-end")).to_have_text(re.compile("completed|failed"), timeout=20_000)
    expect(page.locator("#panel")).to_contain_text("<img src=x")
    assert page.locator("#panel img, #jobs img").count() == 0
    assert page.evaluate("window.pwned") is None
