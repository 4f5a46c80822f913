// The hives: their machines, cached models and workers, and a worker's Stop.

import { $, describe, element, fillSelect, formatBytes, gpuCount } from "./format.js";
import { apiJson, singleFlight, toast } from "./api.js";

const dom = {
  downloadHive: $("download-hive"),
  hiveList: $("hive-list"),
};

const stoppingWorkers = new Map(); // "hive/worker" → the worker_stop job id (null until known)
let hivesShown = "";

export const refreshHives = singleFlight(async () => {
  const answer = await apiJson("/v1/hives");
  const hives = (Array.isArray(answer.hives) ? answer.hives : []).filter((h) => h && h.hive_id);
  fillSelect(dom.downloadHive, hives.map((h) => String(h.hive_id)), "any hive");
  // Polled every few seconds and mostly unchanged: redrawn only when it changed.
  const shown = JSON.stringify(hives);
  if (shown === hivesShown) return;
  hivesShown = shown;
  dom.hiveList.replaceChildren(...(hives.length ? hives.map(renderHive) : [element("p", "empty", "No hives.")]));
});

/** Jobs that just ended: a worker_stop among them frees its Stop button. */
export function stopsFinished(rows) {
  for (const row of rows) {
    for (const [key, jobId] of stoppingWorkers) {
      if (jobId !== row.job_id) continue;
      stoppingWorkers.delete(key);
      hivesShown = ""; // its Stop button is drawn again (enabled, if the worker is still there)
    }
  }
}

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
      // hive_status's shape: {"index", "total_bytes", "used_bytes"} per GPU (nvidia-ml-py).
      const index = gpu?.index ?? i;
      const used = gpu?.used_bytes;
      const total = gpu?.total_bytes;
      const text = gpu && typeof gpu === "object"
        ? `GPU ${index}: ${used == null ? "?" : formatBytes(used)} / ${total == null ? "?" : formatBytes(total)} used`
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
