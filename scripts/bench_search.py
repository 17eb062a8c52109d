"""Trials per hour of `patcher search` on a ~135M-parameter model (random weights, generated here:
no downloads), numpy vs onnxruntime engine, time per trial split into generation and KL.

    python scripts/bench_search.py [--trials 2] [--prompts 64] [--tokens 64] [--engines numpy,onnx]
    python scripts/bench_search.py --peer --trials 8 --tokens 48 --work bench-out/peer   # vs heretic

The model has SmolLM-135M's shape (llama, d_model 576, 30 blocks, 9 heads / 3 kv heads, MLP 1536,
vocab 49152, tied embeddings). Random weights never say a marker, so no completion stops early:
every trial generates prompts x tokens rows, the worst case for the search. The tokenizer is a word
level one over the model's vocabulary ("w0" .. "w49151"); prompts are 24-40 random words.
The peer (measured on this machine, 135M model, 200 prompts x 48 tokens + 100 KL prompts):
~55-60 s per trial, ~60 trials/hour. Its work per trial is 9600 generated rows vs 4096 here at
64 x 64; `--prompts 200 --tokens 48` reproduces its counts.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from patcher.io.writer import OutTensor, write_safetensors

SHAPE = dict(d=576, layers=30, heads=9, kv=3, inter=1536, vocab=49152)


def make_model(folder: Path, shape=SHAPE, seed=0, fast: bool = False) -> Path:
    """A llama checkpoint of this shape with random bf16 weights. `fast`: random bit patterns of
    uniform magnitude (~std) instead of normal draws (an 8B-shaped checkpoint in minutes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    d, L, H, K, I, V = (shape[k] for k in ("d", "layers", "heads", "kv", "inter", "vocab"))
    tied = shape.get("tied", True)
    hd = d // H
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": ((V, d), 1.0), "model.norm.weight": ((d,), None)}
    for l in range(L):
        p = f"model.layers.{l}."
        for name, shp in (
            ("self_attn.q_proj", (H * hd, d)),
            ("self_attn.k_proj", (K * hd, d)),
            ("self_attn.v_proj", (K * hd, d)),
            ("self_attn.o_proj", (d, H * hd)),
            ("mlp.gate_proj", (I, d)),
            ("mlp.up_proj", (I, d)),
            ("mlp.down_proj", (d, I)),
        ):
            shapes[p + name + ".weight"] = (shp, 1 / np.sqrt(shp[1]))
        shapes[p + "input_layernorm.weight"] = ((d,), None)
        shapes[p + "post_attention_layernorm.weight"] = ((d,), None)
    if not tied:
        shapes["lm_head.weight"] = ((V, d), 1 / np.sqrt(d))
    # made as the writer asks (in this order): a checkpoint larger than memory never is in memory at once
    make = _fast_bf16 if fast else lambda rng, shp, std: _bf16(rng.normal(0, std, shp))
    write_safetensors(
        folder / "model.safetensors",
        [
            OutTensor(
                n,
                "BF16",
                shp,
                produce=lambda shp=shp, std=std: [
                    _bf16(np.ones(shp)) if std is None else make(rng, shp, std)
                ],
            )
            for n, (shp, std) in shapes.items()
        ],
        {"format": "pt"},
    )
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": I,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": K,
        "head_dim": hd,
        "vocab_size": V,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )
    return folder


def _fast_bf16(rng, shape, std: float) -> np.ndarray:
    """Random sign and mantissa, exponent of `std`: values uniform in magnitude over [std/2, std)."""
    import ml_dtypes

    exponent = (
        int(np.floor(np.log2(std))) + 127
    )  # bf16 = float32's top 16 bits: 1 sign, 8 exponent, 7 mantissa
    bits = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), np.uint16) & np.uint16(0x807F)
    bits = bits | np.uint16((exponent - 1) << 7)
    return bits.reshape(shape).view(ml_dtypes.bfloat16)


def _bf16(a):
    import ml_dtypes

    return a.astype(np.float32).astype(ml_dtypes.bfloat16)


