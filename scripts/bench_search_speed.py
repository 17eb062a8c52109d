"""What pruning and the cached reference save, on the planted fixture (scripts/make_search_fixture.py):
the same seeded search with and without --prune (wall time, trials pruned, rows generated, the
fronts: they differ once a trial is pruned, as TPE then sees a pruned trial instead of its values),
then a repeated study's set-up with the reference loaded instead of computed.

    python scripts/bench_search_speed.py [--work bench-out/search-speed] [--trials 40] [--tokens 16]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import make_search_fixture as msf


def run(work: Path, prune: bool, trials: int, tokens: int) -> dict:
    from patcher.search import reference_cache
    from patcher.search import run as sr
    from patcher.search import study as st

    model = msf.make(work) if not (work / msf.NAME).is_dir() else work / msf.NAME
    P = work / "prompts"
    db = work / f"prune-{prune}.db"
    for f in (db, reference_cache.path_for(db)):
        f.unlink(missing_ok=True)
    s = sr.setup(
        model,
        P / "refusal-train-positive.txt",
        P / "refusal-train-negative.txt",
        eval_positive=P / "refusal-eval-positive.txt",
        eval_negative=P / "refusal-eval-negative.txt",
        directions=work / "dirs.safetensors" if (work / "dirs.safetensors").is_file() else None,
        directions_out=work / "dirs.safetensors",
        chat_template=False,
        tokens=tokens,
        prune=prune,
    )
    study = st.open_study(db, s.attrs, seed=0, startup=16)
    t0 = time.perf_counter()
    ref, _ = sr.reference(s, reference_cache.path_for(db))
    t_ref = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    st.optimize(study, s.run_trial, trials, None, 1)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    done = st.completed(study)
    t0 = time.perf_counter()
    again = sr.setup(  # a repeated study: the reference comes from the file beside it
        model,
        P / "refusal-train-positive.txt",
        P / "refusal-train-negative.txt",
        eval_positive=P / "refusal-eval-positive.txt",
        eval_negative=P / "refusal-eval-negative.txt",
        directions=work / "dirs.safetensors",
        chat_template=False,
        tokens=tokens,
    )
    _, cached = sr.reference(again, reference_cache.path_for(db))
    return {
        "prune": prune,
        "trials": trials,
        "completed": len(done),
        "pruned": len(st.pruned_trials(study)),
        "trials_wall_s": round(wall, 1),
        "trials_cpu_s": round(cpu, 1),
        "trials_per_hour_cpu": round(3600 * trials / cpu, 0),
        "rows_generated": sum(t.user_attrs.get("tokens_generated", 0) for t in done),
        "front": [tuple(round(v, 6) for v in t.values) for t in st.pareto(done)],
        "reference_s": round(t_ref, 2),
        "reference_loaded": cached,
        "setup_and_loaded_reference_s": round(time.perf_counter() - t0, 2),
        "load_avg": round(os.getloadavg()[0], 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-out/search-speed"))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run(args.work, prune, args.trials, args.tokens) for prune in (False, True)]
    for r in rows:
        print(json.dumps(r), flush=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
