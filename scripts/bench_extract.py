"""Benchmark `patcher extract` against the same computation in HF transformers (PyTorch, CPU).

It writes (or reuses, with --workdir) a synthetic llama-layout bf16 checkpoint — sharded safetensors,
index, config.json, and the tiny byte-level tokenizer + chat template of fixtures/tiny-llama — whose
weights are many times one block, plus two files of neutral prompts. Then, each in its own child
process so that peak RSS (os.wait4's ru_maxrss of that child) is per method, with the checkpoint's
pages warmed in the page cache before every run:

  * patcher: `patcher extract MODEL --positive P --negative N -o OUT --batch-size B`
  * HF:      AutoModelForCausalLM.from_pretrained(MODEL, dtype=float32), AutoTokenizer +
             apply_chat_template, left padding, the same batches (sorted by length, as patcher does),
             forward(output_hidden_states=True, position_ids=cumsum(mask)-1) under no_grad, and the
             mean of last-token hidden states per layer for both prompt sets.

Wall time includes interpreter start-up and model loading for both. tokens/s counts real prompt
tokens after the chat template (no padding), computed once in the parent with patcher's tokenizer.
It also measures each side's import-only baseline RSS, checks that patcher's positive_mean -
negative_mean matches HF's at every resid_pre layer 0..L-1, and prints a table with the
patcher/HF ratios. Targets: tokens/s ratio >= 1.0; patcher's RSS (above its import baseline)
closer to one block than to the whole model; max relative difference <= 1e-3. Misses are flagged
"TARGET MISSED"; the script always exits 0.

    python scripts/bench_extract.py                                  # defaults: d 1024, 16 layers, B 16
    python scripts/bench_extract.py --workdir /tmp/bx --keep         # keep the model for the next run
    python scripts/bench_extract.py --layers 8 --prompts 32 --batch-size 8 --torch-threads 2
    python scripts/bench_extract.py --workdir /tmp/bx --keep --profile 25   # + cProfile of patcher
"""

import argparse
import json
import math
import os
import pstats
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# per-child rusage, cache warm-up
from bench_patch import run_child, run_in_workdir, warm, write_sharded

from patcher.edit.directions import read_metadata
from patcher.io.checkpoint import Checkpoint
from patcher.model.prompts import encode_prompts, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_SRC = REPO / "fixtures" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MIB = 1 << 20
SPEED_MIN = 1.0  # patcher tokens/s / HF tokens/s
AGREE_MAX = 1e-3  # max relative difference of positive_mean - negative_mean, patcher vs HF

# --- synthetic checkpoint ----------------------------------------------------------------------------------


def llama_tensors(a) -> list[tuple[str, tuple[int, ...]]]:
    d, q, kv, ff, v = a.d_model, a.heads * a.head_dim, a.kv_heads * a.head_dim, a.intermediate, a.vocab
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (q, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, q)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (ff, d)),
            (p + "mlp.up_proj.weight", (ff, d)),
            (p + "mlp.down_proj.weight", (d, ff)),
        ]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def sizes(a) -> tuple[int, int]:
    """Bytes of the whole checkpoint (bf16) and of one block (bf16)."""
    tensors = llama_tensors(a)
    total = sum(2 * math.prod(s) for _, s in tensors)
    block = sum(2 * math.prod(s) for n, s in tensors if n.startswith("model.layers.0."))
    return total, block


def config(a) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.d_model,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "vocab_size": a.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def make_model(folder: Path, a) -> None:
    """bf16 weights ~ N(0, 0.02) (bench_patch's value pool), norm weights 1; shards of <= --shard-mib."""
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_sharded(tmp, llama_tensors(a), a.shard_mib * MIB)
    (tmp / "config.json").write_text(json.dumps(config(a), indent=2))
    for f in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SRC / f, tmp / f)
    tmp.rename(folder)


# --- prompts -----------------------------------------------------------------------------------------------

