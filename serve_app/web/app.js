// rbee web page: the jobs board (live), one job's events, the two job forms, the hives.
// Everything shown comes from the server and is written as text, never as HTML: a job's
// output or a hub's file name is untrusted and must never run.

const TOKEN_KEY = "rbee.token";
const FEED_URL = "/v1/jobs/watch?limit=500";
const LIVE = new Set(["queued", "running"]);
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const HIVE_OPS = new Set(["worker_spawn", "worker_stop", "model_download", "model_delete"]);
const MODEL_OPS = new Set(["model_download", "model_delete"]);
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 5000;
const HIVES_EVERY_MS = 5000;
const MODELS_EVERY_MS = 10000;
const TOAST_MS = 5000;

const $ = (id) => document.getElementById(id);
const dom = {
  count: $("count"),
  banner: $("banner"),
  toast: $("toast"),
  filterState: $("filter-state"),
  filterOperation: $("filter-operation"),
  bulkCancel: $("bulk-cancel"),
  bulkConfirm: $("bulk-confirm"),
  bulkAbort: $("bulk-abort"),
  tbody: document.querySelector("#jobs tbody"),
  empty: $("jobs-empty"),
  panel: $("panel"),
  panelTitle: $("panel-title"),
  panelState: $("panel-state"),
  panelCancel: $("panel-cancel"),
  panelClose: $("panel-close"),
  panelProgress: $("panel-progress"),
  panelNarration: $("panel-narration"),
  panelTokens: $("panel-tokens"),
  panelResult: $("panel-result"),
  panelError: $("panel-error"),
  panelEnd: $("panel-end"),
  downloadForm: $("download-form"),
  downloadHive: $("download-hive"),
  inferForm: $("infer-form"),
  inferModel: $("infer-model"),
  formError: $("form-error"),
  hiveList: $("hive-list"),
  tokenDialog: $("token-dialog"),
  tokenForm: $("token-form"),
  tokenInput: $("token-input"),
  tokenError: $("token-error"),
};

// ---- formatting ------------------------------------------------------------------------

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

function formatBytes(value) {
  let n = Number(value);
  if (!Number.isFinite(n) || n < 0) return "?";
  let unit = 0;
  while (n >= 1024 && unit < BYTE_UNITS.length - 1) {
    n /= 1024;
    unit += 1;
  }
  if (unit === 0) return `${Math.round(n)} B`;
  return `${n < 10 ? n.toFixed(1) : Math.round(n)} ${BYTE_UNITS[unit]}`;
}

function formatSpan(seconds) {
  const s = Math.max(0, Number(seconds) || 0);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

function formatClock(ts) {
  let date;
  if (typeof ts === "number") date = new Date(ts > 1e12 ? ts : ts * 1000);
  else if (typeof ts === "string") date = new Date(ts);
  if (!date || Number.isNaN(date.getTime())) return "";
  return date.toLocaleTimeString([], { hour12: false });
}

/** Anything the server sent, as short text: hive fields have no fixed shape. */
function describe(value) {
  if (value === null || value === undefined || value === "") return "—";
  if (Array.isArray(value)) return value.length ? `${value.length} (${value.join(", ")})` : "0";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** A GPU count the server gives as a number or as a list of GPU indices. */
function gpuCount(value) {
  if (Array.isArray(value)) return value.length ? `${value.length} (#${value.join(", #")})` : "0";
  return describe(value);
}

function nowSeconds() {
  return Date.now() / 1000;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// ---- server access: token, 401, offline ------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

let memoryToken = ""; // when sessionStorage is unavailable (some private modes)
const auth = { blocked: false }; // a 401 is waiting for the user: background polls pause

function storedToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return memoryToken;
  }
}

function storeToken(token) {
  memoryToken = token;
  try {
    sessionStorage.setItem(TOKEN_KEY, token);
  } catch {
    // the in-memory copy serves this page
  }
}

function isAbort(err) {
  return err?.name === "AbortError";
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const error = body?.error ?? {};
  return new ApiError(response.status, error.code ?? `HTTP_${response.status}`,
    error.message ?? `${response.status} ${response.statusText}`.trim());
}

/** fetch() with the token; a rejected fetch means the server cannot be reached, any answer
 * means it can. A 401 asks for a token and throws. */
async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
  const token = storedToken();
  const sent = new Headers(headers);
  if (token) sent.set("Authorization", `Bearer ${token}`);
  if (body !== undefined) sent.set("Content-Type", "application/json");
  let response;
  try {
    response = await fetch(path, {
      method, headers: sent, signal, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (!isAbort(err)) setOffline(true);
    throw err;
  }
  setOffline(false);
  if (response.status === 401) {
    const err = await errorFrom(response);
    // An answer to an older token says nothing about the one the user just gave.
    if (token === storedToken()) needToken();
    throw err;
  }
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  if (!response.ok) throw await errorFrom(response);
  try {
    return await response.json();
  } catch {
    return {};
  }
}

let offline = false;

function setOffline(value) {
  if (value === offline) return;
  offline = value;
  if (value) dom.banner.textContent = `Cannot reach the rbee server at ${location.origin} — retrying…`;
  dom.banner.hidden = !value;
  document.body.classList.toggle("offline", value);
  if (!value) {
    // Back: what could not be loaded meanwhile (at first load, all of it) is asked again.
    refreshHives();
    refreshModels();
  }
}

let toastTimer = 0;

function toast(message) {
  dom.toast.textContent = message;
  dom.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { dom.toast.hidden = true; }, TOAST_MS);
}

function needToken() {
  auth.blocked = true;
  // A stored token got this 401, so it is the wrong one; with none, the server just asks.
  dom.tokenError.textContent = storedToken() ? "That token was refused." : "";
  if (!dom.tokenDialog.open) {
    dom.tokenInput.value = "";
    dom.tokenDialog.showModal();
  }
}

function onTokenSubmit(event) {
  event.preventDefault();
  const token = dom.tokenInput.value.trim();
  // A header value cannot carry other characters: fetch would throw before sending.
  if (!/^[\x21-\x7e]+$/.test(token)) {
    dom.tokenError.textContent = "A token is plain ASCII text without spaces.";
    return;
  }
  storeToken(token);
  dom.tokenDialog.close();
  auth.blocked = false;
  restartAll();
}

// ---- SSE, read with fetch (EventSource cannot send the Authorization header) ------------

/** Lines in, whole frames out; a half-received frame is never handed on. */
function sseParser(onFrame) {
  let id = null;
  let event = null;
  let data = [];
  return (line) => {
    if (line === "") {
      if (id !== null || event !== null || data.length) onFrame({ id, event, data: data.join("\n") });
      id = null;
      event = null;
      data = [];
      return;
    }
    if (line.startsWith(":")) return; // keep-alive
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "id") id = value;
    else if (name === "event") event = value;
    else if (name === "data") data.push(value);
  };
}

