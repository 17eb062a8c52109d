"""Benchmark `patcher export` ONNX models under onnxruntime against HF transformers (PyTorch, CPU).

It writes (or reuses, with --workdir) the synthetic llama-layout bf16 checkpoint of
scripts/bench_extract.py (sharded safetensors, config.json, the byte-level tokenizer and chat template
of fixtures/tiny-llama), then runs `patcher export MODEL -o OUT --dtype int4` once in a child process
(bench_patch.run_child: wall time and the child's own peak RSS). The int4 export writes both
onnx/model.onnx (fp32 weights) and onnx/model_q4.onnx (MatMulNBits, 4-bit blocks of 32).

The same chat-templated, left-padded batch of neutral prompts (patcher's tokenizer; HF's
AutoTokenizer is checked to give the same ids) goes through, in this one process:

  * HF transformers  AutoModelForCausalLM (float32, eval, no_grad)
  * ONNX fp32        patcher.onnx.runtime.OnnxModel on onnx/model.onnx
  * ONNX int4        OnnxModel on onnx/model_q4.onnx

and for each method it measures (each method warmed up once, then --repeats rounds in which the
methods run in turn, so that load from other processes spreads over all of them; medians):

  * prefill tokens/s   one forward over the prompt batch: OnnxModel.step(ids, mask, position_ids,
                       empty cache) vs model(input_ids, attention_mask, position_ids) with the same
                       ids / mask / position_ids = max(cumsum(mask) - 1, 0). Real (unpadded) prompt
                       tokens are counted.
  * decode tokens/s    greedy generation of exactly --new-tokens tokens per row with the KV cache:
                       OnnxModel.generate(eos_ids=()) vs model.generate(do_sample=False,
                       max_new_tokens=N, min_new_tokens=N, no eos). A timestamp is taken when the
                       first new token is chosen (OnnxModel's on_token callback; a LogitsProcessor
                       on the HF side), so decode tokens/s = batch * (N - 1) / (end - that time):
                       prefill excluded, everything after it (forwards, cache handling, argmax,
                       Python loop) included. End-to-end generate tokens/s = batch * N / total is
                       printed too.

torch.set_num_threads(T) and onnxruntime intra_op_num_threads=T (inter_op 1, sequential) use the
same T (default: all cores). OnnxModel builds its session with default SessionOptions; this script
replaces that session with one that sets the thread count (and --ort-opt-level), then uses the
model's own step() / generate().

It checks that fp32 ONNX greedy tokens equal HF's (token agreement %, and the prefill logits'
max difference), so the comparison is apples to apples, and prints a table with ONNX/HF ratios
(target: ONNX fp32 >= 1.5x HF for both prefill and decode, else "TARGET MISSED"), int4/fp32 ratios
and the weight file sizes. It also reports how much CPU other processes used during the timed runs
(/proc/stat minus this process) and flags the numbers NOISY above 10 %, with best-of-N ratios beside
the medians. When fp32 misses the target (or with --profile N) it runs onnxruntime's profiler over one
prefill (after a warm-up run) and a few decode steps, prints the op types that take the time, the
MatMul GFLOP/s (prefill) and GB/s of weights (decode), and a float32 GEMM peak (onnxruntime and
torch.mm) for comparison. The script always exits 0.

    python scripts/bench_onnx.py                                   # defaults: d 1024, 16 layers, 8 prompts, 32 tokens
    python scripts/bench_onnx.py --workdir /tmp/bo --keep          # keep model + export for the next run
    python scripts/bench_onnx.py --workdir /tmp/bo --keep --profile 15 --repeats 5
    python scripts/bench_onnx.py --layers 4 --d-model 512 --intermediate 1408 --new-tokens 16   # quick
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import (NEGATIVE, add_model_args, config, failed, llama_tensors, make_model, make_prompts,  # noqa: E402
                           patcher_cmd, sizes)
from bench_patch import run_child, run_in_workdir  # noqa: E402

from patcher.onnx.runtime import OnnxModel  # noqa: E402
from patcher.model.prompts import encode_prompts, left_pad, load_tokenizer  # noqa: E402

MIB = 1 << 20
LABELS = {"hf": "HF", "fp32": "ONNX fp32", "int4": "ONNX int4"}
SPEED_MIN = 1.5  # ONNX fp32 tokens/s / HF tokens/s, prefill and decode
BUSY_MAX = 0.10  # other processes' share of the CPUs during timing above which the numbers are flagged NOISY
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


# --- onnxruntime -------------------------------------------------------------------------------------------

def session_options(threads: int, opt_level: str, profile_prefix: str | None = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def open_onnx(folder: Path, file: str, threads: int, opt_level: str, profile_prefix: str | None = None) -> OnnxModel:
    """patcher's OnnxModel, its session rebuilt with the benchmark's SessionOptions (thread count)."""
    import onnxruntime as ort
    m = OnnxModel(folder, file, "cpu")
    m.session = None  # drop the default session before building ours (peak memory)
    m.session = ort.InferenceSession(str(folder / "onnx" / file), session_options(threads, opt_level, profile_prefix),
                                     providers=["CPUExecutionProvider"])
    assert [o.name for o in m.session.get_outputs()] == m.output_names
    return m


class OnnxRunner:
    def __init__(self, m: OnnxModel):
        self.m = m

    def prefill(self, ids, mask, pos):
        return self.m.step(ids, mask, pos, self.m.empty_cache(ids.shape[0]))[0]

    def generate(self, ids, mask, n):
        stamps = []
        t0 = time.perf_counter()
        new = self.m.generate(ids, mask, n, eos_ids=(), on_token=lambda tok, done: stamps.append(time.perf_counter()))
        t1 = time.perf_counter()
        return new, t0, stamps[0], t1


# --- HF transformers ---------------------------------------------------------------------------------------

class HFRunner:
    def __init__(self, model_dir: Path, threads: int, pad_id: int):
        import torch
        from transformers import AutoModelForCausalLM, LogitsProcessor
        self.torch = torch
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        gc = self.model.generation_config
        gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, pad_id, None  # never stop early
        self.attn = getattr(self.model.config, "_attn_implementation", None)

        class Stamp(LogitsProcessor):
            def __init__(self):
                self.t = []

            def __call__(self, input_ids, scores):
                self.t.append(time.perf_counter())
                return scores
        self.Stamp = Stamp

    def prefill(self, ids, mask, pos):
        t = self.torch
        with t.no_grad():
            out = self.model(input_ids=t.from_numpy(ids), attention_mask=t.from_numpy(mask),
                             position_ids=t.from_numpy(pos), use_cache=True)
        return out.logits.numpy()

    def generate(self, ids, mask, n):
        from transformers import LogitsProcessorList
        t = self.torch
        stamp = self.Stamp()
        t0 = time.perf_counter()
        with t.no_grad():
            out = self.model.generate(input_ids=t.from_numpy(ids), attention_mask=t.from_numpy(mask), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                      logits_processor=LogitsProcessorList([stamp]))
        t1 = time.perf_counter()
        new = out[:, ids.shape[1]:].numpy()
        if new.shape[1] != n:
            raise RuntimeError(f"HF generated {new.shape[1]} tokens, not {n}")
        return new, t0, stamp.t[0], t1


# --- measuring ---------------------------------------------------------------------------------------------

def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (/proc/stat, 0 where unavailable) and by this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = 0.0
    return busy, ru.ru_utime + ru.ru_stime


class Timed:
    """Wall time of a block, plus the CPU seconds other processes used meanwhile (machine minus us)."""

    def __enter__(self):
        self.c0, self.t0 = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        c1 = cpu_seconds()
        self.others = max(0.0, (c1[0] - self.c0[0]) - (c1[1] - self.c0[1])) if c1[0] else float("nan")


def measure(runners: dict, ids, mask, pos, n_new: int, repeats: int) -> dict:
    """Warm every method up once, then `repeats` rounds in which each method runs once in turn (so that load
    from elsewhere on the machine spreads over all methods); medians per method."""
    B, n_real = ids.shape[0], int(mask.sum())
    res = {k: {"pre": [], "dec": [], "e2e": [], "first": [], "wall": 0.0, "others": 0.0} for k in runners}
    for k, runner in runners.items():
        res[k]["logits"] = runner.prefill(ids, mask, pos)
        runner.generate(ids, mask, n_new)
    for _ in range(repeats):
        for k, runner in runners.items():
            with Timed() as t:
                runner.prefill(ids, mask, pos)
            res[k]["pre"].append(t.wall)
            res[k]["wall"] += t.wall
            res[k]["others"] += t.others
    for _ in range(repeats):
        for k, runner in runners.items():
            with Timed() as t:
                new, t0, t_first, t1 = runner.generate(ids, mask, n_new)
            res[k]["wall"] += t.wall
            res[k]["others"] += t.others
            res[k]["tokens"] = new
            res[k]["dec"].append(t1 - t_first)
            res[k]["e2e"].append(t1 - t0)
            res[k]["first"].append(t_first - t0)
    for k, r in res.items():
        r["prefill_s"], r["decode_s"] = statistics.median(r["pre"]), statistics.median(r["dec"])
        r["e2e_s"], r["first_s"] = statistics.median(r["e2e"]), statistics.median(r["first"])
        r["prefill_tps"] = n_real / r["prefill_s"]
        r["decode_tps"] = B * (n_new - 1) / r["decode_s"]
        r["e2e_tps"] = B * n_new / r["e2e_s"]
        r["best_prefill_tps"], r["best_decode_tps"] = n_real / min(r["pre"]), B * (n_new - 1) / min(r["dec"])
        r["busy"] = r["others"] / (r["wall"] * (os.cpu_count() or 1))  # share of the machine other processes used
        ms = lambda xs, digits=0: ", ".join(f"{1e3 * x:.{digits}f}" for x in xs)  # noqa: E731
        print(f"  {LABELS[k]:<10} prefill ms {ms(r['pre'], 1)};  decode ({n_new - 1} steps) ms {ms(r['dec'])};  "
              f"generate ms {ms(r['e2e'])}"
              f"  (other processes used {100 * r['busy']:.0f} % of the CPUs meanwhile)", flush=True)
    busy = max(r["busy"] for r in res.values())
    if busy > BUSY_MAX:
        print(f"  NOISY: other processes used up to {100 * busy:.0f} % of the CPUs during the timed runs; the medians "
              f"(and the ratios) are unreliable; the best-of-{repeats} ratios below are less affected; rerun when idle")
    return res


# --- onnxruntime profile -----------------------------------------------------------------------------------

def profile_onnx(folder: Path, file: str, threads: int, opt_level: str, ids, mask, pos, steps: int, top: int,
                 work: Path, created: list, linear_params: int = 0) -> None:
    prefix = str(work / "ort-profile")
    m = open_onnx(folder, file, threads, opt_level, prefix)
    B = ids.shape[0]
    m.step(ids, mask, pos, m.empty_cache(B))  # run 0: warm-up (first-run allocations), not reported
    logits, past = m.step(ids, mask, pos, m.empty_cache(B))  # run 1: prefill
    tok, mk, nxt = logits[:, -1].argmax(-1), mask, pos[:, -1:] + 1
    py = []
    for _ in range(steps):  # runs 2..steps + 1: decode
        mk = np.concatenate([mk, np.ones((B, 1), np.int64)], axis=1)
        t0 = time.perf_counter()
        logits, past = m.step(tok[:, None], mk, nxt, past)
        py.append(time.perf_counter() - t0)
        tok, nxt = logits[:, -1].argmax(-1), nxt + 1
    path = Path(m.session.end_profiling())
    created.append(path)
    events = json.loads(path.read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]

    def run_of(e):
        for i, r in enumerate(runs):
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                return i
        return None
    phases = {"prefill (1 run, after a warm-up run)": [1], f"decode ({steps} steps)": list(range(2, len(runs)))}
    by_run = defaultdict(list)
    for e in nodes:
        by_run[run_of(e)].append(e)
    print(f"\nonnxruntime profile of {file} ({threads} intra-op threads, opt level {opt_level}; the profiler itself "
          f"adds time, mostly to the decode steps); {path}")
    for phase, idx in phases.items():
        run_us = sum(runs[i]["dur"] for i in idx if i < len(runs))
        evs = [e for i in idx for e in by_run[i]]
        node_us = sum(e["dur"] for e in evs)
        per_op, count = defaultdict(int), defaultdict(int)
        for e in evs:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] += e["dur"]
            count[op] += 1
        n_runs = max(len(idx), 1)
        print(f"  {phase}: model_run {run_us / 1e3 / n_runs:.2f} ms per run, kernels {node_us / 1e3 / n_runs:.2f} ms "
              f"({100 * node_us / max(run_us, 1):.0f} % of model_run; the rest is framework: input/output copies, "
              f"allocation, scheduling); {len(evs) // n_runs} kernels per run")
        if phase.startswith("decode") and py:
            print(f"    Python OnnxModel.step() per decode step: {1e3 * statistics.median(py):.2f} ms "
                  f"(session.run + feed/fetch conversion)")
        print(f"    {'op type':<22} {'ms/run':>8} {'%':>6} {'count/run':>10}")
        for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {op:<22} {us / 1e3 / n_runs:8.2f} {100 * us / max(node_us, 1):6.1f} {count[op] / n_runs:10.0f}")
        mm_s = per_op.get("MatMul", 0) / 1e6 / n_runs
        if linear_params and mm_s:
            if phase.startswith("prefill"):
                flop = 2 * linear_params * ids.size  # every linear over every (padded) position
                print(f"    MatMul: {flop / 1e9:.1f} GFLOP of linear layers ({ids.size} positions incl. padding) in "
                      f"{1e3 * mm_s:.0f} ms of MatMul kernels (attention probs x V included) = {flop / mm_s / 1e9:.0f} "
                      f"GFLOP/s; compare with the float32 GEMM peak below")
            else:
                nbytes = 4 * linear_params
                print(f"    MatMul: {nbytes / MIB:.0f} MiB of float32 weights streamed per step in {1e3 * mm_s:.1f} ms "
                      f"= {nbytes / mm_s / 1e9:.1f} GB/s (memory-bound at batch {ids.shape[0]}: compare with the "
                      f"machine's memory bandwidth)")


def gemm_peak(m: int, k: int, n: int, threads: int, with_torch: bool) -> dict:
    """float32 GEMM GFLOP/s of one [m, k] x [k, n] product: onnxruntime (a one-MatMul graph, constant weight)
    and torch.mm, with the benchmark's thread count: the roofline for prefill."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n), dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(threads, "all"),
                                providers=["CPUExecutionProvider"])
    fns = {"onnxruntime MatMul": lambda: sess.run(None, {"x": x})}
    if with_torch:
        import torch
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        fns["torch.mm"] = lambda: torch.mm(tx, tw)
    out = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 2 * m * k * n / min(times) / 1e9
    return out


