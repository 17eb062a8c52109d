// patcher web: chat with an exported (edited) model in the browser through transformers.js.
// Everything comes from this folder (site.json says which models, variants and runtime); no server code.
// The models run in a Web Worker (worker.js): this thread only draws, so the page never freezes.
const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const statusBox = $("#status");
const say = (msg, error = false) => {
  statusBox.textContent = msg;
  statusBox.classList.toggle("error", error);
};

const state = { site: null, models: [], busy: false, stopping: false, epoch: 0, device: null, last: {} };
// for tests and the curious: window.patcher.ready resolves once the models are loaded
let markReady, markFailed;
window.patcher = { state, ready: new Promise((ok, bad) => { markReady = ok; markFailed = bad; }) };

async function pickDevice(choice) {
  if (choice !== "auto") return choice;
  try {
    if (navigator.gpu && await navigator.gpu.requestAdapter()) return "webgpu";
  } catch { /* no adapter: CPU */ }
  return "wasm";
}

function describe(value) {
  if (value === null || value === undefined) return "—";
  if (Array.isArray(value)) return value.map(describe).join(", ");
  if (typeof value === "object") {
    return Object.entries(value).map(([k, v]) => `${k}=${describe(v)}`).join("; ");
  }
  return String(value);
}

// One line that says what was done to the weights, then every recorded field.
function provenancePanel(p) {
  const box = document.createElement("details");
  box.className = "provenance";
  const edits = p.edit ? (Array.isArray(p.edit) ? p.edit : [p.edit]) : [];
  const summary = edits.length ? edits.map((e) => {
    if (typeof e !== "object") return String(e);
    const where = e.layers ? `layers ${describe(e.layers)}` : "all layers";
    if (e.op === "ablate") {
      return `ablated a rank-${e.rank ?? 1} direction (${where}, scale ${describe(e.scale ?? 1)}, ` +
        `targets ${describe(e.targets)})`;
    }
    if (e.op === "inject") {
      return `injected ${describe(e.alpha)} × r̂ into ${describe(e.target ?? e.targets)} at ` +
        `layer ${describe(e.layer ?? e.layers)}`;
    }
    return e.op ? `${e.op}` : describe(e);
  }).join(" → ") : "unedited (no edit recorded in the weights)";
  box.innerHTML = "<summary></summary><dl></dl>";
  box.querySelector("summary").textContent = summary;
  const rows = [["source", p.source], ["architecture", p.model_type], ["layers", p.layers],
                ["exported by", p.export_command], ["patcher", p.patcher]];
  edits.forEach((e, i) => {
    if (typeof e !== "object") return;
    for (const [k, v] of Object.entries(e)) rows.push([`edit${edits.length > 1 ? i + 1 : ""}.${k}`, v]);
  });
  const dl = box.querySelector("dl");
  for (const [k, v] of rows) {
    if (v === null || v === undefined) continue;
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = describe(v);
    dl.append(dt, dd);
  }
  return box;
}

function buildColumns() {
  const main = $("#columns");
  main.innerHTML = "";
  for (const m of state.models) {
    const col = document.createElement("section");
    col.className = "column";
    col.dataset.model = m.info.id;
    const h = document.createElement("h2");
    h.textContent = m.info.label;
    h.title = m.info.source ?? "";
    const tag = document.createElement("span");
    tag.className = "tag";
    h.append(tag);
    const log = document.createElement("div");
    log.className = "log";
    log.setAttribute("aria-live", "polite");
    col.append(h, provenancePanel(m.info.provenance), log);
    main.append(col);
    Object.assign(m, { log, tag });
  }
}

function bubble(m, role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  m.log.append(div);
  m.log.scrollTop = m.log.scrollHeight;
  return div;
}

// The worker and its requests: every reply names the request (rid) it answers.
const worker = new Worker(new URL("worker.js", import.meta.url), { type: "module" });
const calls = new Map();  // rid -> { resolve, reject, onToken }
let nextRid = 0;

function call(type, body = {}, onToken = null) {
  const rid = ++nextRid;
  return new Promise((resolve, reject) => {
    calls.set(rid, { resolve, reject, onToken });
    worker.postMessage({ type, rid, ...body });
  });
}

worker.onmessage = ({ data }) => {
  const c = calls.get(data.rid);
  if (!c) return;
  if (data.type === "token") return c.onToken?.(data.text, data.tokens);
  calls.delete(data.rid);
  if (data.type === "failed") c.reject(new Error(data.error));
  else c.resolve(data);
};
worker.onerror = (e) => {  // the worker itself failed (its script did not load): every call fails
  const error = new Error(`the model worker failed: ${e.message ?? "could not start"}`);
  for (const c of calls.values()) c.reject(error);
  calls.clear();
  say(error.message, true);
};

async function loadModels() {
  const want = $("#dtype").value;
  state.device = await pickDevice($("#device").value);
  for (const m of state.models) {
    const dtype = want === "default" ? undefined : want;
    if (dtype && !m.info.variants.includes(dtype)) {
      throw new Error(`${m.info.label} has no ${dtype} variant (it has ${m.info.variants.join(", ")})`);
    }
    const chosen = dtype ?? m.info.device_dtype?.[state.device] ?? m.info.default_dtype ?? "default";
    say(`loading ${m.info.label} (${chosen}, ${state.device})…`);
    const got = await call("load", { id: m.info.id, device: state.device, dtype });
    state.device = got.device;  // WebGPU that failed to load falls back to WASM
    m.dtype = got.dtype ?? chosen;
    m.tag.textContent = `${m.dtype} · ${got.device}`;
  }
}

