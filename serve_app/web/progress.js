// A job's progress, shared by its row and the side panel: a bar and a line of text.

import { element, formatBytes, formatSpan, setProp, setText } from "./format.js";

/** The bar and text of a progress container, made if the markup lacks them. */
export function progressParts(container) {
  const bar = container.querySelector(".bar") ?? container.appendChild(element("div", "bar"));
  const fill = bar.querySelector(".fill") ?? bar.appendChild(element("div", "fill"));
  const text = container.querySelector(".progress-text")
    ?? container.appendChild(element("span", "progress-text"));
  return { bar, fill, text };
}

/** What a progress cell shows: a bar percentage (null: no bar) and a line of text. */
export function progressOf(row) {
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
  // A rate and an ETA are news only while bytes flow: an ended job's last rate is stale.
  const rate = Number(p.rate_bps) || 0;
  if (row.state === "running" && rate > 0) {
    parts.push(`${formatBytes(rate)}/s`);
    if (p.eta_s !== null && p.eta_s !== undefined) parts.push(`ETA ${formatSpan(Math.ceil(Number(p.eta_s)))}`);
  }
  const pct = done ? 100 : total > 0 ? Math.min(100, (have / total) * 100) : 0;
  return { pct, text: parts.join(" · ") };
}

export function renderProgress(view, parts, { pct, text }) {
  const hidden = pct === null;
  setProp(view, "barHidden", parts.bar, "hidden", hidden);
  setProp(view, "width", parts.fill.style, "width", hidden ? "0%" : `${pct.toFixed(1)}%`);
  setText(view, "progressText", parts.text, text);
}
