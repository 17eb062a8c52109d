"""What pruning and the cached reference save, on the planted fixture (scripts/make_search_fixture.py).

    python scripts/bench_search_speed.py [--work bench-out/search-speed] [--points 40] [--tokens 64]

The same random points of the default space (what the start-up trials draw) are evaluated in order
twice: every trial to the end, then each judged against the front of the trials completed before it
(as `patcher search` does). Reported: rows generated, generation seconds, trials pruned, the fronts
(equal: a pruned trial is never one that would have been on the front). Then a repeated set-up
loads the reference from beside the study instead of computing it.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import make_search_fixture as msf


def _setup(work: Path, tokens: int):
    if not (work / msf.NAME).is_dir():
        msf.make(work)
    return msf.search_setup(work, work / "dirs.safetensors", tokens=tokens)


def _points(s, n: int) -> list:
    from patcher.search import space as sp

    rng = np.random.default_rng(0)
    return [sp.complete(sp.sample(sp.RandomTrial(rng), s.space), {}) for _ in range(n)]


def _front(values: list) -> list:
    return sorted(v for v in values if not any(o[0] <= v[0] and o[1] <= v[1] and o != v for o in values))


def run(work: Path, n: int, tokens: int) -> dict:
    from patcher.search import reference_cache
    from patcher.search import run as sr
    from patcher.search.objectives import Hopeless

    s = _setup(work, tokens)
    cache = reference_cache.path_for(work / "study.db")
    cache.unlink(missing_ok=True)
    t0 = time.perf_counter()
    sr.reference(s, cache)
    t_ref = time.perf_counter() - t0
    points = _points(s, n)
    rows = {}
    for prune in (False, True):
        done, total, pruned, t0 = [], 0, 0, time.process_time()
        for params in points:
            front = _front(done)
            try:
                r = s.evaluate(params, prune=sr.beyond_front(front) if prune and front else None)
            except Hopeless as h:
                total, pruned = total + h.rows, pruned + 1
                continue
            total += r.tokens_generated
            done.append((r.marker_rate, r.kl))
        rows[prune] = {
            "rows_generated": total,
            "trials_pruned": pruned,
            "cpu_s": round(time.process_time() - t0, 1),
            "front": _front(done),
        }
    t0 = time.perf_counter()
    _, loaded = sr.reference(_setup(work, tokens), cache)
    return {
        "points": n,
        "tokens": tokens,
        "no_pruning": rows[False],
        "pruning": rows[True],
        "same_front": rows[False]["front"] == rows[True]["front"],
        "reference_computed_s": round(t_ref, 2),
        "reference_loaded": loaded,
        "setup_with_loaded_reference_s": round(time.perf_counter() - t0, 2),
        "load_avg": round(os.getloadavg()[0], 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-out/search-speed"))
    ap.add_argument("--points", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    row = run(args.work, args.points, args.tokens)
    print(json.dumps(row), flush=True)
    (args.work / "results.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