# --- main --------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, "synthetic model (as scripts/bench_extract.py)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts in the batch (default 8)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, after one warm-up; medians")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads and onnxruntime intra_op_num_threads (default 0: all cores)")
    ap.add_argument("--ort-opt-level", choices=list(OPT_LEVELS), default="all",
                    help="onnxruntime graph optimization level (default all, as SessionOptions' default)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to build the model and its export; an existing model with the same shape and its "
                         "export are reused (default: a new folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep what this run generated (otherwise it is deleted)")
    ap.add_argument("--patcher", default=None, help="command that runs the CLI (default: the patcher console "
                    "script beside this Python, else patcher on PATH)")
    ap.add_argument("--skip-hf", action="store_true", help="measure the ONNX models only")
    ap.add_argument("--skip-int4", action="store_true", help="export and measure fp32 only")
    ap.add_argument("--profile", type=int, default=None, metavar="N",
                    help="profile onnxruntime (fp32) and print the top N op types; by default this happens "
                         "(top 15) only when fp32 misses the target; 0 never")
    ap.add_argument("--profile-steps", type=int, default=16, help="decode steps in the profile (default 16)")
    a = ap.parse_args(argv)
    cmd = patcher_cmd(a.patcher)
    if not shutil.which(cmd[0]):
        ap.error(f"{cmd[0]} not found")
    if a.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode is timed from the first new token on)")
    a.threads = a.threads or os.cpu_count() or 1

    run_in_workdir(a, "patcher-bench-onnx-", lambda work, created: _bench(a, cmd, work, created))
    return 0


