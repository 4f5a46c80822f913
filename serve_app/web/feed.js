// The jobs feed: the board's event stream, resumed by Last-Event-ID, its changes batched
// into one draw per frame.

import { api, errorFrom } from "./api.js";
import { applyChanges } from "./board.js";
import { BACKOFF_FIRST_MS, BACKOFF_MAX_MS, parseJson, readSse, sleep } from "./sse.js";

const FEED_URL = "/v1/jobs/watch?limit=500";

const feed = { lastId: "", generation: 0, controller: null };
let pending = emptyBatch();
let flushQueued = false;

function emptyBatch() {
  return { reset: null, upserts: new Map(), forgotten: new Set() };
}

/** The board's last position: its ids are "<epoch>.<seq>", the sequence number is what grows. */
export function feedSeq() {
  return Number(feed.lastId.split(".").pop()) || 0;
}

/** The feed from the start (the whole board again), replacing any running one. */
export function restartFeed() {
  feed.lastId = "";
  runFeed();
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
  applyChanges(batch);
}