/** Reads an event-stream response to its end (resolves) or its break (rejects). */
async function readSse(response, onFrame) {
  if (!response.body) throw new Error("the stream has no body");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const feed = sseParser(onFrame);
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let start = 0;
      for (let newline = buffer.indexOf("\n"); newline >= 0; newline = buffer.indexOf("\n", start)) {
        const end = newline > start && buffer.charCodeAt(newline - 1) === 13 ? newline - 1 : newline;
        feed(buffer.slice(start, end));
        start = newline + 1;
      }
      buffer = buffer.slice(start);
    }
  } finally {
    reader.releaseLock();
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

// ---- jobs feed -------------------------------------------------------------------------

const feed = { lastId: "", generation: 0, controller: null };
let pending = emptyBatch();
let flushQueued = false;

function emptyBatch() {
  return { reset: null, upserts: new Map(), forgotten: new Set() };
}

async function runFeed() {
  const generation = ++feed.generation;
  feed.controller?.abort();
  const controller = new AbortController();
  feed.controller = controller;
  let delay = BACKOFF_FIRST_MS;
  while (generation === feed.generation) {
    try {
      const headers = feed.lastId ? { "Last-Event-ID": feed.lastId } : {};
      const response = await api(FEED_URL, { headers, signal: controller.signal });
      if (!response.ok) throw await errorFrom(response);
      delay = BACKOFF_FIRST_MS;
      await readSse(response, onFeedFrame);
    } catch (err) {
      if (controller.signal.aborted) return;
      if (err.status === 401) return; // the token dialog restarts the feed
      // A position the server refuses will not work next time either: start afresh.
      if (err.status >= 400 && err.status < 500) feed.lastId = "";
    }
    if (generation !== feed.generation) return;
    await sleep(delay, controller.signal);
    delay = Math.min(delay * 2, BACKOFF_MAX_MS);
  }
}

function onFeedFrame(frame) {
  if (frame.event !== "jobs") return;
  const message = parseJson(frame.data);
  if (!message || typeof message !== "object") return;
  if (frame.id) feed.lastId = frame.id;
  queueChanges(message);
}

/** Changes pile up between frames and are drawn once per frame, however fast they come;
 * coalesced, so a tab in the background (no frames) holds one row per job at most. */
function queueChanges(message) {
  const rows = Array.isArray(message.jobs) ? message.jobs.filter((r) => r && r.job_id) : [];
  if (message.reset) {
    pending = emptyBatch();
    pending.reset = rows;
  } else {
    for (const row of rows) {
      pending.upserts.set(row.job_id, row);
      pending.forgotten.delete(row.job_id);
    }
    for (const id of Array.isArray(message.forgotten) ? message.forgotten : []) {
      pending.forgotten.add(id);
      pending.upserts.delete(id);
    }
  }
  if (!flushQueued) {
    flushQueued = true;
    requestAnimationFrame(flushFeed);
  }
}

function flushFeed() {
  flushQueued = false;
  const batch = pending;
  pending = emptyBatch();
  const finished = [];
  if (batch.reset) applyReset(batch.reset, finished);
  for (const id of batch.forgotten) removeJob(id);
  for (const row of batch.upserts.values()) upsertJob(row, finished);
  refreshView();
  if (panel.jobId) renderPanelMeta();
  onJobsFinished(finished);
}

// ---- jobs table: model and rendering ---------------------------------------------------

/** job_id → { row, tr, cells, view }; view holds what the DOM shows, to write only changes. */
const jobs = new Map();
/** The jobs newest first, as the table shows them. */
let order = [];
const cancelling = new Set(); // ids whose cancel the user asked for, before the server says so

function createdAt(row) {
  return Number(row.created_at) || 0;
}

function createJob(row) {
  const tr = document.createElement("tr");
  tr.dataset.jobId = row.job_id;
  tr.tabIndex = 0;
  const cells = {};
  for (const name of ["state", "operation", "model", "progress", "age", "actions"]) {
    cells[name] = tr.appendChild(element("td", name));
  }
  cells.badge = cells.state.appendChild(element("span", "badge"));
  cells.progressParts = progressParts(cells.progress);
  if (row.job_id === panel.jobId) tr.classList.add("selected");
  const job = { row, tr, cells, view: {}, cancel: null };
  renderJob(job);
  return job;
}

function progressParts(container) {
  const bar = container.querySelector(".bar") ?? container.appendChild(element("div", "bar"));
  const fill = bar.querySelector(".fill") ?? bar.appendChild(element("div", "fill"));
  const text = container.querySelector(".progress-text")
    ?? container.appendChild(element("span", "progress-text"));
  return { bar, fill, text };
}

function isCancelling(row) {
  return LIVE.has(row.state) && (cancelling.has(row.job_id) || row.cancel_requested === true);
}

function setText(view, key, node, text) {
  setProp(view, key, node, "textContent", text);
}

/** Writes a DOM property only when it changes: same-value writes still cost style work. */
function setProp(view, key, node, property, value) {
  if (view[key] === value) return;
  view[key] = value;
  node[property] = value;
}

function renderJob(job) {
  const { row, tr, cells, view } = job;
  const live = LIVE.has(row.state);
  const stopping = isCancelling(row);
  setProp(view, "state", tr.dataset, "state", row.state);
  if (view.cancelling !== stopping) {
    view.cancelling = stopping;
    if (stopping) tr.dataset.cancelling = "true";
    else delete tr.dataset.cancelling;
  }
  setText(view, "badge", cells.badge, stopping ? "cancelling…" : row.state);
  setProp(view, "badgeClass", cells.badge, "className", stopping ? "badge cancelling" : `badge state-${row.state}`);
  setText(view, "operation", cells.operation, String(row.operation ?? ""));
  setText(view, "model", cells.model, String(row.model || row.hive_id || "—"));
  renderProgress(view, cells.progressParts, progressOf(row));
  const title = row.state === "failed" && row.error
    ? `${row.error.code ?? "ERROR"}: ${row.error.message ?? ""}` : "";
  if (view.title !== title) {
    view.title = title;
    if (title) tr.title = title;
    else tr.removeAttribute("title");
  }
  if (live && !job.cancel) {
    job.cancel = cells.actions.appendChild(element("button", "cancel", "Cancel"));
    job.cancel.type = "button";
  } else if (!live && job.cancel) {
    job.cancel.remove();
    job.cancel = null;
  }
  if (job.cancel && job.cancel.disabled !== stopping) job.cancel.disabled = stopping;
}

/** What a progress cell shows: a bar percentage (null: no bar) and a line of text. */
function progressOf(row) {
  const tokens = Number(row.tokens) || 0;
  if (row.operation === "infer" && (tokens > 0 || row.state === "running")) {
    const max = Number(row.max_tokens) || 0;
    return { pct: max > 0 ? Math.min(100, (tokens / max) * 100) : null, text: `${tokens} tokens` };
  }
  const p = row.progress;
  const done = row.state === "completed";
  if (!p || typeof p !== "object") {
    return { pct: done && row.operation === "model_download" ? 100 : null, text: "" };
  }
  const total = Number(p.bytes_total) || 0;
  const have = Number(p.bytes_done) || 0;
  const parts = [total > 0 ? `${formatBytes(have)} / ${formatBytes(total)}` : formatBytes(have)];
  parts.push(`${formatBytes(p.rate_bps ?? 0)}/s`);
  if (p.eta_s !== null && p.eta_s !== undefined && !TERMINAL.has(row.state)) {
    parts.push(`ETA ${formatSpan(Math.ceil(Number(p.eta_s)))}`);
  }
  const pct = done ? 100 : total > 0 ? Math.min(100, (have / total) * 100) : 0;
  return { pct, text: parts.join(" · ") };
}

function renderProgress(view, parts, { pct, text }) {
  const hidden = pct === null;
  setProp(view, "barHidden", parts.bar, "hidden", hidden);
  setProp(view, "width", parts.fill.style, "width", hidden ? "0%" : `${pct.toFixed(1)}%`);
  setText(view, "progressText", parts.text, text);
}

function renderAge(job, now) {
  setText(job.view, "age", job.cells.age, formatSpan(now - createdAt(job.row)));
}

/** Updates or adds one job of a change (a job new here and already ended is news too). */
function upsertJob(row, finished) {
  const job = jobs.get(row.job_id);
  if (!job) {
    const created = createJob(row);
    jobs.set(row.job_id, created);
    insertJob(created);
    if (TERMINAL.has(row.state)) finished.push(row);
    return created;
  }
  const wasLive = !TERMINAL.has(job.row.state);
  job.row = row;
  if (wasLive && TERMINAL.has(row.state)) finished.push(row);
  if (TERMINAL.has(row.state)) cancelling.delete(row.job_id);
  renderJob(job);
  return job;
}

/** New jobs are nearly always the newest: prepend; otherwise find the place by bisection. */
function insertJob(job) {
  const at = createdAt(job.row);
  if (!order.length || at >= createdAt(order[0].row)) {
    order.unshift(job);
    dom.tbody.prepend(job.tr);
    return;
  }
  let lo = 0;
  let hi = order.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (createdAt(order[mid].row) > at) lo = mid + 1;
    else hi = mid;
  }
  const before = order[lo];
  order.splice(lo, 0, job);
  dom.tbody.insertBefore(job.tr, before ? before.tr : null);
}

