"""Benchmark patcher's ONNX variants in the browser: onnxruntime-web (WASM) in headless Chromium, against
Python onnxruntime on the same files.

It writes (or reuses, with --workdir) a random llama-layout bf16 checkpoint (bench_extract.make_model;
default shape ~113M parameters: d 576, 16 layers, ff 1536, 9 heads / 3 KV heads, vocab 49152 — the
SmolLM-135M family's widths with fewer layers), exports it with `patcher.onnx.export.export` as fp32 (and
fp16), and as int4 at each block size x accuracy level asked for (--blocks, --accuracy), one folder each.

Then, in one Chromium page served from 127.0.0.1 (Playwright for Python driving the system Chromium,
nothing else reachable), for each variant: create an onnxruntime-web InferenceSession (WASM EP,
graphOptimizationLevel all, --threads threads; without cross-origin isolation the browser gives one),
run one warm-up generation, then --repeats rounds of: prefill of a --prompt-tokens prompt (empty
cache), and --new-tokens greedy decode steps with the KV cache (argmax in JS). Reported: prefill ms,
decode ms/token (median over rounds of the mean step time; the first decode step is included), and
the greedy tokens. The same greedy generation runs in Python onnxruntime (intra_op_num_threads =
--threads) for ms/token and for token agreement: browser vs Python on the same file, and each variant
vs fp32 (prefix agreement: share of the sequence before the first different token).

The onnxruntime-web build is the one the `patcher web` page uses (transformers.js's own pinned
dependency, from the runtime cache: patcher/web/runtime.py fetches it once with npm).

    python scripts/bench_web.py                                  # defaults (~5-10 min on 2 cores)
    python scripts/bench_web.py --workdir /tmp/bw --keep         # keep model + exports for the next run
    python scripts/bench_web.py --layers 4 --d-model 256 --intermediate 640 --vocab 8192 --blocks 32 --quick

Target (issue 12): browser q4 decode >= 1.5x browser fp32 (ms/token ratio fp32/q4).
The script always exits 0 unless the browser cannot run at all.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import add_model_args, make_model

TARGET = 1.5  # browser fp32 ms/token / q4 ms/token

PAGE = """<!doctype html><meta charset="utf-8"><title>bench</title>
<script type="module">
import * as ort from "/ort/ort.wasm.min.mjs";
ort.env.wasm.wasmPaths = "/ort/";
ort.env.wasm.numThreads = %(threads)d;
ort.env.logLevel = "error";
const h2f = (h) => {  // IEEE half -> float (logits of float16 graphs)
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 31, m = h & 1023;
  if (e === 0) return s * m * 2 ** -24;
  return e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
};
const argmax = (t, off, n) => {
  const f = t.type === "float16" && !(t.data instanceof (globalThis.Float16Array ?? Object)) ? h2f : (x) => x;
  let b = 0, v = -Infinity;
  for (let i = 0; i < n; i++) { const x = f(t.data[off + i]); if (x > v) { v = x; b = i; } }
  return b;
};
window.bench = async ({ url, file, data, layers, kv, head_dim, kv_type, prompt, steps, repeats }) => {
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(url + file, { executionProviders: ["wasm"],
    graphOptimizationLevel: "all", externalData: data.map((d) => ({ path: d, data: url + d })) });
  const load_ms = performance.now() - t0;
  const keep = session.inputNames.includes("num_logits_to_keep");  // last position only
  const empty = kv_type === "float16" ? new Uint16Array(0) : new Float32Array(0);
  const run = async () => {
    const n = prompt.length;
    const i64 = (a) => BigInt64Array.from(a.map(BigInt));
    let feeds = { input_ids: new ort.Tensor("int64", i64(prompt), [1, n]),
                  attention_mask: new ort.Tensor("int64", new BigInt64Array(n).fill(1n), [1, n]),
                  position_ids: new ort.Tensor("int64", i64([...Array(n).keys()]), [1, n]) };
    for (let i = 0; i < layers; i++) for (const k of ["key", "value"])
      feeds[`past_key_values.${i}.${k}`] = new ort.Tensor(kv_type, empty, [1, kv, 0, head_dim]);
    if (keep) feeds.num_logits_to_keep = new ort.Tensor("int64", BigInt64Array.from([1n]), []);
    let t = performance.now();
    let out = await session.run(feeds);
    const prefill_ms = performance.now() - t;
    const ids = [];
    let total = n;
    t = performance.now();
    for (let s = 0; s < steps; s++) {
      const lg = out.logits, V = lg.dims[2];
      const next = argmax(lg, (lg.dims[1] - 1) * V, V);
      ids.push(next);
      if (s === steps - 1) break;
      total += 1;
      const nf = { input_ids: new ort.Tensor("int64", i64([next]), [1, 1]),
                   attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
                   position_ids: new ort.Tensor("int64", i64([total - 1]), [1, 1]) };
      for (let i = 0; i < layers; i++) for (const k of ["key", "value"])
        nf[`past_key_values.${i}.${k}`] = out[`present.${i}.${k}`];
      if (keep) nf.num_logits_to_keep = feeds.num_logits_to_keep;
      for (const v of Object.values(feeds)) if (!Object.values(nf).includes(v)) v.dispose?.();
      feeds = nf;
      out = await session.run(feeds);
    }
    const decode_ms = (performance.now() - t) / Math.max(steps - 1, 1);
    return { prefill_ms, decode_ms, ids };
  };
  await run();  // warm-up
  const rounds = [];
  for (let r = 0; r < repeats; r++) rounds.push(await run());
  await session.release();
  return { load_ms, rounds };
};
window.ready = true;
</script>"""


def ort_web_dir() -> Path:
    """onnxruntime-web's dist/ (ort.wasm.min.mjs and the WASM it loads) from the pinned runtime cache."""
    from patcher.errors import PatcherError
    from patcher.web import runtime

    try:
        return runtime.cached(say=print).wasm_dir
    except PatcherError as e:
        sys.exit(f"no onnxruntime-web: {e}")


