"""What one search trial costs on a real model, and what starting it from the original's stem saves.

    python scripts/bench_trial.py [--model HF_FOLDER] [--points 6] [--prompts 32] [--tokens 32]

Random points of the default space (what the start-up trials draw) are each evaluated twice in a row,
once with the original's residual streams kept per prompt batch (a trial's prompt passes start at the
first layer its edit reaches) and once from the embedding, single-threaded: seconds of each, their
ratio, the first edited layer, and whether both gave the same marker rate and KL. Directions are
extracted from the train split once (projected against the harmless mean, as `patcher search` does).
Prompts: scripts/prompt_sets.py's search split; SmolLM2 from scripts/real_models.py by default.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
SYSTEM = "You are a helpful assistant."


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="an HF folder (default: SmolLM2)")
    ap.add_argument("--work", type=Path, default=Path("bench-out/trial"))
    ap.add_argument("--points", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # before numpy loads BLAS: one core, as the peer benchmark runs
    import prompt_sets
    import real_models

    from patcher.search import run as sr
    from patcher.search import space as sp
    from patcher.search.plan import build_plan

    P, model = prompt_sets.ensure(), args.model or real_models.ensure().hf
    args.work.mkdir(parents=True, exist_ok=True)
    dirs = args.work / f"{Path(model).name}-dirs.safetensors"
    s = sr.setup(
        model,
        P["harmful-train"],
        P["harmless-train"],
        eval_positive=P["harmful-search"],
        eval_negative=P["harmless-search"],
        directions=dirs if dirs.is_file() else None,
        directions_out=dirs,
        project_out_negative_mean=True,
        tokens=args.tokens,
        batch_size=args.prompts,
        max_prompts=args.prompts,
        system=SYSTEM,
        resident="float32",
    )
    t0 = time.perf_counter()
    s.evaluator.reference()
    print(f"reference: {time.perf_counter() - t0:.1f} s", flush=True)
    ev, rng, rows = s.evaluator, np.random.default_rng(args.seed), []
    kept = ev._stems
    for i in range(args.points):
        params = sp.complete(sp.sample(sp.RandomTrial(rng), s.space), {})
        spec = sp.edit_spec(params, s.table, s.n_layers, s.directions)
        edits = s.engine.edits(build_plan(s.ck, s.resolved, spec, str(s.directions), s.untie))
        row: dict = {"point": i, "first_layer": edits.first_layer, "layers": s.n_layers}
        results = {}
        for name, stems in (("stem", kept), ("full", None)):
            ev._stems = stems
            t0 = time.perf_counter()
            r = ev.evaluate(edits)
            row[f"{name}_s"] = round(time.perf_counter() - t0, 2)
            row[f"{name}_kl_pass_s"] = round(r.timing.kl, 2)
            results[name] = (r.marker_rate, r.kl)
        row["ratio"] = round(row["full_s"] / row["stem_s"], 2)
        row["same"] = results["stem"] == results["full"]
        row["marker_rate"], row["kl"] = results["stem"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    full, stem = sum(r["full_s"] for r in rows), sum(r["stem_s"] for r in rows)
    summary = {"model": str(model), "points": len(rows), "full_s": full, "stem_s": stem}
    summary |= {"ratio": round(full / stem, 2), "all_same": all(r["same"] for r in rows)}
    summary["load_avg"] = round(os.getloadavg()[0], 1)
    print(json.dumps(summary), flush=True)
    (args.work / f"{Path(model).name}.json").write_text(json.dumps({"summary": summary, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
