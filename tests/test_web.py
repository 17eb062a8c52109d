"""The browser, for real: Debian's headless Chromium (Playwright for Python) runs transformers.js and
onnxruntime-web (the pinned runtime, fetched once from the npm registry into the user cache) on exports of
several architectures, from a localhost server, with every other request refused. Greedy tokens must
equal Python onnxruntime's for fp32; each quantized variant's agreement with Python is reported. The
`patcher web` page is typed into and its answers read back while they stream. Without chromium /
playwright / the runtime (npm to fetch it) these tests skip — except under CI (env CI set), where they
fail, so CI proves the browser path."""

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_path, run_cli

from patcher.errors import PatcherError
from patcher.model.prompts import encode_prompts, load_tokenizer
from patcher.onnx.runtime import OnnxModel
from patcher.onnx.verify import stop_tokens
from patcher.web import runtime as web_runtime
from patcher.web import site as web_site
from patcher.web.serve import Server

ARCHS = ["llama", "qwen2", "qwen3", "gpt2", "phi3", "gemma2"]
PROMPT = "Tell me about the sea"
NEW_TOKENS = 10
EXPORT_DTYPES = "fp32,int4"  # what a user exports for the web (the chat page's models)
ALL_DTYPES = "fp32,fp16,int4,int8,q4f16"  # every variant transformers.js knows that patcher writes
PROBE = """<!doctype html><meta charset="utf-8"><title>probe</title>
<script type="module">
import * as T from "./js/transformers.min.js";
T.env.allowRemoteModels = false;
T.env.allowLocalModels = true;
T.env.localModelPath = "/models/";
T.env.useBrowserCache = false;
T.env.useWasmCache = false;
T.env.backends.onnx.wasm.wasmPaths = { mjs: "/js/ort-wasm-simd-threaded.asyncify.mjs",
                                       wasm: "/js/ort-wasm-simd-threaded.asyncify.wasm" };
// options === null: load exactly as a user would, with no options at all
window.generate = async (model, options, ids, max_new_tokens) => {
  const m = options === null ? await T.AutoModelForCausalLM.from_pretrained(model)
                             : await T.AutoModelForCausalLM.from_pretrained(model, options);
  const input_ids = new T.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
  const attention_mask = new T.Tensor("int64", new BigInt64Array(ids.length).fill(1n), [1, ids.length]);
  const out = await m.generate({ input_ids, attention_mask, max_new_tokens, do_sample: false });
  const dtype = m.sessions.model.config.dtype;
  await m.dispose();
  return { ids: Array.from(out.data, Number).slice(ids.length), dtype };
};
window.tokenize = async (model, text) => {
  const tok = await T.AutoTokenizer.from_pretrained(model);
  const ids = tok.apply_chat_template([{ role: "user", content: text }], { add_generation_prompt: true,
                                                                            return_dict: true }).input_ids;
  const list = Array.from(ids.data, Number);
  return { ids: list, decoded: tok.decode(list.slice(3), { skip_special_tokens: true }) };
};
window.probeReady = true;
</script>"""


def _missing() -> str | None:
    from patcher.web.browser import missing

    why = missing()
    if why:
        return why
    try:
        web_runtime.cached()  # fetched once into the user cache (the same call `patcher web` makes)
    except PatcherError as e:  # says what to install
        return str(e)
    return None


@pytest.fixture(scope="module")
def need_browser():
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, need_browser):
    """fp32 + int4 exports of each architecture (tiny fixtures, exported now)."""
    from patcher.onnx.export import export

    root = tmp_path_factory.mktemp("web-exports")
    cache = {}

    def get(
        model_type: str, src: Path | None = None, name: str | None = None, dtype: str = ALL_DTYPES
    ) -> Path:
        name = name or model_type
        if name not in cache:
            cache[name] = export(src or fixture_path(model_type), root / name, dtype=dtype)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def browser(need_browser):
    from patcher.web.browser import chromium

    with chromium() as context:
        yield context