function removeJob(id) {
  const job = jobs.get(id);
  if (!job) return;
  jobs.delete(id);
  cancelling.delete(id);
  const index = order.indexOf(job);
  if (index >= 0) order.splice(index, 1);
  job.tr.remove();
}

/** The whole board again: rows kept are reused (selection and all), built off-document. */
function applyReset(rows, finished) {
  const sorted = rows.slice().sort((a, b) => createdAt(b) - createdAt(a));
  const keep = new Set();
  const fragment = document.createDocumentFragment();
  const next = [];
  for (const row of sorted) {
    if (keep.has(row.job_id)) continue;
    keep.add(row.job_id);
    let job = jobs.get(row.job_id);
    if (job) {
      const wasLive = !TERMINAL.has(job.row.state);
      job.row = row;
      if (wasLive && TERMINAL.has(row.state)) finished.push(row);
      if (TERMINAL.has(row.state)) cancelling.delete(row.job_id);
      renderJob(job);
    } else {
      job = createJob(row);
      jobs.set(row.job_id, job);
    }
    next.push(job);
    fragment.append(job.tr);
  }
  for (const id of jobs.keys()) {
    if (!keep.has(id)) {
      jobs.delete(id);
      cancelling.delete(id);
    }
  }
  order = next;
  dom.tbody.replaceChildren(fragment);
}