def _bench(a, cmd: list[str], work: Path, created: list[Path]) -> None:
    import onnxruntime as ort
    total_b, _ = sizes(a)
    name = f"llama-d{a.d_model}-i{a.intermediate}-L{a.layers}-v{a.vocab}-h{a.heads}-kv{a.kv_heads}-hd{a.head_dim}"
    model, onnx_dir = work / name, work / (name + "-onnx")
    dtype = "fp32" if a.skip_int4 else "int4"
    if model.is_dir() and json.loads((model / "config.json").read_text()) == config(a):
        print(f"reusing {model}")
    else:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(onnx_dir, ignore_errors=True)
        created.append(model)
        t0 = time.perf_counter()
        make_model(model, a)
        print(f"generated {model} in {time.perf_counter() - t0:.1f} s")
    print(f"model: {a.layers} layers, d_model {a.d_model}, intermediate {a.intermediate}, heads {a.heads}/"
          f"{a.kv_heads} kv, head_dim {a.head_dim}, vocab {a.vocab}; {total_b / MIB:.1f} MiB bf16 "
          f"({2 * total_b / MIB:.1f} MiB float32)")

    files = {"fp32": "model.onnx", "int4": "model_q4.onnx"}
    meta = onnx_dir / "patcher-export.json"
    have = meta.is_file() and all((onnx_dir / "onnx" / files[d]).is_file() for d in ("fp32", dtype)) \
        and meta.stat().st_mtime >= max(p.stat().st_mtime for p in model.iterdir())
    if have:
        print(f"reusing export {onnx_dir}")
    else:
        created.append(onnx_dir)
        log = work / "export.log"
        created.append(log)
        r = run_child(cmd + ["export", str(model), "-o", str(onnx_dir), "--dtype", dtype, "--force"], log)
        if failed(r, "patcher export"):
            return
        print(f"patcher export --dtype {dtype}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, "
              f"peak RSS {r['rss']:.0f} MiB")
    sizes_mib = {}
    for d in ("fp32", dtype):
        p = onnx_dir / "onnx" / files[d]
        if p.is_file():
            sizes_mib[d] = (p.stat().st_size + sum(q.stat().st_size for q in p.parent.glob(files[d] + "_data"))) / MIB

    tok = load_tokenizer(model)
    texts = make_prompts(NEGATIVE, a.prompts)
    ids_list = encode_prompts(tok, texts)
    ids, mask = left_pad(ids_list, tok.pad_id)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    B, S, N = ids.shape[0], ids.shape[1], a.new_tokens
    print(f"prompts: {B} neutral prompts, chat-templated, left-padded to {S} ({int(mask.sum())} real tokens, "
          f"{min(map(len, ids_list))}..{max(map(len, ids_list))} per prompt), e.g. {texts[0]!r}; "
          f"{N} greedy tokens each")
    print(f"machine: {os.cpu_count()} CPUs; onnxruntime {ort.__version__}: intra_op_num_threads {a.threads}, "
          f"inter_op 1, sequential, graph optimization {OPT_LEVELS[a.ort_opt_level]} (OnnxModel's own session: "
          f"SessionOptions() defaults, intra_op_num_threads=0 = ORT's choice)", flush=True)

    hf = None
    if not a.skip_hf:
        import torch
        import transformers
        from transformers import AutoTokenizer
        t0 = time.perf_counter()
        hf = HFRunner(model, a.threads, tok.pad_id)
        print(f"HF transformers {transformers.__version__}, torch {torch.__version__}: torch threads "
              f"{torch.get_num_threads()} (set_num_threads({a.threads})), attention {hf.attn}, float32; "
              f"loaded in {time.perf_counter() - t0:.1f} s")
        hf_tok = AutoTokenizer.from_pretrained(model)
        hf_ids = []
        for p in texts:
            enc = hf_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True)
            hf_ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
        print(f"HF tokenizer ids {'==' if hf_ids == ids_list else '!='} patcher tokenizer ids"
              + ("" if hf_ids == ids_list else "  MISMATCH (the same patcher ids are fed to both anyway)"))
    runners = {"hf": hf} if hf else {}
    for d in ("fp32", "int4"):
        if d in sizes_mib:
            t0 = time.perf_counter()
            runners[d] = OnnxRunner(open_onnx(onnx_dir, files[d], a.threads, a.ort_opt_level))
            print(f"onnxruntime session for {files[d]} created in {time.perf_counter() - t0:.1f} s")
    print(f"\ntimings (each method warmed up once, then {a.repeats} rounds, methods in turn; batch {B}):", flush=True)
    res = measure(runners, ids, mask, pos, N, a.repeats)
    del runners

    # --- agreement ---
    print()
    if "hf" in res:
        for d in ("fp32", "int4"):
            if d not in res:
                continue
            same = res[d]["tokens"] == res["hf"]["tokens"]
            rows = int(same.all(axis=1).sum())
            first_diff = [int(np.argmin(r)) if not r.all() else None for r in same]
            lg, ref = res[d]["logits"].astype(np.float64), res["hf"]["logits"].astype(np.float64)
            real = mask.astype(bool)
            err = float(np.abs(lg - ref)[real].max() / np.abs(ref[real]).max())
            print(f"greedy tokens, ONNX {d} vs HF: {100 * same.mean():.1f} % agreement ({rows}/{B} rows identical; "
                  f"first divergence per row: {first_diff}); prefill logits max|diff|/max|HF| {err:.1e} "
                  f"(real positions)" + ("  NOT APPLES TO APPLES" if d == "fp32" and not same.all() else ""))
    if "fp32" in res and "int4" in res:
        same = res["int4"]["tokens"] == res["fp32"]["tokens"]
        print(f"greedy tokens, ONNX int4 vs ONNX fp32: {100 * same.mean():.1f} % agreement (4-bit weights: "
              f"divergence expected on a random-weight model)")

    # --- table ---
    labels = {"hf": f"HF transformers ({a.threads} thr)", "fp32": f"ONNX fp32 ({a.threads} thr)",
              "int4": f"ONNX int4 ({a.threads} thr)"}
    print(f"\n{'method':<26} {'prefill tok/s':>14} {'decode tok/s':>13} {'generate tok/s':>15} "
          f"{'prefill ms':>11} {'ms/decode step':>15} {'vs HF prefill':>14} {'vs HF decode':>13} {'weights MiB':>12}")
    for k, r in res.items():
        vs = (f"{r['prefill_tps'] / res['hf']['prefill_tps']:14.2f} {r['decode_tps'] / res['hf']['decode_tps']:13.2f}"
              if "hf" in res and k != "hf" else f"{'':>14} {'':>13}")
        size = f"{sizes_mib[k]:12.1f}" if k in sizes_mib else f"{'(torch fp32)':>12}"
        print(f"{labels[k]:<26} {r['prefill_tps']:14.1f} {r['decode_tps']:13.1f} {r['e2e_tps']:15.1f} "
              f"{1e3 * r['prefill_s']:11.1f} {1e3 * r['decode_s'] / (N - 1):15.2f} {vs} {size}")
    print(f"\n(decode tok/s = {B} x {N - 1} tokens after the first / time from the first token to the end; generate "
          f"tok/s = {B} x {N} / whole generate call, prefill included)")
    missed = False
    if "hf" in res and "fp32" in res:
        p = res["fp32"]["prefill_tps"] / res["hf"]["prefill_tps"]
        d = res["fp32"]["decode_tps"] / res["hf"]["decode_tps"]
        missed = min(p, d) < SPEED_MIN
        for what, x in (("prefill", p), ("decode", d)):
            print(f"ONNX fp32 / HF {what} tokens/s: {x:.2f} (target >= {SPEED_MIN:g})"
                  + ("" if x >= SPEED_MIN else "  TARGET MISSED"))
        bp = res["fp32"]["best_prefill_tps"] / res["hf"]["best_prefill_tps"]
        bd = res["fp32"]["best_decode_tps"] / res["hf"]["best_decode_tps"]
        print(f"best-of-{a.repeats} (fastest run of each method) ONNX fp32 / HF: prefill {bp:.2f}, decode {bd:.2f}")
    if "fp32" in res and "int4" in res:
        print(f"ONNX int4 / fp32: prefill {res['int4']['prefill_tps'] / res['fp32']['prefill_tps']:.2f}, decode "
              f"{res['int4']['decode_tps'] / res['fp32']['decode_tps']:.2f}, generate "
              f"{res['int4']['e2e_tps'] / res['fp32']['e2e_tps']:.2f}; weight files {sizes_mib['fp32']:.1f} MiB "
              f"(model.onnx + model.onnx_data) vs {sizes_mib['int4']:.1f} MiB (model_q4.onnx + _data), "
              f"{sizes_mib['int4'] / sizes_mib['fp32']:.3f}x")
    summary = " ".join(f"{k}_{m}={res[k][m + '_tps']:.1f}" for k in res for m in ("prefill", "decode"))
    print(f"\n{summary}")

    top = a.profile if a.profile is not None else (15 if missed else 0)
    if top and "fp32" in sizes_mib:
        linear = sum(int(np.prod(s)) for n, s in llama_tensors(a) if len(s) == 2 and "embed_tokens" not in n)
        profile_onnx(onnx_dir, files["fp32"], a.threads, a.ort_opt_level, ids, mask, pos, a.profile_steps, top,
                     work, created, linear)
        peak = gemm_peak(ids.size, a.d_model, a.intermediate, a.threads, not a.skip_hf)
        print(f"  float32 GEMM peak, one [{ids.size} x {a.d_model}] x [{a.d_model} x {a.intermediate}] product, "
              f"{a.threads} threads, best of 10: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))


if __name__ == "__main__":
    sys.exit(main())
