"""Quality levers, one at a time, on the real SmolLM2-135M-Instruct: one fixed edit (the
extract-selected direction, strength 1 on every attention and MLP writer, embeddings untouched) and
variants that each change one thing, scored on the search split (scripts/prompt_sets.py; prompts the
directions never saw): marker rate over `--tokens` greedy tokens, first-token KL, KL over the first 16
tokens of the original's completion.

    python scripts/bench_levers.py --extract [--work bench-out/levers] [--tokens 48] [--winsorize 0.99]
    python scripts/bench_levers.py --directions DIRS.safetensors      # reuse directions: no extraction

Levers: projected directions (orthogonalised against the harmless mean), winsorized means, norm
preservation (cols / rows), per-layer directions, attention-only / MLP-only, and a rank-2 subspace
(last and second-to-last token directions at the selected layer; written with `patcher ablate` and
scored as a checkpoint, since the search engines apply rank-1 edits).
"""

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from prompt_sets import SYSTEM  # noqa: E402


def projected(direction: np.ndarray, negative_mean: np.ndarray) -> np.ndarray:
    """Each row with its component along the harmless mean removed (projected abliteration)."""
    n = negative_mean / np.maximum(np.linalg.norm(negative_mean, axis=1, keepdims=True), 1e-30)
    return direction - np.sum(direction * n, axis=1, keepdims=True) * n


def base_params(selected: int, n_layers: int) -> dict:
    p = {
        "direction_scope": "global",
        "direction_index": float(selected),
        "embed": False,
        "norm_preserve": "none",
    }
    for c in ("attn_out", "mlp_out"):
        p.update({f"{c}_peak": 1.0, f"{c}_center": 0.0, f"{c}_min_frac": 1.0, f"{c}_width": float(n_layers)})
    return p


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-out/levers"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--kl-tokens", type=int, default=16)
    ap.add_argument("--winsorize", type=float, default=0.99)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--directions", type=Path, default=None, help="reuse a directions file (no extraction)")
    ap.add_argument("--extract", action="store_true", help="also the winsorized and rank-2 levers")
    ap.add_argument("--max-prompts", type=int, default=None, help="search-split prompts of each kind")
    ap.add_argument(
        "--model", type=Path, default=None, help="an HF folder (default: SmolLM2 from real_models)"
    )
    args = ap.parse_args(argv)
    if args.directions is None and not args.extract:
        ap.error("give --directions FILE, --extract, or both")
    import prompt_sets
    import real_models

    from patcher.edit.extract import extract
    from patcher.model.execution import StreamedModel
    from patcher.model.opened import Model
    from patcher.model.prompts import encode_prompts, read_prompt_file
    from patcher.onnx.verify import stop_tokens
    from patcher.search import space as sp
    from patcher.search.engine import ResidentModel
    from patcher.search.objectives import Evaluator
    from patcher.search.plan import build_plan

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    P, model = prompt_sets.ensure(), args.model or real_models.ensure().hf
    t0 = time.perf_counter()
    if args.directions is not None:  # e.g. the peer benchmark's: same prompts, same system prompt
        from patcher.edit.directions import read_metadata
        from patcher.io.checkpoint import Checkpoint

        with Checkpoint(args.directions) as c:
            last = np.array(c.array("direction"), np.float64)
            neg_mean = np.array(c.array("negative_mean"), np.float64)
            sel = int(read_metadata(c)["selected_layer"])
    if args.extract:  # the levers that need their own extraction: winsorized means, rank 2
        two = extract(
            model, P["harmful-train"], P["harmless-train"], positions=(-1, -2), system=SYSTEM, batch_size=16
        )
        wins = extract(
            model,
            P["harmful-train"],
            P["harmless-train"],
            system=SYSTEM,
            batch_size=16,
            winsorize=args.winsorize,
        )
        last, pos_mean, neg_mean = (np.asarray(a, np.float64) for a in two.per_position[-1])
        second = np.asarray(two.per_position[-2][0], np.float64)
        sel = wins.selected_layer  # the -1 extraction's choice (its scores are over position -1 alone)
    print(f"directions: {time.perf_counter() - t0:.0f} s, selected layer {sel}", flush=True)
    ck = Model.open(model)
    sm = StreamedModel(ck)
    L = sm.n_layers
    engine = ResidentModel(sm)
    tok = ck.tokenizer()

    def enc(path):
        return encode_prompts(
            tok, read_prompt_file(path, args.max_prompts), chat_template=True, system=SYSTEM
        )

    ev = Evaluator(
        engine,
        tok,
        enc(P["harmful-search"]),
        enc(P["harmless-search"]),
        tokens=args.tokens,
        kl_tokens=args.kl_tokens,
        eos=stop_tokens(ck.folder, tok),
        batch_size=args.batch_size,
    )
    ref = ev.reference()
    base = base_params(sel, L)
    variants = [
        ("difference in means (base)", last, base),
        ("projected (⟂ harmless mean)", projected(last, neg_mean), base),
        ("norm-preserve cols", last, {**base, "norm_preserve": "cols"}),
        ("norm-preserve rows", last, {**base, "norm_preserve": "rows"}),
        ("per-layer directions", last, {**base, "direction_scope": "per_layer"}),
        ("attention writers only", last, {**base, "mlp_out_peak": 0.0}),
        ("MLP writers only", last, {**base, "attn_out_peak": 0.0}),
    ]
    if args.extract:
        variants.insert(
            2, (f"winsorized means (q = {args.winsorize})", np.asarray(wins.direction, np.float64), base)
        )
    rows = [{"lever": "original", "marker_rate": ref["marker_rate"], "kl_first": 0.0, "kl_seq": 0.0}]
    out = work / "levers.json"

    def record(name, r, seconds):
        rows.append(
            {
                "lever": name,
                "marker_rate": r.marker_rate,
                "kl_first": r.first_token_kl,
                "kl_seq": r.kl,
                "seconds": round(seconds, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(
            json.dumps({"selected_layer": sel, "tokens": args.tokens, "rows": rows}, indent=2) + "\n"
        )

    for name, table, params in variants:
        t1 = time.perf_counter()
        spec = sp.edit_spec(params, table, L)
        r = ev.evaluate(engine.edits(build_plan(ck, sm.resolved, spec, name)))
        record(name, r, time.perf_counter() - t1)
    if not args.extract:
        return
    # rank 2: span of the last and second-to-last token directions at the selected layer
    t1 = time.perf_counter()
    q = np.stack([last[sel], second[sel]]).astype(np.float32)
    np.save(work / "rank2.npy", q)
    written = work / "rank2-model"
    patcher = Path(sys.executable).with_name("patcher")
    cmd = [str(patcher), "ablate", str(model), "-d", str(work / "rank2.npy"), "-o", str(written)]
    subprocess.run([*cmd, "--targets", "attn_out,mlp_out", "--force"], check=True, stdout=subprocess.DEVNULL)
    e = copy.copy(ev)
    e.engine = ResidentModel(StreamedModel(Model.open(written)))
    record("rank-2 subspace (last, second-to-last token)", e.evaluate(None), time.perf_counter() - t1)


if __name__ == "__main__":
    main()