@pytest.fixture(scope="module")
def probe(tmp_path_factory, browser, exports):
    """A page with transformers.js that loads exports copied verbatim under /models/NAME."""
    root = tmp_path_factory.mktemp("web-probe")
    rt = web_runtime.cached(fetch=False)
    (root / "js").mkdir()
    shutil.copyfile(rt.dist / web_runtime.TRANSFORMERS_MODULE, root / "js" / web_runtime.TRANSFORMERS_MODULE)
    for f in web_runtime.WASM_FILES[:2]:
        shutil.copyfile(rt.wasm_dir / f, root / "js" / f)
    (root / "index.html").write_text(PROBE)
    (root / "models").mkdir()
    with Server(root) as server:
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function("window.probeReady === true")

        def publish(name: str, folder: Path):
            if not (root / "models" / name).exists():
                shutil.copytree(folder, root / "models" / name)
            return name

        yield page, publish
        page.close()
    assert not browser.blocked, f"the page reached off localhost: {browser.blocked[:3]}"


def python_greedy(folder: Path, file: str, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    tok = load_tokenizer(folder)
    row = (
        OnnxModel(folder, file)
        .generate(np.array([ids]), np.ones((1, len(ids)), np.int64), n, eos_ids=stop_tokens(folder, tok))[0]
        .tolist()
    )
    eos = set(stop_tokens(folder, tok))
    for i, t in enumerate(row):  # transformers.js stops after the first eos, Python repeats it
        if t in eos:
            return row[: i + 1]
    return row


def prompt_ids(folder: Path) -> list[int]:
    return encode_prompts(load_tokenizer(folder), [PROMPT])[0]


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the greedy sequence that agrees before the first divergence."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


@pytest.mark.parametrize("model_type", ARCHS)
def test_tokenizer_loads_in_transformers_js(model_type, probe, exports):
    page, publish = probe
    folder = exports(model_type)
    name = publish(model_type, folder)
    got = page.evaluate("([m, t]) => window.tokenize(m, t)", [name, PROMPT])
    assert got["ids"] == prompt_ids(folder)
    tok = load_tokenizer(folder)
    assert got["decoded"] == tok.decode(got["ids"][3:], skip_special_tokens=True)


@pytest.mark.parametrize("model_type", ARCHS)
def test_export_loads_with_no_options_and_greedy_matches_python(model_type, probe, exports, record_property):
    page, publish = probe
    folder = exports(model_type)
    name = publish(model_type, folder)
    ids = prompt_ids(folder)
    cfg = json.loads((folder / "config.json").read_text())
    default = (cfg.get("transformers.js_config") or {}).get("dtype")
    default_file = {v: f"model{s}.onnx" for v, s in web_site.VARIANTS.items()}.get(default or "q8")
    # loaded exactly as a user would (no options): what the export's config picks
    got = page.evaluate("([m, ids, n]) => window.generate(m, null, ids, n)", [name, ids, NEW_TOKENS])
    assert got["ids"] == python_greedy(folder, default_file, ids), f"default ({got['dtype']}) load"
    # fp32: token for token
    got = page.evaluate(
        "([m, ids, n]) => window.generate(m, {dtype: 'fp32'}, ids, n)", [name, ids, NEW_TOKENS]
    )
    want = python_greedy(folder, "model.onnx", ids)
    assert got["dtype"] == "fp32" and got["ids"] == want
    # every quantized variant the export holds: agreement with Python on the same file, and with fp32
    variants, _ = web_site.model_files(folder)
    report = {}
    for dtype in variants:
        if dtype == "fp32":
            continue
        file = variants[dtype][0]
        got = page.evaluate(
            "([m, d, ids, n]) => window.generate(m, {dtype: d}, ids, n)", [name, dtype, ids, NEW_TOKENS]
        )
        py = python_greedy(folder, file, ids)
        report[dtype] = {
            "browser_vs_python": agreement(got["ids"], py),
            "browser_vs_fp32": agreement(got["ids"], want),
        }
        record_property(f"{dtype}_agreement", report[dtype])
        # the same graph in two onnxruntime builds: the first token (prefill) must agree
        assert got["ids"][:1] == py[:1], f"{dtype}: browser {got['ids']} vs python {py}"
    print(f"\n{model_type} browser agreement: {json.dumps(report)}")


@pytest.fixture(scope="module")
def site(tmp_path_factory, exports, need_browser):
    """`patcher web EDITED --compare ORIGINAL -o SITE` on an ablated tiny llama."""
    root = tmp_path_factory.mktemp("web-site")
    edited = root / "ablated"
    run_cli(
        "ablate", fixture_path("llama"), "-d", fixture_path("llama").parent / "direction-64.npy", "-o", edited
    )
    ex = exports("llama", edited, name="llama-ablated-web", dtype=EXPORT_DTYPES)
    orig = exports("llama", name="llama-web", dtype=EXPORT_DTYPES)
    run_cli("web", ex, "--compare", orig, "-o", root / "site", "--max-new-tokens", NEW_TOKENS)
    return root / "site", ex, orig


def read_answers(page) -> dict:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.column')].map(c => {
        const b = [...c.querySelectorAll('.msg.assistant')].at(-1);
        return [c.dataset.model, b ? b.firstChild.textContent : null]; }))""")


def test_chat_page_answers_like_python(site, browser, tmp_path):
    folder, edited, original = site
    with Server(folder) as server:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "?device=wasm")
        page.wait_for_function("!document.querySelector('#send').disabled", timeout=60_000)
        status = page.inner_text("#status")
        assert status.startswith("ready"), status
        assert page.evaluate("crossOriginIsolated")  # the server's COOP/COEP: multi-threaded WASM
        assert "ablated a rank-1 direction" in page.inner_text(
            ".column[data-model=edited] .provenance summary"
        )
        assert "unedited" in page.inner_text(".column[data-model=original] .provenance summary")
        page.fill("#prompt", PROMPT)
        page.click("#send")
        page.wait_for_function("window.patcher.answered >= 1", timeout=60_000)
        answers = read_answers(page)
        last = page.evaluate("window.patcher.state.last")
        loaded = page.evaluate("window.patcher.state.models.map((m) => [m.info.id, m.dtype])")
        page.screenshot(path=str(tmp_path / "chat.png"))
        # a second turn goes through the chat template with the history
        page.fill("#prompt", "And the mountains?")
        page.press("#prompt", "Enter")
        page.wait_for_function("window.patcher.answered >= 2", timeout=60_000)
        assert page.locator(".column[data-model=edited] .msg.assistant").count() == 2
        page.close()
    assert not errors and not browser.blocked
    tjs = json.loads((folder / "models" / "edited" / "config.json").read_text())["transformers.js_config"]
    # WASM runs the variant measured fastest there: fp32 of an fp32,int4 export (q4 has no WASM kernel)
    assert tjs["device_config"]["wasm"]["dtype"] == "fp32"
    assert dict(loaded) == {"original": "fp32", "edited": "fp32"}
    file = f"model{web_site.VARIANTS['fp32']}.onnx"
    for name, export in (("edited", edited), ("original", original)):
        tok = load_tokenizer(export)
        ids = prompt_ids(export)
        assert last[name]["prompt_ids"] == ids
        want = python_greedy(export, file, ids)
        assert last[name]["ids"] == want, name
        eos = set(stop_tokens(export, tok))
        assert answers[name] == tok.decode([t for t in want if t not in eos], skip_special_tokens=True)
    assert last["edited"]["ids"] != last["original"]["ids"]  # the ablation changed the answer


def test_site_layout_and_offline_runtime(site):
    folder, edited, _ = site
    spec = json.loads((folder / "site.json").read_text())
    assert [m["id"] for m in spec["models"]] == ["original", "edited"]
    assert spec["runtime"]["local"] and spec["runtime"]["module"].startswith("./js/")
    for f in (web_runtime.TRANSFORMERS_MODULE, *web_runtime.WASM_FILES):
        p = folder / "js" / f
        assert p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o004
    for p in (folder / "models" / "edited" / "onnx").iterdir():
        assert (edited / "onnx" / p.name).read_bytes() == p.read_bytes()
        assert p.stat().st_mode & 0o777 == 0o644
    assert "http" not in (folder / "app.js").read_text().replace("https://", "")  # no hard-coded remote


def test_cdn_site_pins_versions(site, tmp_path):
    _, edited, _ = site
    run_cli("web", edited, "-o", tmp_path / "s", "--cdn")
    rt = json.loads((tmp_path / "s" / "site.json").read_text())["runtime"]
    tjs, ort = (web_runtime.PINS[p].version for p in (web_runtime.TRANSFORMERS_PKG, web_runtime.ORT_PKG))
    cdn = "https://cdn.jsdelivr.net/npm"
    assert rt["module"] == f"{cdn}/@huggingface/transformers@{tjs}/dist/transformers.min.js"
    assert rt["wasm_base"] == f"{cdn}/onnxruntime-web@{ort}/dist/"
    assert not (tmp_path / "s" / "js").exists()
    # the pinned onnxruntime-web is the exact build transformers.js's own package.json asks for
    cached = web_runtime.cached(fetch=False)
    pkg = json.loads((cached.dist.parent / "package.json").read_text())
    assert (pkg["version"], pkg["dependencies"]["onnxruntime-web"]) == (tjs, ort)
    assert json.loads((cached.wasm_dir.parent / "package.json").read_text())["version"] == ort
    assert (rt["transformers"], rt["onnxruntime_web"]) == (tjs, ort)


def test_output_rules(site, tmp_path):
    _, edited, _ = site
    r = run_cli("web", edited, "-o", edited / "site", expect=1)
    assert "inside the input" in r.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = run_cli("web", edited, "-o", tmp_path / "mine", "--force", expect=1)
    assert "not a patcher output" in r.output and (tmp_path / "mine" / "notes.txt").exists()
    run_cli("web", edited, "-o", tmp_path / "s")
    run_cli("web", edited, "-o", tmp_path / "s", expect=1)
    run_cli("web", edited, "-o", tmp_path / "s", "--force")
    r = run_cli("web", fixture_path("llama"), "-o", tmp_path / "t", expect=1)
    assert "not an ONNX export" in r.output
    r = run_cli("web", edited, "-o", tmp_path / "u", "--js", tmp_path, expect=1)
    assert "no transformers.js build" in r.output


def test_server_mime_types_and_no_listing(site):
    import urllib.error
    import urllib.request

    folder, _, _ = site
    with Server(folder) as server:
        for path, mime in (
            ("js/ort-wasm-simd-threaded.asyncify.wasm", "application/wasm"),
            ("js/ort-wasm-simd-threaded.asyncify.mjs", "text/javascript"),
            ("app.js", "text/javascript"),
            ("site.json", "application/json"),
        ):
            with urllib.request.urlopen(server.url + path) as r:
                assert r.headers["Content-Type"] == mime
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(server.url + "models/")
    assert server.url.startswith("http://127.0.0.1:")


def test_serve_flag_serves_and_stops_cleanly(site, tmp_path):
    import signal
    import subprocess
    import sys
    import urllib.request

    _, edited, _ = site
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from patcher.cli import main; main()",
            "web",
            str(edited),
            "-o",
            str(tmp_path / "s"),
            "--serve",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/site.json", timeout=2) as r:
                    assert json.loads(r.read())["models"][0]["id"] == "edited"
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in out and "stopped" in out and "Traceback" not in err


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "dtypes, want", [(ALL_DTYPES, "fp16"), ("fp32,int4", "fp32"), ("int4,int8", "q8"), ("q4f16,int4", "q4")]
)
def test_site_wasm_variant_when_the_export_names_none(exports, tmp_path, dtypes, want):
    # an export made before the per-device choice was recorded: the float variants first (quality), then
    # int8 MatMulInteger (WASM's fastest), 4-bit last; the export's other settings stay
    folder = tmp_path / "x"
    shutil.copytree(exports("llama", name=f"llama-{dtypes}", dtype=dtypes), folder)
    cfg = json.loads((folder / "config.json").read_text())
    src = cfg["transformers.js_config"]
    (src.get("device_config") or {}).pop("wasm", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    run_cli("web", folder, "-o", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "models" / "edited" / "config.json").read_text())
    cfg = cfg["transformers.js_config"]
    assert cfg["device_config"]["wasm"] == {"dtype": want}
    assert {k: v for k, v in cfg.items() if k != "device_config"} == {
        k: v for k, v in src.items() if k != "device_config"
    }
    assert cfg["device_config"].get("webgpu") == (src.get("device_config") or {}).get("webgpu")


def test_site_keeps_the_exports_own_wasm_choice(exports, tmp_path):
    folder = tmp_path / "x"
    shutil.copytree(exports("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["transformers.js_config"]["device_config"] = {"wasm": {"dtype": "q4"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    run_cli("web", folder, "-o", tmp_path / "s")
    site = json.loads((tmp_path / "s" / "models" / "edited" / "config.json").read_text())
    assert site["transformers.js_config"]["device_config"] == {"wasm": {"dtype": "q4"}}


# --- the chat page as a user meets it: streaming, stop, new chat, layout -------------------------------

STREAM_TOKENS = 300  # the tiny llama's greedy answer runs the whole length (no eos): > 1 s in the browser
LONG_TOKENS = 2000  # an answer that only "stop" ends within the test's time

# One answer, measured inside the page: timer ticks and animation frames while the model works, every
# distinct text the answer bubble showed before it was finished. A page that generates on its own thread
# shows none of these until the answer is complete.
WATCH = """async ({ prompt, stopAfter, resetAfter }) => {
  const st = window.patcher.state, log = document.querySelector('.column .log');
  const until = (ok) => new Promise((done) => {
    const poll = () => ok() ? done() : setTimeout(poll, 5);
    poll();
  });
  const answer = () => [...log.querySelectorAll('.msg.assistant')].at(-1);
  let ticks = 0, frames = 0;
  const clock = setInterval(() => ticks++, 25);
  const frame = () => { frames++; if (st.busy) requestAnimationFrame(frame); };
  const partial = [];
  const watch = new MutationObserver(() => {
    const b = answer();
    if (b?.classList.contains('pending') && b.textContent && b.textContent !== partial.at(-1)) {
      partial.push(b.textContent);
    }
  });
  watch.observe(log, { subtree: true, childList: true, characterData: true });
  const t0 = performance.now();
  document.querySelector('#prompt').value = prompt;
  document.querySelector('#send').click();
  requestAnimationFrame(frame);
  let actedMs = null, logsAfterReset = null, textsAfterReset = null;
  if (stopAfter || resetAfter) {
    await until(() => partial.length >= 3);  // the answer is streaming
    const t = performance.now();
    document.querySelector(stopAfter ? '#stop' : '#reset').click();
    if (resetAfter) {
      logsAfterReset = log.children.length;
      await new Promise((r) => setTimeout(r, 200));  // pieces of the old answer must not come back
      textsAfterReset = log.textContent.length;
    }
    await until(() => !st.busy);
    actedMs = performance.now() - t;
  } else {
    await until(() => !st.busy);
  }
  clearInterval(clock);
  watch.disconnect();
  return { ms: performance.now() - t0, ticks, frames, partial, actedMs, logsAfterReset, textsAfterReset,
           last: st.last, status: document.querySelector('#status').textContent,
           meta: answer()?.querySelector('.meta')?.textContent ?? null };
}"""


@pytest.fixture(scope="module")
def single(tmp_path_factory, exports, need_browser):
    """`patcher web` on one unedited export (no --compare), and what the command printed."""
    root = tmp_path_factory.mktemp("web-single")
    ex = exports("llama", name="llama-web", dtype=EXPORT_DTYPES)
    r = run_cli("web", ex, "-o", root / "site")
    return root / "site", ex, r.output


@contextmanager
def chat_page(browser, folder: Path, query: str = "device=wasm"):
    """The page, loaded and ready; yields (page, problems): page errors and failed requests (a 404
    favicon included) collected while it was open."""
    with Server(folder) as server:
        page = browser.new_page()
        problems = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))
        page.goto(f"{server.url}?{query}")
        page.wait_for_function("!document.querySelector('#send').disabled", timeout=60_000)
        try:
            yield page, problems
        finally:
            page.close()


def test_answer_streams_while_the_page_keeps_drawing(single, browser):
    folder, export, _ = single
    with chat_page(browser, folder, f"device=wasm&max_new_tokens={STREAM_TOKENS}") as (page, problems):
        got = page.evaluate(WATCH, {"prompt": PROMPT})
    assert not problems and not browser.blocked
    last = got["last"]["edited"]
    want = python_greedy(export, "model.onnx", prompt_ids(export), STREAM_TOKENS)
    assert last["ids"] == want and len(want) == STREAM_TOKENS  # fp32 on WASM, token for token
    final = load_tokenizer(export).decode(want, skip_special_tokens=True)
    assert last["text"] == final
    # the answer appeared piece by piece, each piece the start of the final answer
    assert len(got["partial"]) >= 10, got["partial"]
    assert all(final.startswith(p) for p in got["partial"])
    assert len(set(got["partial"])) == len(got["partial"])
    # the page's own thread stayed free: its timers and frames ran during the answer
    assert got["ms"] > 500, "the answer was too short to show anything"
    # (a model on the page's thread gives 0-1 of each: a blocked timer fires once when freed; on the
    # 2-core CI box the WASM threads leave the page thread few slices: 4 ticks and 7 frames were seen)
    assert got["ticks"] >= 3 and got["frames"] >= 3, got


def test_stop_ends_the_answer_within_a_second(single, browser):
    folder, export, _ = single
    with chat_page(browser, folder, f"device=wasm&max_new_tokens={LONG_TOKENS}") as (page, problems):
        got = page.evaluate(WATCH, {"prompt": PROMPT, "stopAfter": True})
        page.fill("#prompt", "And the mountains?")  # the chat goes on after a stop
        page.press("#prompt", "Enter")
        page.wait_for_function("window.patcher.answered >= 2", timeout=120_000)
        history = page.evaluate("window.patcher.state.models[0].messages.length")
    assert not problems
    last = got["last"]["edited"]
    assert got["actedMs"] < 1000, got["actedMs"]
    assert last["stopped"] and 0 < len(last["ids"]) < LONG_TOKENS
    assert last["ids"] == python_greedy(export, "model.onnx", prompt_ids(export), len(last["ids"]))
    assert got["status"].startswith("stopped") and got["meta"].endswith("stopped")
    assert history == 4  # the stopped answer stays in the conversation


def test_new_chat_during_an_answer(single, browser):
    folder, export, _ = single
    with chat_page(browser, folder, f"device=wasm&max_new_tokens={LONG_TOKENS}") as (page, problems):
        got = page.evaluate(WATCH, {"prompt": "Something long", "resetAfter": True})
        page.fill("#prompt", PROMPT)
        page.press("#prompt", "Enter")
        page.wait_for_function("window.patcher.answered >= 2", timeout=60_000)
        last = page.evaluate("window.patcher.state.last")
        bubbles = page.locator(".msg").count()
    assert not problems
    assert got["logsAfterReset"] == 0 and got["textsAfterReset"] == 0  # cleared at once, stays clear
    assert got["actedMs"] < 1000  # and the old answer stopped
    # the new conversation starts from nothing: the prompt is the single-turn one
    assert last["edited"]["prompt_ids"] == prompt_ids(export) and bubbles == 2


def test_wasm_default_variant_is_the_one_the_docs_name(exports, browser, tmp_path):
    import re

    readme = " ".join((Path(__file__).resolve().parents[1] / "docs" / "web.md").read_text().split())
    order = re.search(r"else the first of `([a-z0-9, ]+)` it holds", readme)  # whatever the line breaks
    assert order, "docs/web.md no longer says which variant WASM runs by default"
    order = tuple(order[1].split(", "))
    assert order == web_site.WASM_ORDER
    folder = exports("llama")  # every variant patcher writes
    own = (
        (
            json.loads((folder / "config.json").read_text())["transformers.js_config"].get("device_config")
            or {}
        )
        .get("wasm", {})
        .get("dtype")
    )
    variants, _ = web_site.model_files(folder)
    want = own or next(d for d in order if d in variants)
    run_cli("web", folder, "-o", tmp_path / "s")
    with chat_page(browser, tmp_path / "s") as (page, problems):
        loaded = page.evaluate("window.patcher.state.models.map((m) => m.dtype)")
        tag = page.inner_text(".column h2 .tag")
        choice = page.inner_text("#dtype option[value=default]")
    assert not problems
    assert loaded == [want] and tag == f"{want} · wasm" and want in choice


def test_compare_layout_fits_the_viewport(site, browser):
    folder, _, _ = site
    with chat_page(browser, folder, "device=wasm&max_new_tokens=4") as (page, problems):
        titles = page.locator(".column h2").evaluate_all("hs => hs.map((h) => h.firstChild.textContent)")
        page.fill("#prompt", PROMPT)
        page.click("#send")
        page.wait_for_function("window.patcher.answered >= 1", timeout=60_000)
        # a 2 000-character answer with no place to break, in both columns, as the page shows answers
        width = page.evaluate("""() => {
          const long = 'x'.repeat(2000);
          for (const b of document.querySelectorAll('.msg.assistant')) b.firstChild.textContent = long;
          const cols = [...document.querySelectorAll('.column')].map((c) => c.getBoundingClientRect().right);
          return { page: document.documentElement.scrollWidth, view: innerWidth, right: Math.max(...cols) };
        }""")
    assert not problems  # no 404 (favicon included), no page error
    assert titles == ["original", "edited"]
    assert width["page"] <= width["view"] and width["right"] <= width["view"], width


def test_single_unedited_column_and_hint(single, browser, site, tmp_path):
    folder, export, printed = single
    spec = json.loads((folder / "site.json").read_text())
    assert [m["label"] for m in spec["models"]] == ["unedited"]
    with chat_page(browser, folder) as (page, problems):
        title = page.locator(".column h2").evaluate("h => h.firstChild.textContent")
        # the page names its icon, and the site has it (else browsers ask for /favicon.ico: a 404)
        icon = page.evaluate("document.querySelector('link[rel=icon]')?.href")
        got = page.evaluate(
            "async (u) => { const r = await fetch(u); return [r.status, r.headers.get('content-type')]; }",
            icon,
        )
    assert title == "unedited" and not problems
    assert icon.endswith("/favicon.svg") and got == [200, "image/svg+xml"]
    assert f"`patcher web {export} -o {folder} --force --serve`" in " ".join(printed.split())
    # the hint repeats every option given, --compare included
    _, edited, original = site
    r = run_cli("web", edited, "--compare", original, "-o", tmp_path / "c", "--max-new-tokens", "7")
    hint = " ".join(r.output.split())
    want = f"patcher web {edited} -o {tmp_path / 'c'} --compare {original} --max-new-tokens 7 --force --serve"
    assert f"`{want}`" in hint


def test_serve_checks_the_port_before_building(single, tmp_path):
    import socket

    _, export, _ = single
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("web", export, "-o", tmp_path / "s", "--serve", "--port", port, expect=1)
    assert f"127.0.0.1:{port}" in r.output and "cannot listen" in r.output
    assert not (tmp_path / "s").exists()  # nothing was built


def test_site_keeps_the_exports_recorded_defaults(exports, tmp_path):
    # the export's own choice per device (quality first: fp16 when present) stays
    folder = exports("llama")
    run_cli("web", folder, "-o", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "models" / "edited" / "config.json").read_text())
    src = json.loads((folder / "config.json").read_text())["transformers.js_config"]
    assert cfg["transformers.js_config"]["device_config"]["wasm"] == {"dtype": "fp16"}
    assert cfg["transformers.js_config"]["dtype"] == src["dtype"]
    assert cfg["transformers.js_config"]["use_external_data_format"] == src["use_external_data_format"]


@pytest.mark.parametrize(
    "damage, says",
    [
        ("truncate", "model.onnx_data: truncated: weight"),
        ("delete", "which is missing from"),
        ("cut graph", "not a readable ONNX file"),
    ],
)
def test_a_damaged_export_is_refused_before_the_site_is_built(tmp_path, damage, says):
    """A missing or truncated weight file would only fail in the visitor's browser: one line, no site."""
    from patcher.onnx.export import export

    folder = export(fixture_path("llama"), tmp_path / "x")
    data, graph = folder / "onnx" / "model.onnx_data", folder / "onnx" / "model.onnx"
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "delete":
        data.unlink()
    else:
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 4])
    res = run_cli("web", folder, "-o", tmp_path / "site", expect=1)
    assert says in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "site").exists()
