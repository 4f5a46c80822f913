// The side panel: one job's own event stream (narration, progress, tokens, result).

import { $, element, formatClock, setProp, setText } from "./format.js";
import { api, errorFrom } from "./api.js";
import { cancelJobs, isCancelling, isLive, jobRow, selectJob } from "./board.js";
import { progressOf, progressParts, renderProgress } from "./progress.js";
import { BACKOFF_FIRST_MS, BACKOFF_MAX_MS, parseJson, readSse, sleep } from "./sse.js";

const dom = {
  panel: $("panel"),
  title: $("panel-title"),
  state: $("panel-state"),
  cancel: $("panel-cancel"),
  close: $("panel-close"),
  progress: $("panel-progress"),
  narration: $("panel-narration"),
  tokens: $("panel-tokens"),
  result: $("panel-result"),
  error: $("panel-error"),
  end: $("panel-end"),
};

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
  parts: progressParts(dom.progress),
};

export function initPanel() {
  dom.close.addEventListener("click", closePanel);
  dom.cancel.addEventListener("click", () => {
    if (panel.jobId) cancelJobs([panel.jobId]);
  });
}

/** hint: what the form that just made the job knows before the feed does. */
export function openPanel(jobId, hint = {}) {
  if (panel.jobId === jobId && !dom.panel.hidden) return;
  stopPanelStream();
  Object.assign(panel, {
    jobId, operation: hint.operation ?? "", maxTokens: hint.maxTokens ?? null, lastId: "",
    ended: false, endState: null, progress: null, tokenCount: 0, tokenBuffer: [], view: {},
  });
  selectJob(jobId);
  dom.narration.replaceChildren();
  dom.tokens.replaceChildren();
  dom.tokens.hidden = true;
  dom.result.textContent = "";
  dom.result.hidden = true;
  dom.error.textContent = "";
  dom.error.hidden = true;
  dom.end.textContent = "";
  dom.panel.hidden = false;
  document.body.classList.add("panel-open");
  renderPanelMeta();
  followJob(jobId);
}

export function closePanel() {
  if (dom.panel.hidden) return;
  stopPanelStream();
  selectJob(null);
  panel.jobId = null;
  panel.tokenBuffer = [];
  dom.panel.hidden = true;
  document.body.classList.remove("panel-open");
}

/** The board redrew these jobs (null: any): the panel's may be one. */
export function jobsRedrawn(ids) {
  if (panel.jobId && (ids === null || ids.includes(panel.jobId))) renderPanelMeta();
}

/** After a token is given: a stream still wanted is opened again, with it. */
export function restartPanel() {
  if (panel.jobId && !panel.ended) {
    stopPanelStream();
    followJob(panel.jobId);
  }
}

function stopPanelStream() {
  panel.controller?.abort();
  panel.controller = null;
}

/** The panel's row: the feed's, with what the job's own stream told since. */
function panelRow() {
  const row = jobRow(panel.jobId);
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
  setText(panel.view, "title", dom.title, `${row.operation || "job"} ${row.job_id}`);
  setText(panel.view, "state", dom.state, row.state);
  const stopping = isCancelling(row);
  setProp(panel.view, "stateClass", dom.state, "className",
    stopping ? "badge cancelling" : `badge state-${row.state}`);
  setProp(panel.view, "cancelHidden", dom.cancel, "hidden", !isLive(row.state) || panel.ended);
  setProp(panel.view, "cancelDisabled", dom.cancel, "disabled", stopping);
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
      dom.result.textContent = JSON.stringify(data, null, 2);
      dom.result.hidden = false;
      break;
    case "error":
      dom.error.textContent = `${data.code ?? "ERROR"}: ${data.message ?? ""}`;
      dom.error.hidden = false;
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
  dom.end.textContent = text;
  renderPanelMeta();
}

function addNarration(data) {
  const item = element("li", data.level === "warn" ? "warn" : "");
  item.append(
    element("span", "ts", formatClock(data.ts)),
    element("span", "who", `${data.actor ?? ""} ${data.action ?? ""}`.trim()),
    element("span", "message", String(data.message ?? "")),
  );
  dom.narration.append(item);
}

/** Tokens come in bursts: one text node and one scroll per frame, not per token. */
function queueToken(data) {
  panel.tokenBuffer.push(String(data.text ?? ""));
  // ``index`` is the count of tokens made so far (several may come in one delta).
  const index = Number(data.index);
  panel.tokenCount = Number.isFinite(index) ? Math.max(panel.tokenCount, index) : panel.tokenCount + 1;
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
  const pre = dom.tokens;
  const wasHidden = pre.hidden;
  const atBottom = wasHidden || pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(document.createTextNode(text));
  pre.hidden = false;
  if (atBottom) pre.scrollTop = pre.scrollHeight;
  renderPanelMeta();
}