def export_variants(model: Path, work: Path, a) -> dict:
    """name -> (folder, file, data files, record of how it was made)"""
    from patcher.onnx.export import FILES, export, variants_in

    out = {}
    base = work / "x-float"
    floats = ",".join(d for d in ("fp32", "fp16") if d in FILES and (d == "fp32" or not a.quick))
    if not (base / "patcher-export.json").is_file():
        t = time.time()
        export(model, base, dtype=floats, force=True)
        print(f"exported {floats} in {time.time() - t:.0f} s", flush=True)
    for d, files in variants_in(base).items():
        out[d] = (base, files[0], files[1:], {"dtype": d})
    for block in a.blocks:
        for acc in a.accuracy:
            name = f"q4-b{block}" + (f"-acc{acc}" if acc is not None else "")
            folder = work / f"x-{name}"
            if not (folder / "patcher-export.json").is_file():
                t = time.time()
                export(model, folder, dtype="int4", int4_block=block, int4_accuracy=acc, force=True)
                print(f"exported {name} in {time.time() - t:.0f} s", flush=True)
            files = variants_in(folder)["int4"]
            out[name] = (folder, files[0], files[1:], {"dtype": "int4", "block": block, "accuracy": acc})
    for extra in ("int8", "q4f16"):  # variants later exports add (transformers.js q8 / q4f16)
        if extra in FILES and not a.quick:
            folder = work / f"x-{extra}"
            if not (folder / "patcher-export.json").is_file():
                export(model, folder, dtype=extra, force=True)
            files = variants_in(folder)[extra]
            out[extra] = (folder, files[0], files[1:], {"dtype": extra})
    if not a.quick:  # onnxruntime's own dynamic int8 (MatMulInteger, as optimum's q8 files), for comparison
        name, folder = "q8-matmulinteger", work / "x-q8-matmulinteger"
        if not (folder / "onnx" / "model_quantized.onnx").is_file():
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic

            (folder / "onnx").mkdir(parents=True, exist_ok=True)
            quantize_dynamic(
                base / "onnx" / "model.onnx",
                folder / "onnx" / "model_quantized.onnx",
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                use_external_data_format=True,
            )
            m = onnx.load(str(folder / "onnx" / "model_quantized.onnx"))
            onnx.save_model(
                m,
                str(folder / "onnx" / "model_quantized.onnx"),
                save_as_external_data=True,
                location="model_quantized.onnx_data",
                all_tensors_to_one_file=True,
            )
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(base / f, folder / f)
        out[name] = (
            folder,
            "model_quantized.onnx",
            ["model_quantized.onnx_data"],
            {"dtype": "q8 (onnxruntime quantize_dynamic)"},
        )
    return out


