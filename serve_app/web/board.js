// The jobs table: its model (a row per job, newest first), rendering, filters, counts,
// bulk cancel, row cancel and ages.

import { $, element, formatSpan, nowSeconds, setProp, setText } from "./format.js";
import { apiJson, toast } from "./api.js";
import { progressOf, progressParts, renderProgress } from "./progress.js";

const LIVE = new Set(["queued", "running"]);
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

const dom = {
  count: $("count"),
  filterState: $("filter-state"),
  filterOperation: $("filter-operation"),
  bulkCancel: $("bulk-cancel"),
  bulkConfirm: $("bulk-confirm"),
  bulkAbort: $("bulk-abort"),
  tbody: document.querySelector("#jobs tbody"),
  empty: $("jobs-empty"),
};

/** job_id → { row, tr, cells, view }; view holds what the DOM shows, to write only changes. */
const jobs = new Map();
/** The jobs newest first, as the table shows them. */
let order = [];
const cancelling = new Set(); // ids whose cancel the user asked for, before the server says so
let selectedId = null;
const pageView = {}; // what the counts and the bulk button show
const hooks = { open() {}, redrawn() {}, finished() {} };

/** open(jobId): a row was chosen; redrawn(ids): these rows (null: any) changed;
 * finished(rows): these jobs just ended. */
export function initBoard(handlers) {
  Object.assign(hooks, handlers);
  dom.tbody.addEventListener("click", onTableClick);
  dom.tbody.addEventListener("keydown", onTableKey);
  dom.filterState.addEventListener("change", refreshView);
  dom.filterOperation.addEventListener("change", refreshView);
  dom.bulkCancel.addEventListener("click", showBulkConfirm);
  dom.bulkConfirm.addEventListener("click", onBulkConfirm);
  dom.bulkAbort.addEventListener("click", hideBulkConfirm);
}

export function isLive(state) {
  return LIVE.has(state);
}

export function isCancelling(row) {
  return LIVE.has(row.state) && (cancelling.has(row.job_id) || row.cancel_requested === true);
}

/** The row the feed last sent for this job, if it is on the board. */
export function jobRow(id) {
  return jobs.get(id)?.row;
}

export function renderedRows() {
  return dom.tbody.rows.length;
}

/** Marks the job the side panel shows (null: none). */
export function selectJob(id) {
  jobs.get(selectedId)?.tr.classList.remove("selected");
  selectedId = id;
  jobs.get(id)?.tr.classList.add("selected");
}

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
  if (row.job_id === selectedId) tr.classList.add("selected");
  const job = { row, tr, cells, view: {}, cancel: null };
  renderJob(job);
  return job;
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

function renderAge(job, now) {
  setText(job.view, "age", job.cells.age, formatSpan(now - createdAt(job.row)));
}

/** A feed batch ({ reset, forgotten, upserts }) onto the table, drawn in one go. */
export function applyChanges(batch) {
  const finished = [];
  if (batch.reset) applyReset(batch.reset, finished);
  for (const id of batch.forgotten) removeJob(id);
  for (const row of batch.upserts.values()) upsertJob(row, finished);
  refreshView();
  hooks.redrawn(null);
  hooks.finished(finished);
}

/** A new row for a known job; an end seen here is news (pushed to finished). */
function updateJob(job, row, finished) {
  const wasLive = !TERMINAL.has(job.row.state);
  job.row = row;
  if (wasLive && TERMINAL.has(row.state)) finished.push(row);
  if (TERMINAL.has(row.state)) cancelling.delete(row.job_id);
  renderJob(job);
}

/** Updates or adds one job of a change (a job new here and already ended is news too). */
function upsertJob(row, finished) {
  const job = jobs.get(row.job_id);
  if (job) {
    updateJob(job, row, finished);
    return;
  }
  const created = createJob(row);
  jobs.set(row.job_id, created);
  insertJob(created);
  if (TERMINAL.has(row.state)) finished.push(row);
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
      updateJob(job, row, finished);
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

function matches(row, state, operation) {
  return (!state || row.state === state) && (!operation || row.operation === operation);
}

/** Filters and counts, in one pass over the jobs. */
export function refreshView() {
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
  setText(pageView, "count", dom.count, `${order.length} ${order.length === 1 ? "job" : "jobs"} · ${shown} shown`);
  setText(pageView, "bulk", dom.bulkCancel, `Cancel ${cancellable} shown`);
  setProp(pageView, "bulkDisabled", dom.bulkCancel, "disabled", cancellable === 0);
  setText(pageView, "confirm", dom.bulkConfirm, `Cancel ${cancellable} jobs`);
  if (cancellable === 0 && !dom.bulkConfirm.hidden) hideBulkConfirm();
  setText(pageView, "empty", dom.empty, order.length ? "No job matches the filters." : "No jobs yet.");
  setProp(pageView, "emptyHidden", dom.empty, "hidden", shown > 0);
}

export function tickAges() {
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

/** Shows the cancel at once, before the server answers; undoes it if the server refuses.
 * A bulk cancel is one request whatever its size (one job or many). */
export async function cancelJobs(ids, bulk = false) {
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
  hooks.redrawn(ids);
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
  hooks.open(tr.dataset.jobId);
}

function onTableKey(event) {
  if (event.key !== "Enter" || event.target.tagName !== "TR") return;
  hooks.open(event.target.dataset.jobId);
}