// ---- filters, counts, bulk cancel, ages ------------------------------------------------

function matches(row, state, operation) {
  return (!state || row.state === state) && (!operation || row.operation === operation);
}

const pageView = {}; // what the counts and the bulk button show

/** Filters and counts, in one pass over the jobs. */
function refreshView() {
  const state = dom.filterState.value;
  const operation = dom.filterOperation.value;
  const now = nowSeconds();
  let shown = 0;
  let cancellable = 0;
  for (const job of order) {
    const visible = matches(job.row, state, operation);
    if (job.tr.hidden === visible) {
      job.tr.hidden = !visible;
    }
    if (!visible) continue;
    shown += 1;
    if (LIVE.has(job.row.state)) cancellable += 1;
    renderAge(job, now); // a row hidden for a while has an old age
  }
  setText(pageView, "count", dom.count, `${order.length} jobs · ${shown} shown`);
  setText(pageView, "bulk", dom.bulkCancel, `Cancel ${cancellable} shown`);
  setProp(pageView, "bulkDisabled", dom.bulkCancel, "disabled", cancellable === 0);
  setText(pageView, "confirm", dom.bulkConfirm, `Cancel ${cancellable} jobs`);
  if (cancellable === 0 && !dom.bulkConfirm.hidden) hideBulkConfirm();
  setText(pageView, "empty", dom.empty, order.length ? "No job matches the filters." : "No jobs yet.");
  setProp(pageView, "emptyHidden", dom.empty, "hidden", shown > 0);
}

