"""What one search trial costs on a real model, and what the stem and the length buckets save.

    python scripts/bench_trial.py [--model HF_FOLDER] [--points 6] [--prompts 32] [--tokens 32]

Random points of the default space (what the start-up trials draw) are each evaluated twice in a row,
single-threaded: as `patcher search` runs them ("new": the original's residual streams kept per prompt
batch, so a prompt pass starts at the first layer the edit reaches; prompts in length buckets) and
"old" (every pass from the embedding, one left-padded batch). Per point: seconds, the work done
(token-layers run, padding included: a count the machine's load does not change), their ratios, the
first edited layer, and whether both gave the same marker rate and KL. Directions are
extracted from the train split once (projected against the harmless mean, as `patcher search` does).
Prompts: scripts/prompt_sets.py's search split; SmolLM2 from scripts/real_models.py by default.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")  # before numpy loads BLAS: one core, as the peer benchmark runs
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="an HF folder (default: SmolLM2)")
    ap.add_argument("--work", type=Path, default=Path("bench-out/trial"))
    ap.add_argument("--points", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    import prompt_sets
    import real_models

    from patcher.search import space as sp
    from patcher.search import stems
    from patcher.search.plan import build_plan

    P, model = prompt_sets.ensure(), args.model or real_models.ensure().hf
    args.work.mkdir(parents=True, exist_ok=True)
    label = "-".join(Path(model).resolve().parts[-2:])  # real_models' folders all end in hf/
    dirs = args.work / f"{label}-dirs.safetensors"
    s = prompt_sets.search_setup(
        model,
        P,
        dirs,
        project_out_negative_mean=True,
        tokens=args.tokens,
        batch_size=args.prompts,
        max_prompts=args.prompts,
        resident="float32",
    )
    t0 = time.perf_counter()
    s.evaluator.reference()
    print(f"reference: {time.perf_counter() - t0:.1f} s", flush=True)
    ev, rng, rows, work = s.evaluator, np.random.default_rng(args.seed), [], [0]
    forward, L = s.engine.forward, s.n_layers

    def counted(ids, *a, **k):  # token-layers run: rows resuming at `start` skip the layers below it
        start, known = k.get("start", 0), k.get("known")
        below = 0 if known is None else (len(ids) - len(known[0])) * ids.shape[1] * start
        work.append(ids.size * (L - start) + below)
        return forward(ids, *a, **k)

    s.engine.forward = counted
    variants = {"new": (ev._stems, stems.MIN_BUCKET), "old": (None, 1 << 62)}
    for i in range(args.points):
        params = sp.complete(sp.sample(sp.RandomTrial(rng), s.space), {})
        spec = sp.edit_spec(params, s.table, s.n_layers, s.directions)
        edits = s.engine.edits(build_plan(s.ck, s.resolved, spec, str(s.directions), s.untie))
        row: dict = {"point": i, "first_layer": edits.first_layer, "layers": L}
        results = {}
        for name, (kept, min_bucket) in variants.items():
            ev._stems, stems.MIN_BUCKET = kept, min_bucket
            work.clear()
            t0 = time.perf_counter()
            r = ev.evaluate(edits)
            row[f"{name}_s"] = round(time.perf_counter() - t0, 2)
            row[f"{name}_kl_pass_s"] = round(r.timing.kl, 2)
            row[f"{name}_token_layers"] = sum(work)
            results[name] = (r.marker_rate, r.kl)
        row["ratio"] = round(row["old_s"] / row["new_s"], 2)
        row["work_ratio"] = round(row["old_token_layers"] / row["new_token_layers"], 2)
        row["same"] = (
            results["new"][0] == results["old"][0] and abs(results["new"][1] - results["old"][1]) < 1e-5
        )
        row["marker_rate"], row["kl"] = results["new"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {k: sum(r[k] for r in rows) for k in ("old_s", "new_s", "old_token_layers", "new_token_layers")}
    summary = {"model": str(model), "points": len(rows), **total, "all_same": all(r["same"] for r in rows)}
    summary["ratio"] = round(total["old_s"] / total["new_s"], 2)
    summary["work_ratio"] = round(total["old_token_layers"] / total["new_token_layers"], 2)
    summary["load_avg"] = round(os.getloadavg()[0], 1)
    print(json.dumps(summary), flush=True)
    (args.work / f"{label}.json").write_text(json.dumps({"summary": summary, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
