// The web page's logic: send the chosen image to POST predict (same origin) and show the answer.
// Text that comes from the server (labels, error messages) only ever goes into the page through
// textContent, never parsed as HTML, so a label or message can never become markup or script.
"use strict";

const KEY_STORAGE = "image-classifier-api-key"; // sessionStorage: the key lives as long as this tab
const byId = (id) => document.getElementById(id);

let latest = 0; // number of the latest request: an older answer that arrives late is ignored
let chosen = null; // the File last chosen or dropped
let previewUrl = null;

function init() {
  const form = byId("upload");
  const input = byId("image");
  const zone = byId("drop-zone");
  const key = byId("api-key");

  byId("predict-url").textContent = new URL("predict", document.baseURI).href;
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => {
    if (key.value.trim()) sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  key.addEventListener("change", loadModels); // with API_KEYS, /readyz lists the models only to a key
  byId("model").addEventListener("change", () => {
    if (chosen) classify(chosen);
  });
  loadModels();

  input.addEventListener("change", () => {
    if (input.files.length) choose(input.files[0]);
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault(); // the page sends the form itself, to show the answer here
    if (chosen) classify(chosen);
  });

  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    const file = event.dataTransfer.files[0];
    if (file) choose(file);
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
}

/** Show the file and send it at once. */
function choose(file) {
  chosen = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  const preview = byId("preview");
  preview.hidden = false;
  preview.onerror = () => (preview.hidden = true); // not something the browser can show: no preview
  preview.src = previewUrl;
  byId("file-name").textContent = `${file.name} (${formatBytes(file.size)})`;
  byId("preview-box").hidden = false;
  byId("send").disabled = false;
  classify(file);
}

function keyHeaders() {
  const key = byId("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

/** The models /readyz lists: a picker when there is more than one (one model needs no choosing). */
async function loadModels() {
  let ids = [];
  try {
    const answer = await (await fetch("readyz", { headers: keyHeaders() })).json();
    ids = answer && answer.models ? Object.keys(answer.models) : [];
  } catch {
    return; // not ready, or not reachable: /predict's own answer will say so
  }
  const select = byId("model");
  const current = select.value;
  select.replaceChildren(
    ...ids.map((id) => {
      const option = document.createElement("option");
      option.value = id;
      option.textContent = id;
      return option;
    }),
  );
  if (ids.includes(current)) select.value = current;
  byId("model-box").hidden = ids.length < 2;
}

async function classify(file) {
  const number = ++latest;
  setState("busy", `Classifying ${file.name}…`);
  const body = new FormData();
  body.append("image", file, file.name);
  const headers = keyHeaders();
  const model = byId("model-box").hidden ? "" : byId("model").value;
  const url = model ? `predict?model=${encodeURIComponent(model)}` : "predict";

  const started = performance.now();
  let response, text;
  try {
    response = await fetch(url, { method: "POST", body, headers });
    text = await response.text();
  } catch (error) {
    if (number === latest) showError(null, `The service could not be reached (${error.message}).`);
    return;
  }
  const elapsedMs = performance.now() - started;
  if (number !== latest) return;

  let answer = null;
  try {
    answer = JSON.parse(text);
  } catch {
    // not JSON: a proxy's or the server's own error page; shown below as text
  }
  if (response.ok && answer && answer.success && Array.isArray(answer.predictions)) {
    showPredictions(answer.predictions, elapsedMs, response.headers);
  } else {
    const message = answer && typeof answer.error === "string" ? answer.error : text.trim().slice(0, 300);
    showError(response, message || "The answer had no error message.");
  }
}

function showPredictions(predictions, elapsedMs, headers) {
  const list = byId("predictions");
  for (const { label, probability } of predictions) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const track = document.createElement("span");
    track.className = "track";
    track.setAttribute("aria-hidden", "true"); // the percentage beside it says the same in words
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.min(100, Math.max(0, probability * 100))}%`;
    track.append(bar);
    const percent = document.createElement("span");
    percent.className = "probability";
    percent.textContent = formatPercent(probability);
    item.append(name, track, percent);
    list.append(item);
  }
  setState("done", "");
  byId("timing").textContent = describeTiming(elapsedMs, headers);
}

/** "HTTP 400 Bad Request" and the service's own message; a hint where the page can help. */
function showError(response, message) {
  const box = byId("error");
  const status = document.createElement("strong");
  status.className = "error-status";
  status.textContent = response ? `HTTP ${response.status} ${response.statusText}`.trim() : "No answer";
  const text = document.createElement("span");
  text.className = "error-message";
  text.textContent = message;
  box.replaceChildren(status, ": ", text);
  const hint = response ? errorHint(response) : "";
  if (hint) {
    const extra = document.createElement("span");
    extra.className = "error-hint";
    extra.textContent = hint;
    box.append(" ", extra);
  }
  if (response && response.status === 401) byId("key-box").open = true;
  setState("error", "");
  box.hidden = false;
}

function errorHint(response) {
  const retry = response.headers.get("Retry-After");
  if (response.status === 401) return "Enter a valid API key under “API key” and classify again.";
  if (retry) return `Try again in ${retry} s.`;
  return "";
}

/** One state at a time: busy (waiting for the answer), done, error, or idle. */
function setState(state, status) {
  const outcome = byId("outcome");
  outcome.dataset.state = state;
  outcome.setAttribute("aria-busy", String(state === "busy"));
  byId("upload").classList.toggle("busy", state === "busy");
  byId("send").disabled = state === "busy" || !chosen;
  byId("status").textContent = status;
  if (state === "busy") {
    byId("predictions").replaceChildren();
    byId("timing").textContent = "";
    byId("error").hidden = true;
    byId("error").replaceChildren();
  }
}

/** "Answered in 412 ms. Server: prepare 3.1 ms, wait 80.5 ms, queue 6.0 ms, inference 70.2 ms (batch of 4), return 4.3 ms, total 84.0 ms." */
function describeTiming(elapsedMs, headers) {
  let text = `Answered in ${Math.round(elapsedMs)} ms (measured by this page).`;
  const parts = parseServerTiming(headers.get("Server-Timing") || "").map(
    ({ name, dur, desc }) => `${name} ${dur.toFixed(1)} ms${desc ? ` (${desc})` : ""}`,
  );
  if (parts.length) text += ` Server: ${parts.join(", ")}.`;
  const id = headers.get("X-Request-ID");
  if (id) text += ` Request ID ${id}.`;
  return text;
}

/** 'prepare;dur=3.1, inference;dur=70.2;desc="batch of 4"' -> [{name, dur, desc}, ...] */
function parseServerTiming(header) {
  const metrics = [];
  for (const entry of header.split(",")) {
    const [name, ...params] = entry.split(";").map((part) => part.trim());
    const metric = { name, dur: NaN, desc: "" };
    for (const param of params) {
      const [key, value = ""] = param.split("=", 2).map((part) => part.trim());
      if (key === "dur") metric.dur = Number(value);
      if (key === "desc") metric.desc = value.replace(/^"(.*)"$/, "$1");
    }
    if (name && Number.isFinite(metric.dur)) metrics.push(metric);
  }
  return metrics;
}

function formatPercent(probability) {
  return `${(probability * 100).toFixed(2)}%`;
}

function formatBytes(size) {
  if (size < 1024) return `${size} bytes`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(0)} KB`;
  return `${(size / 1024 / 1024).toFixed(1)} MB`;
}

document.addEventListener("DOMContentLoaded", init);