function tickAges() {
  const now = nowSeconds();
  for (const job of order) {
    if (!job.tr.hidden) renderAge(job, now);
  }
}

function visibleCancellableIds() {
  return order.filter((job) => !job.tr.hidden && LIVE.has(job.row.state)).map((job) => job.row.job_id);
}

function showBulkConfirm() {
  dom.bulkConfirm.hidden = false;
  dom.bulkAbort.hidden = false;
  dom.bulkConfirm.focus();
}

function hideBulkConfirm() {
  dom.bulkConfirm.hidden = true;
  dom.bulkAbort.hidden = true;
}

function onBulkConfirm() {
  const ids = visibleCancellableIds();
  hideBulkConfirm();
  if (ids.length) cancelJobs(ids, true);
}

// ---- cancelling ------------------------------------------------------------------------

/** Shows the cancel at once, before the server answers; undoes it if the server refuses.
 * A bulk cancel is one request whatever its size (one job or many). */
async function cancelJobs(ids, bulk = false) {
  for (const id of ids) cancelling.add(id);
  renderCancelled(ids);
  try {
    if (bulk) {
      await apiJson("/v1/jobs/cancel", { method: "POST", body: { job_ids: ids } });
    } else {
      await apiJson(`/v1/jobs/${encodeURIComponent(ids[0])}/cancel`, { method: "POST" });
    }
  } catch (err) {
    for (const id of ids) cancelling.delete(id);
    renderCancelled(ids);
    toast(`Cancel failed: ${err.message || err}`);
  }
}

function renderCancelled(ids) {
  for (const id of ids) {
    const job = jobs.get(id);
    if (job) renderJob(job);
  }
  if (ids.includes(panel.jobId)) renderPanelMeta();
}

function onTableClick(event) {
  const button = event.target.closest("button.cancel");
  const tr = event.target.closest("tr[data-job-id]");
  if (!tr) return;
  if (button) {
    event.stopPropagation(); // a cancel is not a request to look at the job
    if (!button.disabled) cancelJobs([tr.dataset.jobId]);
    return;
  }
  openPanel(tr.dataset.jobId);
}

function onTableKey(event) {
  if (event.key !== "Enter" || event.target.tagName !== "TR") return;
  openPanel(event.target.dataset.jobId);
}

// ---- side panel: one job's events ------------------------------------------------------

const panel = {
  jobId: null,
  operation: "",
  maxTokens: null,
  controller: null,
  lastId: "",
  ended: false,
  endState: null,
  progress: null,
  tokenCount: 0,
  tokenBuffer: [],
  tokenFlushQueued: false,
  view: {},
  parts: progressParts(dom.panelProgress),
};

function openPanel(jobId, hint = {}) {
  if (panel.jobId === jobId && !dom.panel.hidden) return;
  stopPanelStream();
  jobs.get(panel.jobId)?.tr.classList.remove("selected");
  Object.assign(panel, {
    jobId, operation: hint.operation ?? "", maxTokens: hint.maxTokens ?? null, lastId: "",
    ended: false, endState: null, progress: null, tokenCount: 0, tokenBuffer: [], view: {},
  });
  jobs.get(jobId)?.tr.classList.add("selected");
  dom.panelNarration.replaceChildren();
  dom.panelTokens.replaceChildren();
  dom.panelTokens.hidden = true;
  dom.panelResult.textContent = "";
  dom.panelResult.hidden = true;
  dom.panelError.textContent = "";
  dom.panelError.hidden = true;
  dom.panelEnd.textContent = "";
  dom.panel.hidden = false;
  document.body.classList.add("panel-open");
  renderPanelMeta();
  followJob(jobId);
}

function closePanel() {
  if (dom.panel.hidden) return;
  stopPanelStream();
  jobs.get(panel.jobId)?.tr.classList.remove("selected");
  panel.jobId = null;
  panel.tokenBuffer = [];
  dom.panel.hidden = true;
  document.body.classList.remove("panel-open");
}

function stopPanelStream() {
  panel.controller?.abort();
  panel.controller = null;
}

/** The panel's row: the feed's, with what the job's own stream told since. */
function panelRow() {
  const row = jobs.get(panel.jobId)?.row;
  return {
    job_id: panel.jobId,
    operation: row?.operation ?? panel.operation,
    // The stream's end is news the feed may not have sent yet.
    state: panel.endState ?? row?.state ?? "queued",
    progress: panel.progress ?? row?.progress ?? null,
    tokens: Math.max(Number(row?.tokens) || 0, panel.tokenCount),
    max_tokens: row?.max_tokens ?? panel.maxTokens,
    cancel_requested: row?.cancel_requested ?? false,
  };
}

