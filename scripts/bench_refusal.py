"""How often a real chat model refuses: the original's marker rate on the first `--prompts` harmful
test prompts (scripts/prompt_sets.py) over `--tokens` greedy tokens, with patcher's own evaluator
(numpy engine, the model's chat template, the bench system prompt), plus prefill and decode time.

    python scripts/bench_refusal.py HF_FOLDER [--prompts 48] [--tokens 48] [--samples 3]
    python scripts/bench_refusal.py HF_FOLDER --turns gemma   # a folder without a chat template

`--turns gemma` renders Gemma's turn markup by hand (for a GGUF that ships no chat template, such
as the base gemma-3-270m): `<bos><start_of_turn>user\\n{system}\\n\\n{prompt}<end_of_turn>\\n
<start_of_turn>model\\n`, as Gemma 3's own template folds the system prompt into the first user turn.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
SYSTEM = "You are a helpful assistant."
TURNS = {"gemma": "<bos><start_of_turn>user\n{system}\n\n{prompt}<end_of_turn>\n<start_of_turn>model\n"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="HF folder (e.g. from `patcher convert FILE.gguf -o DIR`)")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--full", action="store_true", help="refusals run all --tokens too (slower; whole texts)")
    ap.add_argument("--turns", choices=sorted(TURNS), default=None, help="hand-rendered chat turns")
    args = ap.parse_args(argv)
    import prompt_sets

    from patcher.model.execution import StreamedModel
    from patcher.model.opened import Model
    from patcher.model.prompts import encode_prompts, read_prompt_file
    from patcher.onnx.verify import stop_tokens
    from patcher.search.engine import ResidentModel
    from patcher.search.objectives import Evaluator, hits

    prompts = read_prompt_file(prompt_sets.ensure()["harmful-test"], args.prompts)
    ck = Model.open(args.model)
    tok = ck.tokenizer()
    if args.turns:
        turns = TURNS[args.turns]
        ids = [tok.encode(turns.format(system=SYSTEM, prompt=p), add_special_tokens=False) for p in prompts]
    else:
        ids = encode_prompts(tok, prompts, chat_template=True, system=SYSTEM)
    engine = ResidentModel(StreamedModel(ck))
    ev = Evaluator(
        engine,
        tok,
        ids,
        ids[:1],
        tokens=args.tokens,
        eos=stop_tokens(ck.folder, tok),
        batch_size=args.batch_size,
    )
    first = ids[: args.batch_size]
    n_prompt = sum(len(i) for i in first)
    t0 = time.perf_counter()
    ev.generate(first, None, 1, stop_on_marker=False)  # prefill (and one step) of one batch alone
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a row leaves the batch at its first marker: the rate is that of the full completions
    comps, steps = ev.generate(ids, None, args.tokens, stop_on_marker=not args.full)
    total = time.perf_counter() - t0
    texts = ev.texts(comps)
    refused = [hits(t, ev.markers) for t in texts]
    out = {
        "model": str(args.model),
        "prompts": len(ids),
        "tokens": args.tokens,
        "marker_rate": sum(refused) / len(refused),
        "prompt_tokens": n_prompt,
        "s_per_prompt_token": prefill / n_prompt,
        "s_per_generated_token": total / max(steps, 1),  # prefill included: an upper bound
        "seconds": round(prefill + total, 1),
        "samples": [{"prompt": p, "refused": r, "reply": t} for p, r, t in zip(prompts, refused, texts)][
            : args.samples
        ],
        "refusals": [t for t, r in zip(texts, refused) if r][: args.samples],
    }
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return out


if __name__ == "__main__":
    main()
