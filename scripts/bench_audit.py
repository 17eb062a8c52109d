"""Benchmark `patcher audit` against reading the same checkpoint once.

Writes a synthetic bf16 llama checkpoint (bench_patch's layout: d_model 2048, ~1 GB per --gb) and its
ablation by `patcher ablate`, then, with the page cache warmed the same way before each run, times:

  * `cat` of every shard to /dev/null          the floor: each byte read once
  * `patcher audit MODEL --json`               wall seconds, the child's own peak RSS and CPU seconds

for the clean and the ablated checkpoint, and prints audit/cat ratios (target ≤ 1.5×) and the verdicts
(clean: "no sign", ablated: found with |cos| to the direction used). It only reports (exit 0).

    python scripts/bench_audit.py                 # ~1 GB, 2 repeats
    python scripts/bench_audit.py --gb 4 --repeats 1 --workdir /data/bench --keep
    python scripts/bench_audit.py --gb 0 --model ~/.cache/patcher/real-models/smollm2-135m-instruct/hf
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patch import D, layers_for, make_checkpoint, run_child, run_in_workdir, warm

RATIO_MAX = 1.5


def time_cat(folder: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"cat {folder}/*.safetensors > /dev/null", shell=True, check=True)
    return time.perf_counter() - t0


def bench_existing(args, work: Path, created: list) -> None:
    """--model: audit checkpoints that exist (a real model), each against one cat of its files."""
    for folder in args.model:
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
        cats, audits = [], []
        for k in range(args.repeats):
            warm_files(files)
            t0 = time.perf_counter()
            subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
            cats.append(time.perf_counter() - t0)
            warm_files(files)
            log = work / f"model-{k}.log"
            created.append(log)
            audits.append(run_child(["patcher", "audit", str(folder), "--json"], log))
        text = log.read_text()
        rep = json.loads(text[text.index("{") :])
        cat, wall = statistics.median(cats), statistics.median(a["wall"] for a in audits)
        size = sum(f.stat().st_size for f in files)
        print(
            f"{folder}: {size / 1e6:.0f} MB; cat {cat:.2f} s, audit {wall:.2f} s (cpu "
            f"{statistics.median(a['cpu'] for a in audits):.1f} s) = {wall / cat:.1f}× the read; peak RSS "
            f"{max(a['rss'] for a in audits):.0f} MiB; verdict: {rep['level']}"
        )


def warm_files(files) -> None:
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def bench(args, work: Path, created: list) -> None:
    if args.model:
        bench_existing(args, work, created)
        if args.gb <= 0:
            return
    src, out = work / "model", work / "ablated"
    created += [src, out, work / "dir.npy"]
    n_layers = layers_for(args.gb)
    total = make_checkpoint(src, n_layers)
    r = np.random.default_rng(0).normal(size=D).astype(np.float32)
    np.save(work / "dir.npy", r)
    subprocess.run(
        ["patcher", "ablate", str(src), "-d", str(work / "dir.npy"), "-o", str(out), "--no-hash"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"checkpoint: {n_layers} layers, d_model {D}, {total / 1e9:.2f} GB of tensors")
    for label, folder in (("clean", src), ("ablated", out)):
        cats, audits = [], []
        for k in range(args.repeats):
            warm(folder)
            cats.append(time_cat(folder))
            warm(folder)
            res = run_child(["patcher", "audit", str(folder), "--json"], work / f"{label}-{k}.log")
            created.append(work / f"{label}-{k}.log")
            text = (work / f"{label}-{k}.log").read_text()
            rep = json.loads(text[text.index("{") :])
            audits.append(res)
            print(
                f"  {label} run {k + 1}: cat {cats[-1]:.2f} s, audit {res['wall']:.2f} s "
                f"(cpu {res['cpu']:.1f} s, peak RSS {res['rss']:.0f} MiB)"
            )
        cat, wall = statistics.median(cats), statistics.median(a["wall"] for a in audits)
        found = rep["direction"]
        cosine = abs(float(np.dot(found, r) / np.linalg.norm(r))) if found and np.ndim(found) == 1 else None
        flag = "" if wall / cat <= RATIO_MAX else "  TARGET MISSED"
        print(
            f"{label}: audit / cat = {wall / cat:.2f}× (target ≤ {RATIO_MAX}){flag}; peak RSS "
            f"{max(a['rss'] for a in audits):.0f} MiB; verdict: {rep['verdict']}"
            + ("" if cosine is None else f"; |cos| with the ablated direction {cosine:.6f}")
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="also audit this existing checkpoint (folder or GGUF); --gb 0 for only these",
    )
    args = ap.parse_args(argv)
    run_in_workdir(args, "bench-audit-", lambda work, created: bench(args, work, created))
    return 0


if __name__ == "__main__":
    sys.exit(main())