function renderPanelMeta() {
  const row = panelRow();
  setText(panel.view, "title", dom.panelTitle, `${row.operation || "job"} ${row.job_id}`);
  setText(panel.view, "state", dom.panelState, row.state);
  const stopping = isCancelling(row);
  setProp(panel.view, "stateClass", dom.panelState, "className",
    stopping ? "badge cancelling" : `badge state-${row.state}`);
  setProp(panel.view, "cancelHidden", dom.panelCancel, "hidden", !LIVE.has(row.state) || panel.ended);
  setProp(panel.view, "cancelDisabled", dom.panelCancel, "disabled", stopping);
  renderProgress(panel.view, panel.parts, progressOf(row));
}

async function followJob(jobId) {
  const controller = new AbortController();
  panel.controller = controller;
  let delay = BACKOFF_FIRST_MS;
  while (!controller.signal.aborted && !panel.ended) {
    try {
      const headers = panel.lastId ? { "Last-Event-ID": panel.lastId } : {};
      const url = `/v1/jobs/${encodeURIComponent(jobId)}/stream`;
      const response = await api(url, { headers, signal: controller.signal });
      if (response.status === 404) {
        endPanel("unknown job", "unknown");
        return;
      }
      if (!response.ok) throw await errorFrom(response);
      delay = BACKOFF_FIRST_MS;
      await readSse(response, (frame) => {
        if (!controller.signal.aborted) onPanelFrame(frame);
      });
    } catch (err) {
      if (controller.signal.aborted || err.status === 401) return;
      if (err.status >= 400 && err.status < 500 && err.status !== 408 && err.status !== 429) {
        endPanel(`error: ${err.message}`);
        return;
      }
    }
    if (panel.ended) return;
    await sleep(delay, controller.signal);
    delay = Math.min(delay * 2, BACKOFF_MAX_MS);
  }
}

function onPanelFrame(frame) {
  if (frame.id) panel.lastId = frame.id;
  if (!frame.event) {
    onSentinel(frame.data);
    return;
  }
  const data = parseJson(frame.data);
  if (data === null) return;
  switch (frame.event) {
    case "narration": addNarration(data); break;
    case "progress":
      panel.progress = data;
      renderPanelMeta();
      break;
    case "token": queueToken(data); break;
    case "result":
      dom.panelResult.textContent = JSON.stringify(data, null, 2);
      dom.panelResult.hidden = false;
      break;
    case "error":
      dom.panelError.textContent = `${data.code ?? "ERROR"}: ${data.message ?? ""}`;
      dom.panelError.hidden = false;
      break;
    default: break; // a kind from a newer server
  }
}

function onSentinel(data) {
  if (data === "[DONE]") endPanel("completed", "completed");
  else if (data === "[CANCELLED]") endPanel("cancelled", "cancelled");
  else if (data.startsWith("[ERROR]")) endPanel(`failed: ${data.slice(7).trim()}`, "failed");
}

function endPanel(text, state = null) {
  panel.ended = true;
  panel.endState = state;
  flushTokens();
  dom.panelEnd.textContent = text;
  renderPanelMeta();
}

function addNarration(data) {
  const item = element("li", data.level === "warn" ? "warn" : "");
  item.append(
    element("span", "ts", formatClock(data.ts)),
    element("span", "who", `${data.actor ?? ""} ${data.action ?? ""}`.trim()),
    element("span", "message", String(data.message ?? "")),
  );
  dom.panelNarration.append(item);
}

/** Tokens come in bursts: one text node and one scroll per frame, not per token. */
function queueToken(data) {
  panel.tokenBuffer.push(String(data.text ?? ""));
  const index = Number(data.index);
  panel.tokenCount = Math.max(panel.tokenCount + 1, Number.isFinite(index) ? index + 1 : 0);
  if (!panel.tokenFlushQueued) {
    panel.tokenFlushQueued = true;
    requestAnimationFrame(flushTokens);
  }
}

function flushTokens() {
  panel.tokenFlushQueued = false;
  if (!panel.tokenBuffer.length) return;
  const text = panel.tokenBuffer.join("");
  panel.tokenBuffer = [];
  const pre = dom.panelTokens;
  const wasHidden = pre.hidden;
  const atBottom = wasHidden || pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(document.createTextNode(text));
  pre.hidden = false;
  if (atBottom) pre.scrollTop = pre.scrollHeight;
  renderPanelMeta();
}

// ---- forms -----------------------------------------------------------------------------

