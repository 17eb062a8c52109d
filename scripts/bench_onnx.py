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

    python scripts/bench_onnx.py      # defaults: d 1024, 16 layers, 8 prompts, 32 tokens
    python scripts/bench_onnx.py --workdir /tmp/bo --keep          # keep model + export for the next run
    python scripts/bench_onnx.py --workdir /tmp/bo --keep --profile 15 --repeats 5
    python scripts/bench_onnx.py --layers 4 --d-model 512 --intermediate 1408 --new-tokens 16   # quick

Variants (issue 12): the one export holds every --dtypes variant (default fp32,fp16,int4,q4f16,int8 =
model.onnx, model_fp16, model_q4, model_q4f16, model_quantized), each timed like fp32 and compared with
fp32's greedy tokens. onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder -p
fp32|int4 -e cpu`) exports the same checkpoint; it is installed from PyPI into the benchmark's own venv
(--bench-venv, default ~/.cache/patcher/bench-venv, --system-site-packages so it shares this onnxruntime).
Its graphs (fused GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits accuracy 4) run in the
same onnxruntime, timed on the same left-padded batch, and its greedy tokens are compared with HF on that
batch and row by row unpadded (its attention takes sequence lengths from the mask and assumes right padding).
Targets: ONNX int4 decode >= 2x fp32; patcher >= 0.9x the builder's decode at the same precision.

--rlimit-frac F (e.g. 0.8) also runs `patcher export --dtype int4` under RLIMIT_AS = F x the float32 model
size (prlimit): the quantized export streams tensor by tensor, so it finishes in less address space than the
float32 model needs (the mmapped bf16 checkpoint counts against RLIMIT_AS too: use a model of >= 1 GB bf16,
e.g. --d-model 2048 --intermediate 5632 --layers 12 --vocab 32000).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import (
    NEGATIVE,
    add_model_args,
    config,
    failed,
    llama_tensors,
    make_model,
    make_prompts,
    patcher_cmd,
    sizes,
)
from bench_patch import run_child, run_in_workdir

from patcher.model.prompts import encode_prompts, left_pad, load_tokenizer
from patcher.onnx.runtime import OnnxModel

MIB = 1 << 20
VARIANT_FILES = {
    "fp32": "model.onnx",
    "fp16": "model_fp16.onnx",
    "int4": "model_q4.onnx",
    "q4f16": "model_q4f16.onnx",
    "int8": "model_quantized.onnx",
}  # patcher.onnx.export.FILES
LABELS = {
    "hf": "HF",
    **{d: f"ONNX {d}" for d in VARIANT_FILES},
    "gb-fp32": "builder fp32",
    "gb-int4": "builder int4",
}
INT4_MIN = 2.0  # ONNX int4 decode tokens/s / fp32
BUILDER_MIN = 0.9  # patcher decode tokens/s / the builder's, same precision
SPEED_MIN = 1.5  # ONNX fp32 tokens/s / HF tokens/s, prefill and decode
BUSY_MAX = 0.10  # other processes' share of the CPUs during timing above which the numbers are flagged NOISY
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


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


def open_onnx(
    folder: Path, file: str, threads: int, opt_level: str, profile_prefix: str | None = None
) -> OnnxModel:
    """patcher's OnnxModel, its session rebuilt with the benchmark's SessionOptions (thread count)."""
    import onnxruntime as ort

    m = OnnxModel(folder, file, "cpu")
    m.session = None  # drop the default session before building ours (peak memory)
    m.session = ort.InferenceSession(
        str(folder / "onnx" / file),
        session_options(threads, opt_level, profile_prefix),
        providers=["CPUExecutionProvider"],
    )
    assert [o.name for o in m.session.get_outputs()] == m.output_names
    return m


class OnnxRunner:
    def __init__(self, m: OnnxModel):
        self.m = m

    def prefill(self, ids, mask, pos):  # as generate runs it: logits of the last position only
        return self.m.step(ids, mask, pos, self.m.empty_cache(ids.shape[0]), keep=1)[0]

    def full_logits(self, ids, mask, pos):
        return self.m.step(ids, mask, pos, self.m.empty_cache(ids.shape[0]), keep=0)[0]

    def generate(self, ids, mask, n):
        stamps = []
        t0 = time.perf_counter()
        new = self.m.generate(
            ids, mask, n, eos_ids=(), on_token=lambda tok, done: stamps.append(time.perf_counter())
        )
        t1 = time.perf_counter()
        return new, t0, stamps[0], t1


# --- onnxruntime-genai's model builder ---------------------------------------------------------------------


def bench_venv(path: Path) -> Path | None:
    """The benchmark's own venv with onnxruntime-genai (created once; pip's cache makes it quick)."""
    py = path / "bin" / "python"
    probe = [str(py), "-c", "import onnxruntime_genai"]
    if py.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    import venv

    print(f"creating {path} (onnxruntime-genai from PyPI)", flush=True)
    venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(path)
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "onnxruntime-genai"], capture_output=True, text=True
    )
    if r.returncode != 0:
        print(f"  could not install onnxruntime-genai: {r.stderr[-500:]}")
        return None
    return py


def build_with_genai(py: Path, model: Path, out: Path, precision: str, log: Path) -> dict:
    cmd = [
        str(py),
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(model),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(out.parent / (out.name + "-cache")),
    ]
    here = os.getcwd()
    os.chdir(out.parent)  # not the repository root: its kernels/ folder would shadow HF's `kernels` package
    try:
        return run_child(cmd, log)
    finally:
        os.chdir(here)


class BuilderRunner:
    """The builder's model.onnx in the same onnxruntime: inputs input_ids, attention_mask (no position ids:
    its GroupQueryAttention derives them and the sequence lengths from the mask), past/present KV."""

    def __init__(self, folder: Path, threads: int, opt_level: str):
        import onnxruntime as ort

        self.s = ort.InferenceSession(
            str(folder / "model.onnx"),
            session_options(threads, opt_level),
            providers=["CPUExecutionProvider"],
        )
        self.inputs = {i.name: i for i in self.s.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outs = [o.name for o in self.s.get_outputs()]
        head = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        self.kv = {n: (self.inputs[n].shape[1], head) for n in self.past}

    def step(self, ids, mask, past):
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **past}
        out = dict(zip(self.outs, self.s.run(None, feeds)))
        return out["logits"], {
            n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")
        }

    def empty(self, b):
        return {n: np.zeros((b, h, 0, d), np.float32) for n, (h, d) in self.kv.items()}

    def prefill(self, ids, mask, pos):
        return self.step(ids, mask, self.empty(ids.shape[0]))[0]

    def generate(self, ids, mask, n):
        t0 = time.perf_counter()
        logits, past = self.step(ids, mask, self.empty(ids.shape[0]))
        out, first = [], None
        for i in range(n):
            tok = logits[:, -1].argmax(-1)
            out.append(tok)
            if first is None:
                first = time.perf_counter()
            if i == n - 1:
                break
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], 1)
            logits, past = self.step(tok[:, None], mask, past)
        return np.stack(out, 1), t0, first, time.perf_counter()


def rlimit_check(a, cmd, model: Path, work: Path, created: list, total_b: int) -> None:
    fp32_bytes = 2 * total_b
    limit = int((a.rlimit_frac or 0.9) * fp32_bytes)
    r = export_under_rlimit(cmd, model, work, limit, created)
    ok = r["rc"] == 0
    q4 = work / "rlimit-int4" / "onnx"
    size = sum(p.stat().st_size for p in q4.glob("model_q4.onnx*")) / MIB if ok else 0
    print(
        f"\nstreaming int4 export under RLIMIT_AS {limit / MIB:.0f} MiB "
        f"({a.rlimit_frac or 0.9:g} x the float32 model's {fp32_bytes / MIB:.0f} MiB; "
        f"the bf16 checkpoint itself is {total_b / MIB:.0f} MiB, mmapped): "
        + (
            f"finished in {r['wall']:.1f} s, peak RSS {r['rss']:.0f} MiB, model_q4 {size:.0f} MiB"
            if ok
            else f"FAILED (rc {r['rc']}): {r['log'].read_text(errors='replace')[-400:]}"
        ),
        flush=True,
    )


def export_under_rlimit(cmd: list[str], model: Path, work: Path, limit: int, created: list) -> dict:
    out = work / "rlimit-int4"
    created.append(out)
    shutil.rmtree(out, ignore_errors=True)
    log = work / "rlimit-export.log"
    created.append(log)
    return run_child(
        ["prlimit", f"--as={limit}", *cmd, "export", str(model), "-o", str(out), "--dtype", "int4"], log
    )


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
            out = self.model(
                input_ids=t.from_numpy(ids),
                attention_mask=t.from_numpy(mask),
                position_ids=t.from_numpy(pos),
                use_cache=True,
            )
        return out.logits.numpy()

    def generate(self, ids, mask, n):
        from transformers import LogitsProcessorList

        t = self.torch
        stamp = self.Stamp()
        t0 = time.perf_counter()
        with t.no_grad():
            out = self.model.generate(
                input_ids=t.from_numpy(ids),
                attention_mask=t.from_numpy(mask),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                eos_token_id=None,
                logits_processor=LogitsProcessorList([stamp]),
            )
        t1 = time.perf_counter()
        new = out[:, ids.shape[1] :].numpy()
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
        res[k]["logits"] = getattr(runner, "full_logits", runner.prefill)(ids, mask, pos)
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
        # share of the machine other processes used
        r["busy"] = r["others"] / (r["wall"] * (os.cpu_count() or 1))
        ms = lambda xs, digits=0: ", ".join(f"{1e3 * x:.{digits}f}" for x in xs)  # noqa: E731
        print(
            f"  {LABELS[k]:<10} prefill ms {ms(r['pre'], 1)};  "
            f"decode ({n_new - 1} steps) ms {ms(r['dec'])};  "
            f"generate ms {ms(r['e2e'])}"
            f"  (other processes used {100 * r['busy']:.0f} % of the CPUs meanwhile)",
            flush=True,
        )
    busy = max(r["busy"] for r in res.values())
    if busy > BUSY_MAX:
        print(
            f"  NOISY: other processes used up to {100 * busy:.0f} % of the CPUs during the timed runs; "
            f"the medians (and the ratios) are unreliable; the best-of-{repeats} ratios below are less "
            f"affected; rerun when idle"
        )
    return res


# --- onnxruntime profile -----------------------------------------------------------------------------------


def profile_onnx(
    folder: Path,
    file: str,
    threads: int,
    opt_level: str,
    ids,
    mask,
    pos,
    steps: int,
    top: int,
    work: Path,
    created: list,
    linear_params: int = 0,
) -> None:
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
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]

    def run_of(e):
        for i, r in enumerate(runs):
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                return i
        return None

    phases = {
        "prefill (1 run, after a warm-up run)": [1],
        f"decode ({steps} steps)": list(range(2, len(runs))),
    }
    by_run = defaultdict(list)
    for e in nodes:
        by_run[run_of(e)].append(e)
    print(
        f"\nonnxruntime profile of {file} ({threads} intra-op threads, opt level {opt_level}; "
        f"the profiler itself adds time, mostly to the decode steps); {path}"
    )
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
        print(
            f"  {phase}: model_run {run_us / 1e3 / n_runs:.2f} ms per run, "
            f"kernels {node_us / 1e3 / n_runs:.2f} ms "
            f"({100 * node_us / max(run_us, 1):.0f} % of model_run; the rest is framework: "
            f"input/output copies, allocation, scheduling); {len(evs) // n_runs} kernels per run"
        )
        if phase.startswith("decode") and py:
            print(
                f"    Python OnnxModel.step() per decode step: {1e3 * statistics.median(py):.2f} ms "
                f"(session.run + feed/fetch conversion)"
            )
        print(f"    {'op type':<22} {'ms/run':>8} {'%':>6} {'count/run':>10}")
        for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
            print(
                f"    {op:<22} {us / 1e3 / n_runs:8.2f} {100 * us / max(node_us, 1):6.1f} "
                f"{count[op] / n_runs:10.0f}"
            )
        mm_s = per_op.get("MatMul", 0) / 1e6 / n_runs
        if linear_params and mm_s:
            if phase.startswith("prefill"):
                flop = 2 * linear_params * ids.size  # every linear over every (padded) position
                print(
                    f"    MatMul: {flop / 1e9:.1f} GFLOP of linear layers "
                    f"({ids.size} positions incl. padding) in "
                    f"{1e3 * mm_s:.0f} ms of MatMul kernels (attention probs x V included) = "
                    f"{flop / mm_s / 1e9:.0f} GFLOP/s; compare with the float32 GEMM peak below"
                )
            else:
                nbytes = 4 * linear_params
                print(
                    f"    MatMul: {nbytes / MIB:.0f} MiB of float32 weights streamed per step "
                    f"in {1e3 * mm_s:.1f} ms = {nbytes / mm_s / 1e9:.1f} GB/s "
                    f"(memory-bound at batch {ids.shape[0]}: compare with the machine's memory bandwidth)"
                )


def gemm_peak(m: int, k: int, n: int, threads: int, with_torch: bool) -> dict:
    """float32 GEMM GFLOP/s of one [m, k] x [k, n] product: onnxruntime (a one-MatMul graph, constant weight)
    and torch.mm, with the benchmark's thread count: the roofline for prefill."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n), dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(
        model.SerializeToString(), session_options(threads, "all"), providers=["CPUExecutionProvider"]
    )
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
    ap.add_argument(
        "--new-tokens", type=int, default=32, help="greedy tokens generated per prompt (default 32)"
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per measurement, after one warm-up; medians"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads and onnxruntime intra_op_num_threads (default 0: all cores)",
    )
    ap.add_argument(
        "--ort-opt-level",
        choices=list(OPT_LEVELS),
        default="all",
        help="onnxruntime graph optimization level (default all, as SessionOptions' default)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to build the model and its export; an existing model with the same shape "
        "and its export are reused (default: a new folder under /tmp)",
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
    ap.add_argument("--skip-hf", action="store_true", help="measure the ONNX models only")
    ap.add_argument("--skip-int4", action="store_true", help="export and measure fp32 only")
    ap.add_argument(
        "--dtypes", default="fp32,fp16,int4,q4f16,int8", help="variants exported (one folder) and timed"
    )
    ap.add_argument(
        "--export-args", default="", help="extra `patcher export` options, e.g. '--int4-block 128'"
    )
    ap.add_argument("--skip-builder", action="store_true", help="skip onnxruntime-genai's model builder")
    ap.add_argument(
        "--bench-venv",
        type=Path,
        default=Path.home() / ".cache" / "patcher" / "bench-venv",
        help="the benchmark's own venv for onnxruntime-genai",
    )
    ap.add_argument(
        "--rlimit-frac",
        type=float,
        default=0.0,
        help="also export int4 under RLIMIT_AS = this x the float32 model size (0: skip)",
    )
    ap.add_argument("--rlimit-only", action="store_true", help="only the --rlimit-frac export (no timings)")
    ap.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="N",
        help="profile onnxruntime (fp32) and print the top N op types; by default this happens "
        "(top 15) only when fp32 misses the target; 0 never",
    )
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
    name = (
        f"llama-d{a.d_model}-i{a.intermediate}-L{a.layers}-v{a.vocab}-h{a.heads}"
        f"-kv{a.kv_heads}-hd{a.head_dim}"
    )
    model, onnx_dir = work / name, work / (name + "-onnx")
    if model.is_dir() and json.loads((model / "config.json").read_text()) == config(a):
        print(f"reusing {model}")
    else:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(onnx_dir, ignore_errors=True)
        created.append(model)
        t0 = time.perf_counter()
        make_model(model, a)
        print(f"generated {model} in {time.perf_counter() - t0:.1f} s")
    print(
        f"model: {a.layers} layers, d_model {a.d_model}, intermediate {a.intermediate}, heads {a.heads}/"
        f"{a.kv_heads} kv, head_dim {a.head_dim}, vocab {a.vocab}; {total_b / MIB:.1f} MiB bf16 "
        f"({2 * total_b / MIB:.1f} MiB float32)"
    )

    if a.rlimit_only:
        rlimit_check(a, cmd, model, work, created, total_b)
        return
    dtypes = ["fp32"] if a.skip_int4 else [d for d in VARIANT_FILES if d in a.dtypes.split(",")]
    files = {d: VARIANT_FILES[d] for d in dtypes}
    meta = onnx_dir / "patcher-export.json"
    have = (
        meta.is_file()
        and all((onnx_dir / "onnx" / f).is_file() for f in files.values())
        and meta.stat().st_mtime >= max(p.stat().st_mtime for p in model.iterdir())
    )
    if have:
        print(f"reusing export {onnx_dir}")
    else:
        created.append(onnx_dir)
        log = work / "export.log"
        created.append(log)
        r = run_child(
            cmd
            + [
                "export",
                str(model),
                "-o",
                str(onnx_dir),
                "--dtype",
                ",".join(dtypes),
                "--force",
                *a.export_args.split(),
            ],
            log,
        )
        if failed(r, "patcher export"):
            return
        print(
            f"patcher export --dtype {','.join(dtypes)} {a.export_args}: {r['wall']:.1f} s wall, "
            f"{r['cpu']:.1f} s CPU, peak RSS {r['rss']:.0f} MiB"
        )
    sizes_mib = {}
    for d, f in files.items():
        p = onnx_dir / "onnx" / f
        sizes_mib[d] = sum(q.stat().st_size for q in [p, *p.parent.glob(f + "_data*")]) / MIB

    builders = {}
    if not a.skip_builder:
        py = bench_venv(a.bench_venv)
        for prec in ("fp32", "int4") if py else ():
            out = work / f"{name}-genai-{prec}"
            if (
                not (out / "model.onnx").is_file()
                or (out / "model.onnx").stat().st_mtime < meta.stat().st_mtime
            ):
                created.extend([out, out.parent / (out.name + "-cache")])
                log = work / f"genai-{prec}.log"
                created.append(log)
                r = build_with_genai(py, model, out, prec, log)
                if failed(r, f"onnxruntime-genai builder -p {prec}"):
                    continue
                print(
                    f"onnxruntime-genai builder -p {prec}: {r['wall']:.1f} s wall, "
                    f"peak RSS {r['rss']:.0f} MiB"
                )
            builders["gb-" + prec] = out
            sizes_mib["gb-" + prec] = sum(q.stat().st_size for q in out.glob("model.onnx*")) / MIB

    tok = load_tokenizer(model)
    texts = make_prompts(NEGATIVE, a.prompts)
    ids_list = encode_prompts(tok, texts)
    ids, mask = left_pad(ids_list, tok.pad_id)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    B, S, N = ids.shape[0], ids.shape[1], a.new_tokens
    print(
        f"prompts: {B} neutral prompts, chat-templated, left-padded to {S} ({int(mask.sum())} real tokens, "
        f"{min(map(len, ids_list))}..{max(map(len, ids_list))} per prompt), e.g. {texts[0]!r}; "
        f"{N} greedy tokens each"
    )
    print(
        f"machine: {os.cpu_count()} CPUs; onnxruntime {ort.__version__}: intra_op_num_threads {a.threads}, "
        f"inter_op 1, sequential, graph optimization {OPT_LEVELS[a.ort_opt_level]} "
        f"(OnnxModel's own session: SessionOptions() defaults, intra_op_num_threads=0 = ORT's choice)",
        flush=True,
    )

    hf = None
    if not a.skip_hf:
        import torch
        import transformers
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        hf = HFRunner(model, a.threads, tok.pad_id)
        print(
            f"HF transformers {transformers.__version__}, torch {torch.__version__}: torch threads "
            f"{torch.get_num_threads()} (set_num_threads({a.threads})), attention {hf.attn}, float32; "
            f"loaded in {time.perf_counter() - t0:.1f} s"
        )
        hf_tok = AutoTokenizer.from_pretrained(model)
        hf_ids = []
        for p in texts:
            enc = hf_tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
            )
            hf_ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
        print(
            f"HF tokenizer ids {'==' if hf_ids == ids_list else '!='} patcher tokenizer ids"
            + ("" if hf_ids == ids_list else "  MISMATCH (the same patcher ids are fed to both anyway)")
        )
    runners = {"hf": hf} if hf else {}
    for d, f in files.items():
        t0 = time.perf_counter()
        runners[d] = OnnxRunner(open_onnx(onnx_dir, f, a.threads, a.ort_opt_level))
        print(f"onnxruntime session for {f} created in {time.perf_counter() - t0:.1f} s")
    for k, folder in builders.items():
        runners[k] = BuilderRunner(folder, a.threads, a.ort_opt_level)
    print(
        f"\ntimings (each method warmed up once, then {a.repeats} rounds, methods in turn; batch {B}):",
        flush=True,
    )
    res = measure(runners, ids, mask, pos, N, a.repeats)

    # --- agreement ---
    print()
    real = mask.astype(bool)
    if "hf" in res:
        for d in [*files, *builders]:
            same = res[d]["tokens"] == res["hf"]["tokens"]
            rows = int(same.all(axis=1).sum())
            first_diff = [int(np.argmin(r)) if not r.all() else None for r in same]
            lg, ref = res[d]["logits"].astype(np.float64), res["hf"]["logits"].astype(np.float64)
            err = (
                float(np.abs(lg - ref)[real].max() / np.abs(ref[real]).max())
                if lg.shape == ref.shape
                else float(np.abs(lg[:, -1] - ref[:, -1]).max() / np.abs(ref[:, -1]).max())
            )
            print(
                f"greedy tokens, {LABELS[d]} vs HF (left-padded batch): {100 * same.mean():.1f} % agreement "
                f"({rows}/{B} rows identical; first divergence per row: {first_diff}); prefill logits "
                f"max|diff|/max|HF| {err:.1e}"
                + ("  NOT APPLES TO APPLES" if d == "fp32" and not same.all() else "")
            )
        for k in builders:  # the same prompts one at a time (no padding): where the fused attention is right
            one = [
                runners[k].generate(np.array([r]), np.ones((1, len(r)), np.int64), N)[0][0] for r in ids_list
            ]
            same = np.array(one) == res["hf"]["tokens"]
            print(
                f"greedy tokens, {LABELS[k]} one prompt at a time (no padding) vs HF batch: "
                f"{100 * same.mean():.1f} % "
                f"agreement ({int(same.all(axis=1).sum())}/{B} rows identical)"
            )
    for d in files:
        if d != "fp32" and "fp32" in res:
            same = res[d]["tokens"] == res["fp32"]["tokens"]
            print(
                f"greedy tokens, ONNX {d} vs ONNX fp32: {100 * same.mean():.1f} % agreement "
                f"({int(same.all(axis=1).sum())}/{B} rows identical; "
                f"random-weight model: rounding flips near-ties)"
            )
    del runners

    # --- table ---
    print(
        f"\n{'method':<26} {'prefill tok/s':>14} {'decode tok/s':>13} {'generate tok/s':>15} "
        f"{'prefill ms':>11} {'ms/decode step':>15} {'vs HF prefill':>14} {'vs HF decode':>13} "
        f"{'weights MiB':>12}"
    )
    for k, r in res.items():
        vs = (
            f"{r['prefill_tps'] / res['hf']['prefill_tps']:14.2f} "
            f"{r['decode_tps'] / res['hf']['decode_tps']:13.2f}"
            if "hf" in res and k != "hf"
            else f"{'':>14} {'':>13}"
        )
        size = f"{sizes_mib[k]:12.1f}" if k in sizes_mib else f"{'(torch fp32)':>12}"
        label = LABELS[k] + f" ({a.threads} thr)"
        print(
            f"{label:<26} {r['prefill_tps']:14.1f} {r['decode_tps']:13.1f} {r['e2e_tps']:15.1f} "
            f"{1e3 * r['prefill_s']:11.1f} {1e3 * r['decode_s'] / (N - 1):15.2f} {vs} {size}"
        )
    print(
        f"\n(decode tok/s = {B} x {N - 1} tokens after the first / time from the first token to the end; "
        f"generate tok/s = {B} x {N} / whole generate call, prefill included)"
    )
    missed = False
    if "hf" in res and "fp32" in res:
        p = res["fp32"]["prefill_tps"] / res["hf"]["prefill_tps"]
        d = res["fp32"]["decode_tps"] / res["hf"]["decode_tps"]
        missed = min(p, d) < SPEED_MIN
        for what, x in (("prefill", p), ("decode", d)):
            print(
                f"ONNX fp32 / HF {what} tokens/s: {x:.2f} (target >= {SPEED_MIN:g})"
                + ("" if x >= SPEED_MIN else "  TARGET MISSED")
            )
        bp = res["fp32"]["best_prefill_tps"] / res["hf"]["best_prefill_tps"]
        bd = res["fp32"]["best_decode_tps"] / res["hf"]["best_decode_tps"]
        print(
            f"best-of-{a.repeats} (fastest run of each method) ONNX fp32 / HF: "
            f"prefill {bp:.2f}, decode {bd:.2f}"
        )
    for d in files:
        if d != "fp32" and "fp32" in res:
            x = res[d]["decode_tps"] / res["fp32"]["decode_tps"]
            goal = (
                f" (target >= {INT4_MIN:g}){'' if x >= INT4_MIN else '  TARGET MISSED'}"
                if d == "int4"
                else ""
            )
            print(
                f"ONNX {d} / fp32: prefill {res[d]['prefill_tps'] / res['fp32']['prefill_tps']:.2f}, "
                f"decode {x:.2f}{goal}, best-of-{a.repeats} decode "
                f"{res[d]['best_decode_tps'] / res['fp32']['best_decode_tps']:.2f}; "
                f"files {sizes_mib[d]:.1f} MiB vs {sizes_mib['fp32']:.1f} MiB "
                f"({sizes_mib[d] / sizes_mib['fp32']:.3f}x)"
            )
    for prec in ("fp32", "int4"):
        if prec in res and "gb-" + prec in res:
            x = res[prec]["decode_tps"] / res["gb-" + prec]["decode_tps"]
            y = res[prec]["prefill_tps"] / res["gb-" + prec]["prefill_tps"]
            print(
                f"patcher {prec} / builder {prec}: decode {x:.2f} (target >= {BUILDER_MIN:g})"
                f"{'' if x >= BUILDER_MIN else '  TARGET MISSED'}, prefill {y:.2f}, "
                f"best-of-{a.repeats} decode "
                f"{res[prec]['best_decode_tps'] / res['gb-' + prec]['best_decode_tps']:.2f}"
            )
    summary = " ".join(f"{k}_{m}={res[k][m + '_tps']:.1f}" for k in res for m in ("prefill", "decode"))
    print(f"\n{summary}")

    if a.rlimit_frac:
        rlimit_check(a, cmd, model, work, created, total_b)

    top = a.profile if a.profile is not None else (15 if missed else 0)
    if top and "fp32" in sizes_mib:
        linear = sum(int(np.prod(s)) for n, s in llama_tensors(a) if len(s) == 2 and "embed_tokens" not in n)
        profile_onnx(
            onnx_dir,
            files["fp32"],
            a.threads,
            a.ort_opt_level,
            ids,
            mask,
            pos,
            a.profile_steps,
            top,
            work,
            created,
            linear,
        )
        peak = gemm_peak(ids.size, a.d_model, a.intermediate, a.threads, not a.skip_hf)
        print(
            f"  float32 GEMM peak, one [{ids.size} x {a.d_model}] x [{a.d_model} x {a.intermediate}] "
            f"product, {a.threads} threads, best of 10: "
            + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items())
        )


if __name__ == "__main__":
    sys.exit(main())