TOPICS = [
    "the ocean",
    "a mountain village",
    "autumn leaves",
    "a lighthouse",
    "the night sky",
    "a city park",
    "a rainy afternoon",
    "an old library",
    "a garden in spring",
    "a train journey",
    "the desert at dawn",
    "a winter forest",
    "a river delta",
    "a harbour market",
    "a quiet morning",
    "a field of sunflowers",
    "a snowy valley",
    "a bakery",
    "a small island",
    "a clock tower",
]
POSITIVE = [
    "Write a short poem about {}.",
    "Compose a few rhyming lines about {}.",
    "Write a haiku that captures {}.",
    "Please write a gentle, lyrical verse describing {} in detail.",
]
NEGATIVE = [
    "List three plain facts about {}.",
    "Give a one-sentence factual description of {}.",
    "What is one common thing people know about {}?",
    "Summarise, in a neutral tone, what {} usually looks like.",
]


def make_prompts(templates: list[str], n: int) -> list[str]:
    out = [t.format(topic) for topic in TOPICS for t in templates]
    return (out * (n // len(out) + 1))[:n]


# --- child processes ---------------------------------------------------------------------------------------

HF_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, pos_file, neg_file, out_file, batch_size, threads = sys.argv[1:7]
batch_size, threads = int(batch_size), int(threads)
if threads > 0:
    torch.set_num_threads(threads)
t_import = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.eval()
tok = AutoTokenizer.from_pretrained(model_dir)
tok.padding_side = "left"
t_load = time.perf_counter()
result, n_tokens = {}, 0
for label, path in (("positive", pos_file), ("negative", neg_file)):
    prompts = [l.rstrip() for l in open(path, encoding="utf-8").read().split("\n") if l.strip()]
    ids = []
    for p in prompts:
        enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      tokenize=True)
        ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    n_tokens += sum(map(len, ids))
    order = np.argsort([len(t) for t in ids], kind="stable")  # the same batches as patcher's
    total = None
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            batch = tok.pad({"input_ids": [ids[i] for i in order[s:s + batch_size]]}, padding=True,
                            return_tensors="pt")
            mask = batch["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos,
                        output_hidden_states=True)
            last = torch.stack([h[:, -1, :] for h in out.hidden_states], 1).double().sum(0)  # [L+1, d]
            total = last if total is None else total + last
    result[label] = (total / len(ids)).numpy()
t_fwd = time.perf_counter()
np.savez(out_file, positive_mean=result["positive"], negative_mean=result["negative"])
print(json.dumps({"threads": torch.get_num_threads(), "tokens": n_tokens, "import_s": t_import - t0,
                  "load_s": t_load - t_import, "forward_s": t_fwd - t_load,
                  "attn_implementation": getattr(model.config, "_attn_implementation", None)}))
"""

BASELINE = {
    "patcher": "import patcher.cli, patcher.edit.extract, patcher.model.execution",
    "hf": "import torch, transformers; from transformers import AutoModelForCausalLM, AutoTokenizer",
}


def failed(r: dict, what: str) -> bool:
    if r["rc"] == 0:
        return False
    tail = r["log"].read_text(errors="replace")[-3000:]
    print(f"{what} FAILED (exit {r['rc']}); last output:\n{tail}", flush=True)
    return True


def patcher_cmd(arg: str | None) -> list[str]:
    if arg:
        return shlex.split(arg)
    beside = Path(sys.executable).with_name("patcher")  # the console script itself, not a pyenv shim
    return [str(beside)] if beside.is_file() else ["patcher"]


def console_script(cmd: list[str]) -> str | None:
    """The Python file behind the patcher command, for cProfile (None if it is not a Python script)."""
    path = shutil.which(cmd[0]) or cmd[0]
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError:
        return None
    return path if first.startswith(b"#!") and b"python" in first else None


def profile_patcher(script: str, extract_args: list[str], work: Path, top: int) -> None:
    prof = work / "patcher-extract.prof"
    r = run_child(
        [sys.executable, "-m", "cProfile", "-o", str(prof), script, *extract_args],
        work / "patcher-profile.log",
    )
    if failed(r, "patcher under cProfile"):
        return
    st = pstats.Stats(str(prof))
    total = st.total_tt
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(
        f"\ncProfile of patcher extract ({r['wall']:.1f} s wall under the profiler, "
        f"{total:.1f} s profiled), top {top} by tottime:"
    )
    print(f"{'tottime s':>10} {'%':>6} {'cumtime s':>10} {'calls':>9}  function")
    for (file, line, fn), (_, ncalls, tt, ct, _) in rows:
        where = f"{Path(file).name}:{line}({fn})" if line else fn
        print(f"{tt:10.2f} {100 * tt / total:6.1f} {ct:10.2f} {ncalls:9d}  {where}")


def add_model_args(ap: argparse.ArgumentParser, title: str = "synthetic model") -> None:
    """The synthetic llama's shape options (shared with bench_onnx.py)."""
    g = ap.add_argument_group(title)
    g.add_argument("--d-model", type=int, default=1024)
    g.add_argument("--intermediate", type=int, default=2816)
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--vocab", type=int, default=384, help="384 matches the fixture tokenizer (default)")
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--kv-heads", type=int, default=4)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--shard-mib", type=int, default=128, help="maximum shard size in MiB (default 128)")