async function submitJob(form, body) {
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const answer = await apiJson("/v1/jobs", { method: "POST", body });
    dom.formError.textContent = "";
    openPanel(answer.job_id, { operation: body.operation, maxTokens: body.max_tokens ?? null });
  } catch (err) {
    dom.formError.textContent = isAbort(err) ? "" : err instanceof ApiError ? err.message
      : "Cannot reach the rbee server.";
  } finally {
    button.disabled = false;
  }
}

function onDownloadSubmit(event) {
  event.preventDefault();
  const body = { operation: "model_download", model: $("download-model").value.trim() };
  const revision = $("download-revision").value.trim();
  const files = $("download-files").value.split(",").map((s) => s.trim()).filter(Boolean);
  const hive = dom.downloadHive.value;
  if (revision) body.revision = revision;
  if (files.length) body.files = files;
  if (hive) body.hive_id = hive;
  submitJob(dom.downloadForm, body);
}

function onInferSubmit(event) {
  event.preventDefault();
  submitJob(dom.inferForm, {
    operation: "infer",
    model: dom.inferModel.value,
    prompt: $("infer-prompt").value,
    max_tokens: Number.parseInt($("infer-max-tokens").value, 10),
    temperature: Number.parseFloat($("infer-temperature").value),
  });
}

/** Refills a select with these values, keeping the choice if it is still offered. */
function fillSelect(select, values, first) {
  const chosen = select.value;
  const options = [];
  if (first) options.push(new Option(first, ""));
  for (const value of values) options.push(new Option(value, value));
  const same = select.options.length === options.length
    && options.every((o, i) => select.options[i].value === o.value && select.options[i].text === o.text);
  if (same) return;
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

/** One request at a time; calls during one run it once more after. */
function singleFlight(task) {
  let running = false;
  let again = false;
  const run = async () => {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await task();
    } catch {
      // the banner or the token dialog has said what went wrong
    } finally {
      running = false;
      if (again) {
        again = false;
        run();
      }
    }
  };
  return run;
}

const refreshModels = singleFlight(async () => {
  const answer = await apiJson("/v1/models");
  const ids = (Array.isArray(answer.data) ? answer.data : [])
    .map((m) => (typeof m === "string" ? m : m?.id))
    .filter((id) => typeof id === "string" && id);
  ids.sort();
  fillSelect(dom.inferModel, ids, ids.length ? "" : "no cached models");
});

// ---- hives -----------------------------------------------------------------------------

const stoppingWorkers = new Map(); // "hive/worker" → the worker_stop job id (null until known)
let hivesShown = "";

const refreshHives = singleFlight(async () => {
  const answer = await apiJson("/v1/hives");
  const hives = (Array.isArray(answer.hives) ? answer.hives : []).filter((h) => h && h.hive_id);
  fillSelect(dom.downloadHive, hives.map((h) => String(h.hive_id)), "any hive");
  // Polled every few seconds and mostly unchanged: redrawn only when it changed.
  const shown = JSON.stringify(hives);
  if (shown === hivesShown) return;
  hivesShown = shown;
  dom.hiveList.replaceChildren(...(hives.length ? hives.map(renderHive) : [element("p", "empty", "No hives.")]));
});

function renderHive(hive) {
  const card = element("div", "hive");
  card.dataset.hiveId = hive.hive_id;
  const head = card.appendChild(element("div", "hive-head"));
  head.append(element("strong", "", String(hive.host || hive.hive_id)), element("span", "hive-id", String(hive.hive_id)));
  if (hive.answered === false) {
    card.classList.add("silent");
    head.append(element("span", "mark", "not answering"));
  }
  if (hive.alive === false) head.append(element("span", "mark down", "down"));

  const facts = card.appendChild(element("div", "facts"));
  facts.append(element("span", "", `CPUs: ${describe(hive.cpus)}`));
  facts.append(element("span", "", `GPUs: ${gpuCount(hive.gpus)}, free: ${gpuCount(hive.free_gpus)}`));
  if (hive.memory_bytes !== undefined && hive.memory_bytes !== null) {
    facts.append(element("span", "", `Memory: ${formatBytes(hive.memory_bytes)}`));
  }
  if (Array.isArray(hive.gpu_memory) && hive.gpu_memory.length) {
    const list = card.appendChild(element("ul", "gpus"));
    hive.gpu_memory.forEach((gpu, i) => {
      const index = gpu?.index ?? i;
      const used = gpu?.used ?? (gpu?.total != null && gpu?.free != null ? gpu.total - gpu.free : null);
      const text = gpu && typeof gpu === "object"
        ? `GPU ${index}: ${used == null ? "?" : formatBytes(used)} / ${gpu.total == null ? "?" : formatBytes(gpu.total)} used`
        : `GPU ${i}: ${describe(gpu)}`;
      list.append(element("li", "", text));
    });
  }

  card.append(element("h3", "", "Models"));
  const models = Array.isArray(hive.models) ? hive.models : [];
  if (models.length) {
    const list = card.appendChild(element("ul", "models"));
    for (const model of models) list.append(element("li", "", typeof model === "string" ? model : describe(model)));
  } else {
    card.append(element("div", "empty-line", "none cached"));
  }

  card.append(element("h3", "", "Workers"));
  const workers = Array.isArray(hive.workers) ? hive.workers : [];
  if (!workers.length) card.append(element("div", "empty-line", "none"));
  for (const worker of workers) card.append(renderWorker(hive, worker));
  return card;
}

