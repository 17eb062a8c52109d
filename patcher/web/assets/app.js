// patcher web: chat with an exported (edited) model in the browser through transformers.js.
// Everything comes from this folder (site.json says which models, variants and runtime); no server code.
const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const statusBox = $("#status");
const say = (msg, error = false) => {
  statusBox.textContent = msg;
  statusBox.classList.toggle("error", error);
};

const state = { site: null, T: null, models: [], busy: false, device: null, last: {} };
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

async function loadModels() {
  const { AutoTokenizer, AutoModelForCausalLM } = state.T;
  const want = $("#dtype").value;
  state.device = await pickDevice($("#device").value);
  for (const m of state.models) {
    const dtype = want === "default" ? undefined : want;
    if (dtype && !m.info.variants.includes(dtype)) {
      throw new Error(`${m.info.label} has no ${dtype} variant (it has ${m.info.variants.join(", ")})`);
    }
    say(`loading ${m.info.label} (${dtype ?? m.info.default_dtype ?? "default"}, ${state.device})…`);
    await m.model?.dispose?.();
    m.tokenizer ??= await AutoTokenizer.from_pretrained(m.info.id);
    const opts = { device: state.device, ...(dtype ? { dtype } : {}) };
    try {
      m.model = await AutoModelForCausalLM.from_pretrained(m.info.id, opts);
    } catch (e) {
      if (state.device !== "webgpu") throw e;
      console.warn("WebGPU load failed, falling back to WASM:", e);
      state.device = "wasm";
      m.model = await AutoModelForCausalLM.from_pretrained(m.info.id, { ...opts, device: "wasm" });
    }
    m.dtype = m.model.sessions?.model?.config?.dtype ?? dtype ?? m.info.default_dtype;
    m.tag.textContent = `${m.dtype} · ${state.device}`;
  }
}

async function answer(m, text) {
  const { TextStreamer } = state.T;
  m.messages.push({ role: "user", content: text });
  bubble(m, "user", text);
  const out = bubble(m, "assistant", "");
  out.classList.add("pending");
  const tok = m.tokenizer;
  const inputs = tok.chat_template
    ? tok.apply_chat_template(m.messages, { add_generation_prompt: true, return_dict: true })
    : tok(m.messages.map((x) => x.content).join("\n"));
  const promptLength = inputs.input_ids.dims.at(-1);
  let streamed = "", count = 0;
  const streamer = new TextStreamer(tok, { skip_prompt: true, skip_special_tokens: true,
    callback_function: (piece) => {
      streamed += piece;
      out.textContent = streamed;
      m.log.scrollTop = m.log.scrollHeight;
    },
    token_callback_function: () => { count += 1; } });
  const sample = $("#sample").checked;
  const started = performance.now();
  const seq = await m.model.generate({ ...inputs, max_new_tokens: Number($("#max-tokens").value) || 64,
    do_sample: sample, ...(sample ? { temperature: 0.7 } : {}), repetition_penalty: 1.0, streamer });
  const seconds = (performance.now() - started) / 1000;
  const ids = Array.from(seq.slice(null, [promptLength, null]).data, Number);
  const reply = tok.decode(ids, { skip_special_tokens: true });
  out.textContent = reply;
  out.classList.remove("pending");
  const meta = document.createElement("span");
  meta.className = "meta";
  const rate = (ids.length / seconds).toFixed(1);
  meta.textContent = `${ids.length} tokens · ${rate} tok/s · ${m.dtype} · ${state.device}`;
  out.append(meta);
  m.messages.push({ role: "assistant", content: reply });
  const prompt_ids = Array.from(inputs.input_ids.data, Number);
  state.last[m.info.id] = { ids, text: reply, prompt_ids, seconds };
}

async function send(event) {
  event?.preventDefault();
  const box = $("#prompt");
  const text = box.value.trim();
  if (!text || state.busy) return;
  state.busy = true;
  box.value = "";
  $("#send").disabled = true;
  try {
    for (const m of state.models) {  // one after the other: the WASM backend runs one session at a time
      say(`${m.info.label} is answering…`);
      await answer(m, text);
    }
    say(`ready · ${state.device} · transformers.js ${state.site.runtime.transformers}`);
  } catch (e) {
    console.error(e);
    say(`error: ${e.message ?? e}`, true);
  } finally {
    state.busy = false;
    $("#send").disabled = false;
    box.focus();
    window.patcher.answered = (window.patcher.answered ?? 0) + 1;
  }
}

function reset() {
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
  state.T = await import(site.runtime.module);
  const { env } = state.T;
  env.allowRemoteModels = false;  // only this folder's files, never the Hugging Face hub
  env.allowLocalModels = true;
  env.localModelPath = new URL("models/", location.href).pathname;  // a path: full URLs count as remote
  env.useBrowserCache = false;  // a rebuilt site reuses URLs: never answer from a stale cached copy
  env.useWasmCache = false;
  const base = new URL(site.runtime.wasm_base, location.href).href;
  const [mjs, wasm] = site.runtime.wasm_files;
  env.backends.onnx.wasm.wasmPaths = { mjs: base + mjs, wasm: base + wasm };
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
  $("#reset").addEventListener("click", reset);
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
}

main().then(() => markReady(true), (e) => { say(`error: ${e.message ?? e}`, true); markFailed(e); });