def python_run(folder: Path, file: str, prompt: list[int], steps: int, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    from patcher.onnx.runtime import OnnxModel

    m = OnnxModel(folder, file)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    m.session = ort.InferenceSession(str(folder / "onnx" / file), so, providers=["CPUExecutionProvider"])
    ids, mask = np.array([prompt]), np.ones((1, len(prompt)), np.int64)
    m.generate(ids, mask, 2)
    per, toks = [], None
    for _ in range(repeats):
        stamps = []
        toks = m.generate(ids, mask, steps, on_token=lambda t, d: stamps.append(time.perf_counter()))[
            0
        ].tolist()
        per.append((stamps[-1] - stamps[0]) / max(steps - 1, 1) * 1000)
    return {"decode_ms": statistics.median(per), "ids": toks}


def prefix_agreement(a: list, b: list) -> float:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.set_defaults(d_model=576, intermediate=1536, layers=16, vocab=49152, heads=9, kv_heads=3, head_dim=64)
    ap.add_argument("--workdir", type=Path, help="Reuse / keep the model and exports here")
    ap.add_argument("--keep", action="store_true", help="Keep --workdir's contents")
    ap.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128])
    ap.add_argument(
        "--accuracy",
        type=lambda s: [None if x in ("", "none") else int(x) for x in s.split(",")],
        default=[None, 4],
        help="MatMulNBits accuracy levels (none,4)",
    )
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--quick", action="store_true", help="fp32 and the q4 blocks only (no fp16 / int8 / q4f16)"
    )
    ap.add_argument("--only", type=lambda s: s.split(","), help="Run only these variants (names as printed)")
    ap.add_argument("--no-python", action="store_true", help="skip the Python onnxruntime runs")
    ap.add_argument("--json", type=Path, help="Write the results here")
    a = ap.parse_args(argv)

    from patcher.web.browser import chromium, missing
    from patcher.web.serve import Server

    why = missing()
    if why:
        sys.exit(f"cannot run the browser benchmark: {why}")
    ort_dir = ort_web_dir()
    ort_version = json.loads((ort_dir.parent / "package.json").read_text())["version"]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-web-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = work / "model"
        if not (model / "config.json").is_file():
            make_model(model, a)
        params = sum(np.prod(v) for v in [(a.vocab, a.d_model)] * 2) + a.layers * (
            2 * a.d_model * a.heads * a.head_dim
            + 2 * a.d_model * a.kv_heads * a.head_dim
            + 3 * a.d_model * a.intermediate
        )
        print(
            f"model: {params / 1e6:.0f}M parameters (d {a.d_model}, {a.layers} layers, ff {a.intermediate}, "
            f"vocab {a.vocab})",
            flush=True,
        )
        variants = export_variants(model, work, a)
        if a.only:
            variants = {k: v for k, v in variants.items() if k in a.only}
        rng = np.random.default_rng(0)
        prompt = [int(x) for x in rng.integers(3, min(a.vocab, 384), a.prompt_tokens)]
        root = work / "site"
        shutil.rmtree(root, ignore_errors=True)
        (root / "m").mkdir(parents=True)
        os.symlink(ort_dir, root / "ort")
        for name, (folder, *_rest) in variants.items():
            os.symlink(folder / "onnx", root / "m" / name)
        (root / "index.html").write_text(PAGE % {"threads": a.threads})
        results = {}
        with Server(root) as server, chromium() as ctx:
            page = ctx.new_page()
            page.set_default_timeout(600_000)
            page.goto(server.url)
            page.wait_for_function("window.ready === true")
            print(
                f"chromium {page.context.browser.version}, onnxruntime-web {ort_version}, "
                f"crossOriginIsolated={page.evaluate('crossOriginIsolated')}, threads {a.threads}",
                flush=True,
            )
            for name, (folder, file, data, rec) in variants.items():
                r = page.evaluate(
                    "(x) => window.bench(x)",
                    {
                        "url": f"/m/{name}/",
                        "file": file,
                        "data": data,
                        "layers": a.layers,
                        "kv": a.kv_heads,
                        "head_dim": a.head_dim,
                        "kv_type": "float16" if rec["dtype"] == "q4f16" else "float32",
                        "prompt": prompt,
                        "steps": a.new_tokens,
                        "repeats": a.repeats,
                    },
                )
                res = {
                    **rec,
                    "size_mib": sum((folder / "onnx" / f).stat().st_size for f in [file, *data]) / 2**20,
                    "load_ms": r["load_ms"],
                    "prefill_ms": statistics.median(x["prefill_ms"] for x in r["rounds"]),
                    "decode_ms": statistics.median(x["decode_ms"] for x in r["rounds"]),
                    "ids": r["rounds"][-1]["ids"],
                }
                if not a.no_python:
                    py = python_run(folder, file, prompt, a.new_tokens, a.threads, a.repeats)
                    res.update(
                        py_decode_ms=py["decode_ms"],
                        browser_vs_python=prefix_agreement(res["ids"], py["ids"]),
                    )
                results[name] = res
                print(
                    f"  {name:16s} decode {res['decode_ms']:7.1f} ms/token  "
                    f"prefill {res['prefill_ms']:7.0f} ms"
                    + (
                        f"  python {res['py_decode_ms']:6.1f} ms/token  browser==python "
                        f"{res['browser_vs_python']:.0%}"
                        if "py_decode_ms" in res
                        else ""
                    ),
                    flush=True,
                )
            assert not ctx.blocked, ctx.blocked
        report(results, a, ort_version)
        if a.json:
            a.json.write_text(
                json.dumps(
                    {
                        "args": {k: v for k, v in vars(a).items() if k not in ("workdir", "json")},
                        "onnxruntime_web": ort_version,
                        "results": results,
                    },
                    indent=2,
                    default=str,
                )
            )
    finally:
        if not (a.workdir and a.keep):
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict, a, ort_version: str) -> None:
    fp32 = results.get("fp32")
    print(
        f"\nbrowser (onnxruntime-web {ort_version}, WASM, {a.threads} thread(s)), "
        f"{a.prompt_tokens}-token prompt, "
        f"{a.new_tokens} new tokens, median of {a.repeats}"
    )
    head = (
        f"{'variant':16s} {'MiB':>7s} {'decode ms/tok':>13s} {'vs fp32':>8s} {'prefill ms':>10s} "
        f"{'py ms/tok':>9s} {'py vs fp32':>10s} {'==python':>8s} {'==fp32':>7s}"
    )
    print(head)
    for name, r in results.items():
        speed = fp32["decode_ms"] / r["decode_ms"] if fp32 else float("nan")
        pyspeed = fp32["py_decode_ms"] / r["py_decode_ms"] if fp32 and "py_decode_ms" in r else float("nan")
        agree = prefix_agreement(r["ids"], fp32["ids"]) if fp32 else float("nan")
        py = (
            f"{r['py_decode_ms']:9.1f} {pyspeed:9.2f}x {r['browser_vs_python']:8.0%}"
            if "py_decode_ms" in r
            else f"{'-':>9s} {'-':>10s} {'-':>8s}"
        )
        print(
            f"{name:16s} {r['size_mib']:7.1f} {r['decode_ms']:13.1f} {speed:7.2f}x "
            f"{r['prefill_ms']:10.0f} {py} {agree:7.0%}"
        )
        r["browser_speedup_vs_fp32"], r["agree_fp32"] = speed, agree
    q4 = {n: r for n, r in results.items() if n.startswith("q4-")}
    if fp32 and q4:
        best = min(q4, key=lambda n: q4[n]["decode_ms"])
        s = fp32["decode_ms"] / q4[best]["decode_ms"]
        print(
            f"\nfastest browser q4: {best}, {s:.2f}x fp32 decode (target >= {TARGET}x): "
            + ("met" if s >= TARGET else "TARGET MISSED")
        )


if __name__ == "__main__":
    sys.exit(main())