def prompt_file(path: Path, n: int, seed: int, vocab: int) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text(
        "\n".join(" ".join(f"w{w}" for w in rng.integers(3, vocab, rng.integers(24, 41))) for _ in range(n))
        + "\n"
    )
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-out/search"))
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--kl-prompts", type=int, default=None, help="default: --prompts")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--engines", default="numpy,onnx")
    ap.add_argument("--blas-threads", type=int, default=None)
    ap.add_argument("--skip-fixture", action="store_true", help="skip the time-to-Pareto-point run")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_peer

    bench_peer.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.peer:  # the real model against the peer (scripts/bench_peer.py)
        return bench_peer.main(args)
    os.environ.setdefault("PATCHER_CACHE", str(args.work.resolve() / "cache"))
    from patcher.search import run as sr

    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / "model-135m")
    from patcher.io.checkpoint import Checkpoint

    with Checkpoint(model) as ck:
        n_params = sum(int(np.prod(t.shape)) for t in ck.tensors.values())
    pos = prompt_file(args.work / "pos.txt", args.prompts, 1, SHAPE["vocab"])
    neg = prompt_file(args.work / "neg.txt", args.kl_prompts or args.prompts, 2, SHAPE["vocab"])
    rows = []
    limits = None
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=args.blas_threads, user_api="blas")
    for engine in args.engines.split(","):
        t0 = time.perf_counter()
        dirs = args.work / "dirs.safetensors"  # extracted once, reused by every engine and run
        s = sr.setup(
            model,
            pos,
            neg,
            directions=dirs if dirs.is_file() else None,
            directions_out=dirs,
            engine=engine,
            tokens=args.tokens,
            batch_size=args.batch_size,
            chat_template=False,
        )
        t_setup = time.perf_counter() - t0
        c0 = time.process_time()
        ref = s.evaluator.reference()
        ref_cpu = time.process_time() - c0
        rng = np.random.default_rng(0)
        gen, kl, total, cpu = [], [], [], []
        for _ in range(args.trials):
            params = sp_random(rng, s)
            t1, c1 = time.perf_counter(), time.process_time()
            r = s.evaluate(params)
            total.append(time.perf_counter() - t1)
            cpu.append(time.process_time() - c1)
            gen.append(r.timing.generate)
            kl.append(r.timing.kl)
        row = {
            "engine": engine,
            "params_M": round(n_params / 1e6, 1),
            "prompts": args.prompts,
            "tokens": args.tokens,
            "setup_s": round(t_setup, 1),
            "reference_s": round(ref["seconds"], 1),
            "trial_s": round(float(np.median(total)), 2),
            "generate_s": round(float(np.median(gen)), 2),
            "kl_s": round(float(np.median(kl)), 2),
            "trials_per_hour": round(3600 / float(np.median(total)), 1),
            "trial_cpu_s": round(float(np.median(cpu)), 2),
            "reference_cpu_s": round(ref_cpu, 1),
            "blas_threads": args.blas_threads,
            "load_avg": round(os.getloadavg()[0], 1),
            "cores": os.cpu_count(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del s
    if not args.skip_fixture:
        rows.append(time_to_point(args.work))
        print(json.dumps(rows[-1]), flush=True)
    if limits is not None:
        limits.restore_original_limits()
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


def time_to_point(work: Path, trials: int = 60, rate: float = 0.05, kl: float = 1e-3) -> dict:
    """Wall time until a search on the planted fixture (scripts/make_search_fixture.py) first holds a
    trial at marker rate <= rate and KL <= kl, on prompts extraction never saw."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_search_fixture as msf

    from patcher.search import run as sr
    from patcher.search import study as st

    model = msf.make(work / "fixture")
    P = work / "fixture" / "prompts"
    t0 = time.perf_counter()
    s = sr.setup(
        model,
        P / "refusal-train-positive.txt",
        P / "refusal-train-negative.txt",
        eval_positive=P / "refusal-eval-positive.txt",
        eval_negative=P / "refusal-eval-negative.txt",
        directions_out=work / "fixture" / "dirs.safetensors",
        chat_template=False,
    )
    db = work / "fixture" / "study.db"
    db.unlink(missing_ok=True)
    study = st.open_study(db, s.attrs, seed=0, startup=20)
    s.evaluator.reference()
    hit = {}

    def on_trial(t):
        if not hit and t.values and t.values[0] <= rate and t.values[1] <= kl:
            hit.update(trial=t.number, seconds=round(time.perf_counter() - t0, 1))

    st.optimize(study, s.run_trial, trials, None, 1, on_trial)
    return {
        "fixture": msf.NAME,
        "target": {"marker_rate": rate, "kl": kl},
        "reached": hit or None,
        "trials": trials,
        "total_s": round(time.perf_counter() - t0, 1),
    }


def sp_random(rng, s) -> dict:
    """A random point of the default space (what the search's start-up phase evaluates)."""
    from patcher.search import space as sp

    out = {}
    for p in s.space.values():
        if p.when is not None and out.get(p.when[0]) != p.when[1]:
            continue
        if p.fixed is not None:
            out[p.name] = p.fixed
        elif p.kind == "float":
            out[p.name] = float(rng.uniform(p.low, p.high))
        else:
            out[p.name] = p.choices[int(rng.integers(len(p.choices)))]
    return sp.complete(out, {})


if __name__ == "__main__":
    main()