# --- main --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per set (default 64)")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size for both methods (default 16)")
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per method; medians reported, RSS the maximum"
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads in the HF child (default 0: leave torch's default)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to build the model and prompts; an existing model with the same shape is "
        "reused (default: a new folder under /tmp)",
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep what this run generated (otherwise it is deleted)"
    )
    ap.add_argument(
        "--patcher",
        default=None,
        help="command that runs the CLI (default: the patcher console "
        "script beside this Python, else patcher on PATH)",
    )
    ap.add_argument("--skip-hf", action="store_true", help="measure patcher only")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="afterwards, run patcher once more under cProfile and print the top N functions by tottime",
    )
    a = ap.parse_args(argv)
    cmd = patcher_cmd(a.patcher)
    if not shutil.which(cmd[0]):
        ap.error(f"{cmd[0]} not found")

    run_in_workdir(a, "patcher-bench-extract-", lambda work, created: _bench(a, cmd, work, created))
    return 0


def _bench(a, cmd: list[str], work: Path, created: list[Path]) -> None:
    total_b, block_b = sizes(a)
    name = (
        f"llama-d{a.d_model}-i{a.intermediate}-L{a.layers}-v{a.vocab}-h{a.heads}"
        f"-kv{a.kv_heads}-hd{a.head_dim}"
    )
    model = work / name
    if model.is_dir() and json.loads((model / "config.json").read_text()) == config(a):
        print(f"reusing {model}")
    else:
        shutil.rmtree(model, ignore_errors=True)
        created.append(model)
        t0 = time.perf_counter()
        make_model(model, a)
        print(f"generated {model} in {time.perf_counter() - t0:.1f} s")
    shards = sorted(model.glob("*.safetensors"))
    model_mib, block_mib = total_b / MIB, block_b / MIB
    print(
        f"model: {a.layers} layers, d_model {a.d_model}, intermediate {a.intermediate}, heads {a.heads}/"
        f"{a.kv_heads} kv, head_dim {a.head_dim}, vocab {a.vocab}; {len(shards)} bf16 shards"
    )
    print(
        f"model size {model_mib:.1f} MiB bf16 ({2 * model_mib:.1f} MiB as float32); one block "
        f"{block_mib:.1f} MiB bf16 ({2 * block_mib:.1f} MiB as float32, as patcher holds it); "
        f"model = {total_b / block_b:.1f} blocks" + ("" if total_b >= 4 * block_b else "  (< 4 blocks!)")
    )

    pfiles = {}
    for label, templates in (("positive", POSITIVE), ("negative", NEGATIVE)):
        pfiles[label] = work / f"prompts-{label}.txt"
        created.append(pfiles[label])
        pfiles[label].write_text("\n".join(make_prompts(templates, a.prompts)) + "\n", encoding="utf-8")
    tok = load_tokenizer(model)
    token_lists = [
        encode_prompts(tok, pfiles[k].read_text().split("\n")[:-1]) for k in ("positive", "negative")
    ]
    n_tokens = sum(len(t) for ts in token_lists for t in ts)
    lens = [len(t) for ts in token_lists for t in ts]
    print(
        f"prompts: {a.prompts} positive + {a.prompts} negative "
        f"({pfiles['positive']}, {pfiles['negative']}); "
        f"{n_tokens} real tokens after the chat template ({min(lens)}..{max(lens)} per prompt); "
        f"batch size {a.batch_size}"
    )

    out = work / "patcher-directions.safetensors"
    hf_out = work / "hf-means.npz"
    logs = [
        work / n
        for n in (
            "patcher.log",
            "hf.log",
            "baseline-patcher.log",
            "baseline-hf.log",
            "patcher-profile.log",
            "patcher-extract.prof",
        )
    ]
    created += [out, hf_out, *logs]
    extract_args = [
        "extract",
        str(model),
        "--positive",
        str(pfiles["positive"]),
        "--negative",
        str(pfiles["negative"]),
        "-o",
        str(out),
        "--batch-size",
        str(a.batch_size),
        "--force",
    ]
    hf_cmd = [
        sys.executable,
        "-c",
        HF_CHILD,
        str(model),
        str(pfiles["positive"]),
        str(pfiles["negative"]),
        str(hf_out),
        str(a.batch_size),
        str(a.torch_threads),
    ]
    blas = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(
        f"machine: {os.cpu_count()} CPUs; numpy/OpenBLAS threads: {blas}; torch threads: "
        f"{a.torch_threads if a.torch_threads > 0 else 'default'} (set_num_threads "
        f"{'called' if a.torch_threads > 0 else 'not called'})"
    )
    print(f"patcher: {shlex.join(cmd + extract_args)}\n", flush=True)

    runs = {"patcher": [], "hf": []}
    hf_info = None
    methods = ["patcher"] + ([] if a.skip_hf else ["hf"])
    for rep in range(a.repeats):
        for m in methods:
            warm(model)
            load = os.getloadavg()[0]
            if m == "patcher":
                r = run_child(cmd + extract_args, logs[0])
                if failed(r, "patcher extract"):
                    return
            else:
                r = run_child(hf_cmd, logs[1])
                if failed(r, "HF transformers"):
                    methods.remove("hf")
                    continue
                hf_info = json.loads(r["log"].read_text().strip().splitlines()[-1])
            runs[m].append(r)
            extra = (
                ""
                if m == "patcher"
                else (
                    f" (import {hf_info['import_s']:.1f} s, load {hf_info['load_s']:.1f} s, "
                    f"forward {hf_info['forward_s']:.1f} s, {hf_info['threads']} threads, "
                    f"attention {hf_info['attn_implementation']})"
                )
            )
            print(
                f"  run {rep + 1} {m:8s} {r['wall']:7.2f} s wall, {r['cpu']:7.2f} s CPU, "
                f"peak RSS {r['rss']:7.0f} MiB"
                f" (1-min load before: {load:.1f}){extra}",
                flush=True,
            )
    base = {}
    for m in methods:
        r = run_child([sys.executable, "-c", BASELINE[m]], logs[2 if m == "patcher" else 3])
        base[m] = None if failed(r, f"{m} import baseline") else r["rss"]

    # --- agreement ---
    agree = None
    if "hf" in methods:
        if hf_info["tokens"] != n_tokens:
            print(f"TOKEN COUNT MISMATCH: patcher's tokenizer {n_tokens}, HF's {hf_info['tokens']}")
        hf = np.load(hf_out)
        with Checkpoint(out) as ck:
            pm, nm = (
                ck.array("positive_mean").astype(np.float64),
                ck.array("negative_mean").astype(np.float64),
            )
            dirn = ck.array("direction").astype(np.float64)
            selected = read_metadata(ck).get("selected_layer")
        ours, theirs = pm - nm, hf["positive_mean"] - hf["negative_mean"]
        L = a.layers
        # resid_pre[0] at the last token is the embedding of the template's last token, the same in both sets:
        # its difference is exactly 0 for both; measure such layers against the means' scale instead.
        per_layer = [
            float(
                np.abs(ours[l] - theirs[l]).max()
                / (np.abs(theirs[l]).max() or np.abs(hf["positive_mean"][l]).max() or 1.0)
            )
            for l in range(L)
        ]
        mean_err = max(
            float(np.abs(x[l] - y[l]).max() / np.abs(y[l]).max())
            for x, y in ((pm, hf["positive_mean"]), (nm, hf["negative_mean"]))
            for l in range(L)
        )
        dir_err = float(np.abs(dirn[:L] - ours[:L]).max())
        agree = max(per_layer)
        print(
            f"\nagreement, positive_mean - negative_mean at resid_pre 0..{L - 1} "
            f"(max|patcher - HF| / max|HF| per layer; a layer whose HF difference is 0 is divided by "
            f"max|HF positive_mean| instead):"
        )
        print("  " + " ".join(f"{l}:{e:.1e}" for l, e in enumerate(per_layer)))
        print(
            f"  max relative difference {agree:.2e} (worst layer {int(np.argmax(per_layer))}); "
            f"the means themselves {mean_err:.2e}; "
            f"'direction' == positive_mean - negative_mean to {dir_err:.1e}"
            + ("" if agree <= AGREE_MAX else f"  TARGET MISSED (> {AGREE_MAX:g})")
        )
        if isinstance(selected, int) and 0 <= selected < L:
            print(
                f"  selected layer {selected}: relative difference {per_layer[selected]:.2e}; norm of the "
                f"difference: patcher {np.linalg.norm(ours[selected]):.6g}, "
                f"HF {np.linalg.norm(theirs[selected]):.6g}"
            )

    # --- table ---
    res = {}
    for m in methods:
        rs = runs[m]
        wall = statistics.median(r["wall"] for r in rs)
        res[m] = (wall, n_tokens / wall, max(r["rss"] for r in rs), statistics.median(r["cpu"] for r in rs))
    print(
        f"\n{'method':<24} {'wall s':>8} {'CPU s':>8} {'tokens/s':>9} {'peak RSS MiB':>13} "
        f"{'import baseline MiB':>20} {'RSS above baseline':>19}"
    )
    labels = {
        "patcher": "patcher extract",
        "hf": f"HF transformers ({hf_info['threads'] if hf_info else '?'} thr)",
    }
    for m in methods:
        wall, tps, rss, cpu = res[m]
        b = base.get(m)
        print(
            f"{labels[m]:<24} {wall:8.2f} {cpu:8.2f} {tps:9.1f} {rss:13.0f} "
            f"{(f'{b:.0f}' if b else '?'):>20} {(f'{rss - b:.0f}' if b else '?'):>19}"
        )
    print(
        f"\nmodel size {model_mib:.1f} MiB (bf16 on disk); one block {block_mib:.1f} MiB bf16 / "
        f"{2 * block_mib:.1f} MiB float32"
    )
    p_rss = res["patcher"][2]
    p_above = p_rss - base["patcher"] if base.get("patcher") else p_rss
    closer = abs(p_above - 2 * block_mib) < abs(p_above - model_mib)
    print(
        f"patcher's RSS above its import baseline, {p_above:.0f} MiB, is closer to "
        f"{'one block' if closer else 'the whole model'} ({2 * block_mib:.0f} MiB float32 block vs "
        f"{model_mib:.0f} MiB bf16 model; raw peak RSS {p_rss:.0f} MiB)"
        + ("" if closer else "  TARGET MISSED")
    )
    if "hf" in res:
        speed = res["patcher"][1] / res["hf"][1]
        rss_ratio = res["patcher"][2] / res["hf"][2]
        print(
            f"patcher/HF tokens/s ratio {speed:.2f} (target >= {SPEED_MIN:g})"
            + (
                ""
                if speed >= SPEED_MIN
                else "  TARGET MISSED"
                + ("" if a.profile else " (--profile 25 shows where patcher spends its time)")
            )
        )
        print(
            f"patcher/HF peak RSS ratio {rss_ratio:.2f}"
            + (
                f" (above import baselines: {(p_above) / (res['hf'][2] - base['hf']):.2f})"
                if base.get("hf")
                else ""
            )
        )
        print(
            f"\nspeed_ratio={speed:.2f} rss_ratio={rss_ratio:.2f} agree_max_rel={agree:.2e} "
            f"patcher_rss_mib={p_rss:.0f} hf_rss_mib={res['hf'][2]:.0f}"
        )
    if a.profile:
        script = console_script(cmd)
        if script is None:
            print(f"--profile: {cmd[0]} is not a Python script; cannot run it under cProfile")
        else:
            warm(model)
            profile_patcher(script, extract_args, work, a.profile)


if __name__ == "__main__":
    sys.exit(main())
