"""Benchmark `patcher ablate` against `cp -r` on synthetic llama checkpoints.

For each size it writes a sharded bf16 llama-layout checkpoint (HF names, ~1 GB shards, index
and config.json) plus a random direction, then measures, with the page cache warmed the same way
before every run and outputs removed between runs:

  * `cp -r SRC DST && sync`                      wall seconds
  * `patcher ablate SRC -d dir.npy -o OUT; sync` wall seconds (Python start-up included), and the
                                                 child's own peak RSS and CPU seconds (os.wait4)

and prints each run, then the medians over --repeats (peak RSS: the maximum). Targets: patcher/cp
<= 1.3, peak RSS <= 1 GiB, and RSS not growing with checkpoint size. It only reports (exit 0);
misses are flagged "TARGET MISSED". cp+sync on a shared or virtual disk varies a lot from run to
run; the per-run lines show the spread.

    python scripts/bench_patch.py                      # ~1.1 GB and ~2.2 GB, 2 repeats
    python scripts/bench_patch.py --sizes 0.5 --repeats 1 --workdir /data/bench --keep
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from patcher.writer import OutTensor, write_safetensors

D, FF, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 16
SHARD_BYTES = 1 << 30
RATIO_MAX, RSS_MAX_MIB = 1.3, 1024
BF16 = np.dtype(ml_dtypes.bfloat16)
_POOL = None  # pre-generated random bf16 values; blocks are views at random offsets


def _pool() -> np.ndarray:
    global _POOL
    if _POOL is None:
        _POOL = (np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(BF16)
    return _POOL


def _producer(shape, seed, ones=False):
    def produce():
        rows, cols = shape if len(shape) == 2 else (1, shape[0])
        if ones:
            yield np.ones(shape, dtype=BF16)
            return
        rng, pool = np.random.default_rng(seed), _pool()
        step = max(1, (4 << 20) // cols)  # ~8 MiB row blocks
        for s in range(0, rows, step):
            n = (min(s + step, rows) - s) * cols
            off = int(rng.integers(0, pool.size - n + 1))
            yield pool[off:off + n].reshape(-1, cols) if len(shape) == 2 else pool[off:off + n]
    return produce


def llama_tensors(n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = D // HEADS * KV_HEADS
    out = [("model.embed_tokens.weight", (VOCAB, D))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (D, D)), (p + "self_attn.k_proj.weight", (kv, D)),
                (p + "self_attn.v_proj.weight", (kv, D)), (p + "self_attn.o_proj.weight", (D, D)),
                (p + "mlp.gate_proj.weight", (FF, D)), (p + "mlp.up_proj.weight", (FF, D)),
                (p + "mlp.down_proj.weight", (D, FF)),
                (p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,))]
    return out + [("model.norm.weight", (D,)), ("lm_head.weight", (VOCAB, D))]


def _nbytes(n_layers: int) -> int:
    return sum(2 * int(np.prod(s)) for _, s in llama_tensors(n_layers))


def layers_for(gb: float) -> int:
    """Layer count whose checkpoint comes closest to `gb` (1e9 bytes)."""
    return max(1, round((gb * 1e9 - _nbytes(0)) / (_nbytes(1) - _nbytes(0))))


def make_checkpoint(folder: Path, n_layers: int) -> int:
    folder.mkdir(parents=True)
    shards, cur, size = [], [], 0
    for name, shape in llama_tensors(n_layers):
        nbytes = 2 * int(np.prod(shape))
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        outs = [OutTensor(n, "BF16", s, produce=_producer(s, zlib.crc32(n.encode()), ones=n.endswith("norm.weight")))
                for n, s in tensors]
        write_safetensors(folder / fname, outs, {"format": "pt"})
        for t in outs:
            weight_map[t.name] = fname
            total += t.nbytes
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D, "intermediate_size": FF,
        "num_hidden_layers": n_layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}, indent=2))
    return total


def warm(folder: Path) -> None:
    subprocess.run(f"cat {shlex.quote(str(folder))}/* > /dev/null", shell=True, check=True)


def time_cp(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", f'cp -r "{src}" "{dst}" && sync'], check=True)
    return time.perf_counter() - t0


# A child's ru_maxrss starts at its parent's peak RSS: subprocess vforks, and exec records the old
# mm's high-water mark in the child's maxrss (Linux exec_mmap). This parent holds numpy, patcher and
# the generator's value pool, so measured directly every child would read >= ~170 MiB. A minimal
# launcher (python -S, ~10 MiB) spawns the measured command and reports the grandchild's own rusage.
LAUNCHER = r'''
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"wall": wall, "maxrss_kib": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime,
               "rc": os.waitstatus_to_exitcode(status)}, f)
'''


def run_child(cmd: list[str], log: Path) -> dict:
    """Run cmd with stdout+stderr into log; wall seconds, the child's own peak RSS (MiB) and CPU seconds
    (wall measured around the command alone, launcher start-up excluded)."""
    exe = shutil.which(cmd[0]) or cmd[0]
    report = log.with_suffix(".rusage.json")
    with open(log, "wb") as f:
        lr = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), exe, *cmd[1:]],
                            stdout=f, stderr=subprocess.STDOUT)
    if lr.returncode != 0 or not report.is_file():
        return {"wall": 0.0, "rss": 0.0, "cpu": 0.0, "rc": lr.returncode or -1, "log": log}
    r = json.loads(report.read_text())
    report.unlink()
    return {"wall": r["wall"], "rss": r["maxrss_kib"] / 1024, "cpu": r["cpu"], "rc": r["rc"], "log": log}  # KiB


def time_patcher(cmd: list[str], src: Path, direction: Path, out: Path) -> tuple[float, float, float]:
    """Wall seconds (including a final sync), the patcher process's own peak RSS in MiB, and its CPU seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = run_child([*cmd, "ablate", str(src), "-d", str(direction), "-o", str(out)], Path(tmp) / "patcher.log")
        subprocess.run(["sync"], check=True)
        wall = time.perf_counter() - t0
        if r["rc"] != 0:
            sys.exit(f"patcher failed ({r['rc']}): {r['log'].read_text(errors='replace')[-3000:]}")
    return wall, r["rss"], r["cpu"]


