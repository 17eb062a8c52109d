// patcher web: the models live and generate here, off the page's thread, so the page keeps drawing, streams
// each piece of text as it comes and answers "stop" / "new chat" while a model is generating.
// In: init {runtime, modelsPath}, load {id, device, dtype}, generate {id, messages, ...}, stop.
// Out: ready, loaded {dtype, device}, token {text}, done {ids, text, ...}, failed {error}; each with the
// request's rid.
let T = null;
const models = new Map();  // id -> { tokenizer, model, dtype, device }
let running = null;  // the generation in progress: its InterruptableStoppingCriteria

async function init({ runtime, modelsPath }) {
  T = await import(runtime.module);
  T.env.allowRemoteModels = false;  // only the site's files, never the Hugging Face hub
  T.env.allowLocalModels = true;
  T.env.localModelPath = modelsPath;  // a path: full URLs count as remote
  T.env.useBrowserCache = false;  // a rebuilt site reuses URLs: never answer from a stale cached copy
  T.env.useWasmCache = false;
  T.env.backends.onnx.wasm.wasmPaths = { mjs: runtime.wasm_base + runtime.wasm_files[0],
                                         wasm: runtime.wasm_base + runtime.wasm_files[1] };
  return { crossOriginIsolated: self.crossOriginIsolated };
}

async function load({ id, device, dtype }) {
  const m = models.get(id) ?? {};
  await m.model?.dispose?.();
  m.tokenizer ??= await T.AutoTokenizer.from_pretrained(id);
  const opts = { device, ...(dtype ? { dtype } : {}) };
  m.device = device;
  try {
    m.model = await T.AutoModelForCausalLM.from_pretrained(id, opts);
  } catch (e) {
    if (device !== "webgpu") throw e;
    console.warn("WebGPU load failed, falling back to WASM:", e);
    m.device = "wasm";
    m.model = await T.AutoModelForCausalLM.from_pretrained(id, { ...opts, device: "wasm" });
  }
  m.dtype = m.model.sessions?.model?.config?.dtype ?? dtype;
  models.set(id, m);
  return { id, dtype: m.dtype, device: m.device };
}

// generate() pushes the prompt, then each new token: after every token, post the whole answer so far
// (a token is often part of a word, or of one UTF-8 character: an unfinished one waits for the next token)
function answerStreamer(tok, rid) {
  const ids = [];
  let prompt = true;
  return Object.assign(new T.BaseStreamer(), {
    put(value) {
      if (prompt) { prompt = false; return; }
      ids.push(...value[0]);
      const text = tok.decode(ids, { skip_special_tokens: true });
      if (!text.endsWith("\uFFFD")) self.postMessage({ type: "token", rid, text, tokens: ids.length });
    },
    end() {},
  });
}

// a macrotask (no timer clamping): messages already queued, like "stop", run before it resolves
function nextTask() {
  return new Promise((resolve) => {
    const { port1, port2 } = new MessageChannel();
    port1.onmessage = () => { port1.close(); resolve(); };
    port2.postMessage(null);
  });
}

async function generate({ rid, id, messages, max_new_tokens, sample }) {
  const { tokenizer: tok, model, dtype, device } = models.get(id);
  const inputs = tok.chat_template
    ? tok.apply_chat_template(messages, { add_generation_prompt: true, return_dict: true })
    : tok(messages.map((x) => x.content).join("\n"));
  const promptLength = inputs.input_ids.dims.at(-1);
  const streamer = answerStreamer(tok, rid);
  running = new T.InterruptableStoppingCriteria();
  // The WASM backend computes a step without giving this thread back to its event loop, so a "stop"
  // message would wait for the whole answer: let pending messages in before each step.
  const forward = model.forward;
  model.forward = async (step) => { await nextTask(); return forward.call(model, step); };
  const started = performance.now();
  try {
    const seq = await model.generate({ ...inputs, max_new_tokens, do_sample: sample,
      ...(sample ? { temperature: 0.7 } : {}), repetition_penalty: 1.0, streamer,
      stopping_criteria: [running] });
    const seconds = (performance.now() - started) / 1000;
    const ids = Array.from(seq.slice(null, [promptLength, null]).data, Number);
    return { rid, ids, seconds, dtype, device, stopped: running.interrupted,
             text: tok.decode(ids, { skip_special_tokens: true }),
             prompt_ids: Array.from(inputs.input_ids.data, Number) };
  } finally {
    model.forward = forward;
    running = null;
  }
}

const HANDLERS = { init: [init, "ready"], load: [load, "loaded"], generate: [generate, "done"] };
let queue = Promise.resolve();  // one request at a time (a WASM session runs one call at a time)

self.onmessage = ({ data }) => {
  if (data.type === "stop") {  // not queued: it must reach the generation in progress
    running?.interrupt();
    return;
  }
  const [handle, reply] = HANDLERS[data.type];
  queue = queue.then(() => handle(data)).then(
    (result) => self.postMessage({ type: reply, rid: data.rid, ...result }),
    (e) => {
      console.error(e);
      self.postMessage({ type: "failed", rid: data.rid, request: data.type, error: String(e?.message ?? e) });
    });
};