async function answer(m, text, epoch, progress) {
  m.messages.push({ role: "user", content: text });
  bubble(m, "user", text);
  const out = bubble(m, "assistant", "");
  out.classList.add("pending");
  const sample = $("#sample").checked;
  const r = await call("generate", {
    id: m.info.id, messages: m.messages, sample,
    max_new_tokens: Number($("#max-tokens").value) || state.site.max_new_tokens,
  }, (text, tokens) => {
    if (epoch !== state.epoch) return;  // "new chat" was pressed: this answer is gone
    progress.tokens = tokens;
    out.textContent = text;
    m.log.scrollTop = m.log.scrollHeight;
  });
  if (epoch !== state.epoch) return;
  out.textContent = r.text;
  out.classList.remove("pending");
  const meta = document.createElement("span");
  meta.className = "meta";
  const rate = (r.ids.length / Math.max(r.seconds, 1e-3)).toFixed(1);
  meta.textContent = `${r.ids.length} tokens · ${rate} tok/s · ${r.dtype} · ${r.device}` +
    (r.stopped ? " · stopped" : "");
  out.append(meta);
  m.messages.push({ role: "assistant", content: r.text });
  state.last[m.info.id] = { ids: r.ids, text: r.text, prompt_ids: r.prompt_ids, seconds: r.seconds,
                            stopped: r.stopped };
}

function setBusy(busy) {
  state.busy = busy;
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  for (const id of ["#dtype", "#device"]) $(id).disabled = busy;
}

async function send(event) {
  event?.preventDefault();
  const box = $("#prompt");
  const text = box.value.trim();
  if (!text || state.busy || $("#send").disabled) return;
  setBusy(true);
  state.stopping = false;
  box.value = "";
  const epoch = state.epoch;
  const started = performance.now();
  const progress = { who: "", tokens: 0 };
  const clock = setInterval(() => {  // a live clock: the page is drawn while the model works
    say(`${progress.who} is answering… ${((performance.now() - started) / 1000).toFixed(1)} s · ` +
        `${progress.tokens} tokens`);
  }, 100);
  try {
    for (const m of state.models) {  // one after the other: the WASM backend runs one session at a time
      if (state.stopping) break;
      Object.assign(progress, { who: m.info.label, tokens: 0 });
      say(`${progress.who} is answering…`);
      await answer(m, text, epoch, progress);
    }
    say(`${state.stopping ? "stopped" : "ready"} · ${state.device} · ` +
        `transformers.js ${state.site.runtime.transformers}`);
  } catch (e) {
    console.error(e);
    say(`error: ${e.message ?? e}`, true);
  } finally {
    clearInterval(clock);
    setBusy(false);
    box.focus();
    window.patcher.answered = (window.patcher.answered ?? 0) + 1;
  }
}

function stop() {
  if (!state.busy) return;
  state.stopping = true;
  worker.postMessage({ type: "stop" });
}

function reset() {
  stop();
  state.epoch += 1;
  for (const m of state.models) { m.messages = []; m.log.innerHTML = ""; }
  state.last = {};
}

async function reload() {
  $("#send").disabled = true;
  $("#prompt").disabled = true;
  try {
    await loadModels();
    reset();
    say(`ready · ${state.device} · transformers.js ${state.site.runtime.transformers}`);
    $("#send").disabled = false;
    $("#prompt").disabled = false;
    $("#prompt").focus();
  } catch (e) {
    console.error(e);
    say(`could not load the model: ${e.message ?? e}`, true);
    throw e;
  }
}

// what "default" loads: the config's dtype, or its per-device choice (device_config)
function defaults(models) {
  const per = (dev) => describe([...new Set(models.map((m) => m.device_dtype?.[dev] ?? m.default_dtype))]);
  const [gpu, cpu] = [per("webgpu"), per("wasm")];
  return gpu === cpu ? cpu : `WebGPU ${gpu}, WASM ${cpu}`;
}

async function main() {
  state.site = await (await fetch("site.json")).json();
  const site = state.site;
  const url = (path) => new URL(path, location.href).href;
  await call("init", {
    runtime: { ...site.runtime, module: url(site.runtime.module), wasm_base: url(site.runtime.wasm_base) },
    modelsPath: new URL("models/", location.href).pathname,
  });
  state.models = site.models.map((info) => ({ info, messages: [] }));
  $("#max-tokens").value = params.get("max_new_tokens") ?? site.max_new_tokens;
  const variants = [...new Set(site.models.flatMap((m) => m.variants))];
  const dtypeBox = $("#dtype");
  dtypeBox.innerHTML = "";
  for (const v of ["default", ...variants]) dtypeBox.append(new Option(v === "default" ?
    `default (${defaults(site.models)})` : v, v));
  if (params.get("dtype")) dtypeBox.value = params.get("dtype");
  if (params.get("device")) $("#device").value = params.get("device");
  buildColumns();
  await reload();
  dtypeBox.addEventListener("change", () => reload().catch(() => {}));
  $("#device").addEventListener("change", () => reload().catch(() => {}));
  $("#chat").addEventListener("submit", send);
  $("#stop").addEventListener("click", stop);
  $("#reset").addEventListener("click", reset);
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
    if (e.key === "Escape") stop();
  });
}

main().then(() => markReady(true), (e) => { say(`error: ${e.message ?? e}`, true); markFailed(e); });