def bench(cmd: list[str], src: Path, direction: Path, work: Path, repeats: int) -> tuple[float, float, float]:
    cps, pts, rss = [], [], []
    for _ in range(repeats):
        for kind in ("cp", "patcher"):
            dst = work / f"out-{kind}"
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            warm(src)
            load = f"(1-min load before: {os.getloadavg()[0]:.1f})"
            if kind == "cp":
                cps.append(time_cp(src, dst))
                print(f"  {src.name}: cp+sync {cps[-1]:.2f} s {load}", flush=True)
            else:
                w, r, cpu = time_patcher(cmd, src, direction, dst)
                pts.append(w)
                rss.append(r)
                print(f"  {src.name}: patcher {w:.2f} s, cpu {cpu:.2f} s, peak RSS {r:.0f} MiB {load}", flush=True)
            shutil.rmtree(dst)
    subprocess.run(["sync"], check=True)
    return statistics.median(cps), statistics.median(pts), max(rss)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1.1,2.2", help="checkpoint sizes in GB, comma-separated (default 1.1,2.2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to build checkpoints (default: a new folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and direction "
                    "(otherwise everything this run created is deleted)")
    ap.add_argument("--patcher", default="patcher", help="command that runs the CLI (default: patcher on PATH)")
    args = ap.parse_args(argv)
    cmd = shlex.split(args.patcher)
    if not shutil.which(cmd[0]):
        ap.error(f"{cmd[0]} not found on PATH")
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="patcher-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    created = [] if args.workdir else [work]  # never delete a user's --workdir itself, only what we made in it
    rows = []
    try:
        direction = work / "dir.npy"
        created.append(direction)
        np.save(direction, np.random.default_rng(1).standard_normal(D).astype(np.float32))
        for gb in sizes:
            n_layers = layers_for(gb)
            src = work / f"llama-{n_layers}L"
            if not src.exists():
                created.append(src)
                t0 = time.perf_counter()
                total = make_checkpoint(src, n_layers)
                print(f"generated {src} ({total / 1e9:.2f} GB, {n_layers} layers) in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            total = sum(f.stat().st_size for f in src.iterdir())
            cp_s, pt_s, rss = bench(cmd, src, direction, work, args.repeats)
            rows.append((total, n_layers, cp_s, pt_s, rss))
    finally:
        if not args.keep:
            for p in created:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    print(f"\n{'size GB':>8} {'layers':>6} {'cp+sync s':>10} {'patcher s':>10} {'ratio':>6} {'peak RSS MiB':>13}")
    for total, n_layers, cp_s, pt_s, rss in rows:
        miss = [m for m, bad in (("ratio", pt_s / cp_s > RATIO_MAX), ("rss", rss > RSS_MAX_MIB)) if bad]
        print(f"{total / 1e9:8.2f} {n_layers:6d} {cp_s:10.2f} {pt_s:10.2f} {pt_s / cp_s:6.2f} {rss:13.0f}"
              + (f"  TARGET MISSED ({', '.join(miss)})" if miss else ""))
    print()
    for total, _, cp_s, pt_s, rss in rows:
        print(f"size_gb={total / 1e9:.2f} ratio={pt_s / cp_s:.2f} rss_mib={rss:.0f}")
    if len(rows) > 1:
        small, large = rows[0][4], rows[-1][4]
        grew = large > small * 1.2 + 32  # allow noise: 20 % + 32 MiB
        print(f"RSS {'grew' if grew else 'did not grow'} with checkpoint size: {small:.0f} -> {large:.0f} MiB "
              f"({rows[0][0] / 1e9:.2f} -> {rows[-1][0] / 1e9:.2f} GB)" + ("  TARGET MISSED" if grew else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
