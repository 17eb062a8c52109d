"""The same search points scored by the numpy engine and by the onnx engine with fp32 / int4 / int8
weights (`patcher search --engine onnx --engine-dtype ...`): marker rate, KL, seconds per trial and the
peak RSS of each engine's process (graph built fresh, original's reference, the points).

    python scripts/bench_search_quantized.py [MODEL] [--prompts 16] [--tokens 32] [--points 4]

MODEL defaults to SmolLM2-135M-Instruct (scripts/real_models.py). Directions are extracted once from the
harmful/harmless training prompts (~/.cache/patcher/prompts, scripts/prompt_sets.py); the points are
patcher's default pipeline and random draws of the default space (seeded). Each engine runs in its own
process under /usr/bin/time -v with an empty PATCHER_CACHE.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROMPTS = Path.home() / ".cache" / "patcher" / "prompts"
ENGINES = {"numpy": ("numpy", "fp32"), **{f"onnx-{d}": ("onnx", d) for d in ("fp32", "int4", "int8")}}


def points(n_layers: int, selected: int, count: int, seed: int = 0) -> list[dict]:
    from patcher.search import run as sr
    from patcher.search import space as sp

    space = sr.build_space(n_layers, None)
    rng = np.random.default_rng(seed)
    draws = [sp.sample(sp.RandomTrial(rng), space) for _ in range(count - 1)]
    return [sr.heuristic_params(selected, n_layers), *draws]


def one(args) -> dict:
    """Child: set up the search on one engine, score the original and the points."""
    from patcher.search import run as sr

    engine, dtype = ENGINES[args.one]
    s = sr.setup(
        args.model,
        PROMPTS / "harmful-train.txt",
        PROMPTS / "harmless-train.txt",
        eval_positive=PROMPTS / "harmful-search.txt",
        eval_negative=PROMPTS / "harmless-search.txt",
        directions=args.directions,
        engine=engine,
        engine_dtype=dtype,
        tokens=args.tokens,
        max_prompts=args.prompts,
        batch_size=args.prompts,
    )
    ref = s.evaluator.reference()
    rows = []
    for p in points(s.n_layers, int(s.selected), args.points):
        r = s.evaluate(p)
        rows.append(
            {
                "marker_rate": r.marker_rate,
                "kl": r.kl,
                "seconds": round(r.timing.generate + r.timing.kl, 2),
            }
        )
    return {
        "engine": args.one,
        "load_s": s.seconds.get("load"),
        "original": ref["marker_rate"],
        "points": rows,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--prompts", type=int, default=16, help="eval prompts of each side")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--out", type=Path, help="JSON of the results")
    ap.add_argument("--one", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--directions", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import real_models

        args.model = Path(real_models.ensure(log=lambda m: None).hf)
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    from patcher.edit.extract import extract

    with tempfile.TemporaryDirectory() as tmp:
        dirs = Path(tmp) / "dirs.safetensors"
        extract(args.model, PROMPTS / "harmful-train.txt", PROMPTS / "harmless-train.txt").save(dirs)
        results = []
        for name in args.engines.split(","):
            cache = Path(tmp) / f"cache-{name}"
            cmd = ["/usr/bin/time", "-v", sys.executable, __file__, str(args.model), "--one", name]
            cmd += ["--directions", str(dirs), "--prompts", str(args.prompts), "--tokens", str(args.tokens)]
            cmd += ["--points", str(args.points)]
            r = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "PATCHER_CACHE": str(cache)}
            )
            found = re.search(r"^RESULT (.*)$", r.stdout, re.M)
            if not found:
                raise SystemExit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
            row = json.loads(found.group(1))
            rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
            row["peak_rss_MiB"] = round(int(rss.group(1)) / 1024) if rss else None
            print(json.dumps(row), flush=True)
            results.append(row)
    print(
        "| engine | peak RSS MiB | original | "
        + " | ".join(f"point {i}: rate, KL, s" for i in range(args.points))
    )
    for row in results:
        cells = [f"{p['marker_rate']:.3f}, {p['kl']:.3g}, {p['seconds']:.1f}" for p in row["points"]]
        print(f"| {row['engine']} | {row['peak_rss_MiB']} | {row['original']:.3f} | " + " | ".join(cells))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