function renderWorker(hive, worker) {
  const row = element("div", "worker");
  if (!worker || typeof worker !== "object") {
    row.append(element("span", "worker-model", describe(worker)));
    return row;
  }
  if (worker.worker_id != null) row.dataset.workerId = worker.worker_id;
  row.append(
    element("span", "worker-model", String(worker.model ?? worker.worker_id ?? "?")),
    element("span", "worker-meta", [worker.device, worker.state].filter((v) => v != null).join(" · ")),
  );
  if (worker.worker_id != null) {
    const button = row.appendChild(element("button", "worker-stop", "Stop"));
    button.type = "button";
    const key = `${hive.hive_id}/${worker.worker_id}`;
    button.disabled = stoppingWorkers.has(key);
    button.addEventListener("click", () => stopWorker(button, key, String(worker.worker_id), String(hive.hive_id)));
  }
  return row;
}

async function stopWorker(button, key, workerId, hiveId) {
  button.disabled = true;
  stoppingWorkers.set(key, null);
  try {
    const answer = await apiJson("/v1/jobs", {
      method: "POST", body: { operation: "worker_stop", worker_id: workerId, hive_id: hiveId },
    });
    stoppingWorkers.set(key, answer.job_id);
  } catch (err) {
    stoppingWorkers.delete(key);
    button.disabled = false;
    hivesShown = ""; // a redraw meanwhile drew the button disabled
    refreshHives();
    toast(`Stop failed: ${err.message || err}`);
  }
}

/** Jobs that just ended: what they change elsewhere on the page. */
function onJobsFinished(rows) {
  let hives = false;
  let models = false;
  for (const row of rows) {
    if (HIVE_OPS.has(row.operation)) hives = true;
    if (MODEL_OPS.has(row.operation)) models = true;
    for (const [key, jobId] of stoppingWorkers) {
      if (jobId !== row.job_id) continue;
      stoppingWorkers.delete(key);
      hivesShown = ""; // its Stop button is drawn again (enabled, if the worker is still there)
    }
  }
  if (hives) refreshHives();
  if (models) refreshModels();
}

// ---- start -----------------------------------------------------------------------------

/** After a token is given (or at load): everything asks the server again. */
function restartAll() {
  feed.lastId = "";
  runFeed();
  refreshHives();
  refreshModels();
  if (panel.jobId && !panel.ended) {
    stopPanelStream();
    followJob(panel.jobId);
  }
}

function whenVisible(task) {
  return () => {
    if (document.visibilityState === "visible" && !auth.blocked) task();
  };
}

function wire() {
  dom.tbody.addEventListener("click", onTableClick);
  dom.tbody.addEventListener("keydown", onTableKey);
  dom.filterState.addEventListener("change", refreshView);
  dom.filterOperation.addEventListener("change", refreshView);
  dom.bulkCancel.addEventListener("click", showBulkConfirm);
  dom.bulkConfirm.addEventListener("click", onBulkConfirm);
  dom.bulkAbort.addEventListener("click", hideBulkConfirm);
  dom.panelClose.addEventListener("click", closePanel);
  dom.panelCancel.addEventListener("click", () => {
    if (panel.jobId) cancelJobs([panel.jobId]);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !dom.tokenDialog.open) closePanel();
  });
  dom.downloadForm.addEventListener("submit", onDownloadSubmit);
  dom.inferForm.addEventListener("submit", onInferSubmit);
  dom.tokenForm.addEventListener("submit", onTokenSubmit);
  document.addEventListener("visibilitychange", whenVisible(refreshHives));
  setInterval(tickAges, 1000);
  setInterval(whenVisible(refreshHives), HIVES_EVERY_MS);
  setInterval(whenVisible(refreshModels), MODELS_EVERY_MS);
}

window.rbeePage = Object.freeze({
  rendered: () => dom.tbody.rows.length,
  // The board's ids are "<epoch>.<seq>": the sequence number is what grows.
  feedSeq: () => Number(feed.lastId.split(".").pop()) || 0,
});

wire();
refreshView();
restartAll();
