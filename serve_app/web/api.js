// Server access: the token, fetch with Authorization, a 401 → the token dialog, the
// offline banner, the toast.

import { $ } from "./format.js";

const TOKEN_KEY = "rbee.token";
const TOAST_MS = 5000;

const dom = {
  banner: $("banner"),
  toast: $("toast"),
  tokenDialog: $("token-dialog"),
  tokenForm: $("token-form"),
  tokenInput: $("token-input"),
  tokenError: $("token-error"),
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

let memoryToken = ""; // when sessionStorage is unavailable (some private modes)
let blocked = false; // a 401 is waiting for the user: background polls pause
let offline = false;
let toastTimer = 0;
const hooks = { back() {}, tokenGiven() {} };

/** back(): the server answers again; tokenGiven(): the user gave a token. */
export function initApi(handlers) {
  Object.assign(hooks, handlers);
  dom.tokenForm.addEventListener("submit", onTokenSubmit);
}

export function authBlocked() {
  return blocked;
}

export function tokenDialogOpen() {
  return dom.tokenDialog.open;
}

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

export function isAbort(err) {
  return err?.name === "AbortError";
}

export async function errorFrom(response) {
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
export async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
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

export async function apiJson(path, options) {
  const response = await api(path, options);
  if (!response.ok) throw await errorFrom(response);
  try {
    return await response.json();
  } catch {
    return {};
  }
}

/** One request at a time; calls during one run it once more after. */
export function singleFlight(task) {
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

function setOffline(value) {
  if (value === offline) return;
  offline = value;
  if (value) dom.banner.textContent = `Cannot reach the rbee server at ${location.origin} — retrying…`;
  dom.banner.hidden = !value;
  document.body.classList.toggle("offline", value);
  // Back: what could not be loaded meanwhile (at first load, all of it) is asked again.
  if (!value) hooks.back();
}

export function toast(message) {
  dom.toast.textContent = message;
  dom.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { dom.toast.hidden = true; }, TOAST_MS);
}

function needToken() {
  blocked = true;
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
  blocked = false;
  hooks.tokenGiven();
}
