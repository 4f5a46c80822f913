// Server-sent events read with fetch (EventSource cannot send the Authorization header),
// shared by the jobs feed and the side panel.

export const BACKOFF_FIRST_MS = 500;
export const BACKOFF_MAX_MS = 5000;
// The server sends a keep-alive at least every 15 s: a stream silent for three times that
// is dead (a network gone without a word), and is given up so the caller reconnects.
const STALL_MS = 45000;

/** Lines in, whole frames out; a half-received frame is never handed on. */
export function sseParser(onFrame) {
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
export async function readSse(response, onFrame) {
  if (!response.body) throw new Error("the stream has no body");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const feed = sseParser(onFrame);
  let buffer = "";
  let stalled = false;
  let timer = 0;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      stalled = true;
      reader.cancel().catch(() => {});
    }, STALL_MS);
  };
  try {
    arm();
    for (;;) {
      const { value, done } = await reader.read();
      if (stalled) throw new Error(`the stream was silent for ${STALL_MS / 1000} s`);
      if (done) break;
      arm();
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
    clearTimeout(timer);
    reader.releaseLock();
  }
}

export function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/** Waits between reconnections; an abort ends the wait at once. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}
