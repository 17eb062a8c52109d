"""Peak memory of `patcher search` on an 8B-shaped llama (Llama-3-8B's sizes, random bf16 weights,
~16 GB, generated here: no downloads), to check that a model larger than memory in float32 searches
on a 24 GiB machine.

    python scripts/bench_search_8b.py [--work ~/.cache/patcher/bench-8b] [--keep]
    python scripts/bench_search_8b.py --shape 1b --engine onnx --engine-dtype int4   # Llama-3.2-1B's sizes

It writes the checkpoint (d_model 4096, 32 blocks, 32 heads / 8 kv heads, MLP 14336, vocab 128256,
untied head), then runs a tiny search (2 trials, 2 + 2 prompts, 4 tokens) under `/usr/bin/time -v`
and prints the wall time and peak RSS. The checkpoint is deleted afterwards unless --keep.
The search takes a random directions file (--extract: extracted by the search, one more pass over
the weights; extraction is streamed block by block, see BENCHMARKS.md "Scale").
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search

SHAPE_8B = dict(d=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256, tied=False)
SHAPES = {"8b": SHAPE_8B, "1b": dict(d=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, tied=True)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "patcher" / "bench-8b")
    ap.add_argument("--keep", action="store_true", help="keep the ~16 GB checkpoint")
    ap.add_argument("--make-only", action="store_true", help="write the checkpoint and stop")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--resident", default="auto", help="--resident of patcher search")
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--engine", default="numpy", help="--engine of patcher search")
    ap.add_argument(
        "--engine-dtype", default="fp32", help="--engine-dtype (the onnx graph is built under WORK/cache)"
    )
    ap.add_argument("--extract", action="store_true", help="let the search extract its directions")
    args = ap.parse_args(argv)
    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    t0 = time.perf_counter()
    model = bench_search.make_model(work / f"model-{args.shape}", shape, fast=True)
    made = time.perf_counter() - t0
    print(json.dumps({"checkpoint": str(model), "made_s": round(made, 1)}), flush=True)
    if args.make_only:
        return
    pos = bench_search.prompt_file(work / "pos.txt", 2, 1, shape["vocab"])
    neg = bench_search.prompt_file(work / "neg.txt", 2, 2, shape["vocab"])
    dirs = work / "dirs.safetensors"
    if not args.extract and not dirs.is_file():
        from patcher.edit.directions import save_directions

        L, d = shape["layers"], shape["d"]
        table = np.random.default_rng(0).standard_normal((L + 1, d)).astype(np.float32)
        save_directions(dirs, table, table, table * 0, {"selected_layer": L // 2})
    cmd = [
        "/usr/bin/time",
        "-v",
        str(Path(sys.executable).parent / "patcher"),
        "search",
        str(model),
        "--positive",
        str(pos),
        "--negative",
        str(neg),
        "--no-chat-template",
        "--tokens",
        str(args.tokens),
        "--trials",
        str(args.trials),
        "--startup",
        "1",
        "--no-heuristic",
        "--resident",
        args.resident,
        "--engine",
        args.engine,
        "--engine-dtype",
        args.engine_dtype,
        "--study",
        str(work / "study.db"),
    ]
    if dirs.is_file():
        cmd += ["--directions", str(dirs)]
    for f in ("study.db", "study.reference.npz", "study.svg"):
        (work / f).unlink(missing_ok=True)
    env = {**os.environ, "PATCHER_CACHE": str(work / "cache")}  # a fresh graph: its build is measured
    shutil.rmtree(work / "cache", ignore_errors=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time .*: ([\d:.]+)", r.stderr)
    row = {
        "shape": shape,
        "checkpoint_GB": round(sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9, 2),
        "exit": r.returncode,
        "peak_rss_GiB": round(int(rss.group(1)) / 2**20, 2) if rss else None,
        "wall": wall.group(1) if wall else None,
        "resident": args.resident,
        "engine": args.engine,
        "engine_dtype": args.engine_dtype,
    }
    print(json.dumps(row), flush=True)
    tag = (
        "" if (args.engine, args.engine_dtype) == ("numpy", "fp32") else f"-{args.engine}-{args.engine_dtype}"
    )
    (work.parent / f"bench-{args.shape}{tag}.json").write_text(json.dumps(row, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
