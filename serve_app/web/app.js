// rbee web page: the jobs board (live), one job's events, the two job forms, the hives.
// Everything shown comes from the server and is written as text, never as HTML: a job's
// output or a hub's file name is untrusted and must never run.
// This module wires the others together and starts them.

import { authBlocked, initApi, tokenDialogOpen } from "./api.js";
import { initBoard, refreshView, renderedRows, tickAges } from "./board.js";
import { feedSeq, restartFeed } from "./feed.js";
import { initForms, refreshModels } from "./forms.js";
import { refreshHives, stopsFinished } from "./hives.js";
import { closePanel, initPanel, jobsRedrawn, openPanel, restartPanel } from "./panel.js";

const HIVE_OPS = new Set(["worker_spawn", "worker_stop", "model_download", "model_delete"]);
const MODEL_OPS = new Set(["model_download", "model_delete"]);
const HIVES_EVERY_MS = 5000;
const MODELS_EVERY_MS = 10000;

/** Jobs that just ended: what they change elsewhere on the page. */
function onJobsFinished(rows) {
  stopsFinished(rows);
  if (rows.some((row) => HIVE_OPS.has(row.operation))) refreshHives();
  if (rows.some((row) => MODEL_OPS.has(row.operation))) refreshModels();
}

/** After a token is given (or at load): everything asks the server again. */
function restartAll() {
  restartFeed();
  refreshHives();
  refreshModels();
  restartPanel();
}

function whenVisible(task) {
  return () => {
    if (document.visibilityState === "visible" && !authBlocked()) task();
  };
}

function wire() {
  initApi({
    back: () => { refreshHives(); refreshModels(); },
    tokenGiven: restartAll,
  });
  initBoard({ open: openPanel, redrawn: jobsRedrawn, finished: onJobsFinished });
  initPanel();
  initForms();
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !tokenDialogOpen()) closePanel();
  });
  document.addEventListener("visibilitychange", whenVisible(refreshHives));
  setInterval(tickAges, 1000);
  setInterval(whenVisible(refreshHives), HIVES_EVERY_MS);
  setInterval(whenVisible(refreshModels), MODELS_EVERY_MS);
}

window.rbeePage = Object.freeze({
  rendered: renderedRows,
  feedSeq,
});

wire();
refreshView();
restartAll();
// A reload while the server is down still shows the page (and its banner): see sw.js.
navigator.serviceWorker?.register("/sw.js").catch(() => {});
