// The two job forms (download, infer) and the infer form's list of cached models.

import { $, fillSelect } from "./format.js";
import { ApiError, apiJson, isAbort, singleFlight } from "./api.js";
import { openPanel } from "./panel.js";

const dom = {
  downloadForm: $("download-form"),
  downloadHive: $("download-hive"),
  inferForm: $("infer-form"),
  inferModel: $("infer-model"),
  formError: $("form-error"),
};

export function initForms() {
  dom.downloadForm.addEventListener("submit", onDownloadSubmit);
  dom.inferForm.addEventListener("submit", onInferSubmit);
}

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
  const text = $("infer-prompt").value;
  // An instruct model answers a question sent as a chat message; as raw text it continues it.
  const input = $("infer-as").value === "prompt"
    ? { prompt: text }
    : { messages: [{ role: "user", content: text }] };
  submitJob(dom.inferForm, {
    operation: "infer",
    model: dom.inferModel.value,
    ...input,
    max_tokens: Number.parseInt($("infer-max-tokens").value, 10),
    temperature: Number.parseFloat($("infer-temperature").value),
  });
}

export const refreshModels = singleFlight(async () => {
  const answer = await apiJson("/v1/models");
  const ids = (Array.isArray(answer.data) ? answer.data : [])
    .map((m) => (typeof m === "string" ? m : m?.id))
    .filter((id) => typeof id === "string" && id);
  ids.sort();
  fillSelect(dom.inferModel, ids, ids.length ? "" : "no cached models");
});
