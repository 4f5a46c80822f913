// Text for what the server sends (bytes, spans, clock times), and small DOM helpers.

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export const $ = (id) => document.getElementById(id);

export function formatBytes(value) {
  let n = Number(value);
  if (!Number.isFinite(n) || n < 0) return "?";
  let unit = 0;
  // 1023.6 KiB would round to "1024 KiB": it is shown as "1.0 MiB".
  while (n >= 1023.5 && unit < BYTE_UNITS.length - 1) {
    n /= 1024;
    unit += 1;
  }
  if (unit === 0) return `${Math.round(n)} B`;
  return `${n < 10 ? n.toFixed(1) : Math.round(n)} ${BYTE_UNITS[unit]}`;
}

export function formatSpan(seconds) {
  const s = Math.max(0, Number(seconds) || 0);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

export function formatClock(ts) {
  let date;
  if (typeof ts === "number") date = new Date(ts > 1e12 ? ts : ts * 1000);
  else if (typeof ts === "string") date = new Date(ts);
  if (!date || Number.isNaN(date.getTime())) return "";
  return date.toLocaleTimeString([], { hour12: false });
}

/** Anything the server sent, as short text: hive fields have no fixed shape. */
export function describe(value) {
  if (value === null || value === undefined || value === "") return "—";
  if (Array.isArray(value)) return value.length ? `${value.length} (${value.join(", ")})` : "0";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** A GPU count the server gives as a number or as a list of GPU indices. */
export function gpuCount(value) {
  if (Array.isArray(value)) return value.length ? `${value.length} (#${value.join(", #")})` : "0";
  return describe(value);
}

export function nowSeconds() {
  return Date.now() / 1000;
}

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function setText(view, key, node, text) {
  setProp(view, key, node, "textContent", text);
}

/** Writes a DOM property only when it changes: same-value writes still cost style work. */
export function setProp(view, key, node, property, value) {
  if (view[key] === value) return;
  view[key] = value;
  node[property] = value;
}

/** Refills a select with these values, keeping the choice if it is still offered. */
export function fillSelect(select, values, first) {
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
