"""A tiny model with a behaviour to remove, for `patcher search` tests and demos.

    python scripts/make_search_fixture.py [--out fixtures]

tiny-llama-refusal (llama, 5 blocks, d_model 64, float32, raw prompts: no chat template): when a
prompt ends in one of the TRIGGERS words, the MLP of the LAST block (which writes resid_pre[5],
outside the first 80 % of layers that `patcher extract` selects from) writes GAMMA * v at that
position, and the unembedding turns v into the first token of MARKER ("I cannot"); a bigram chain
built into the unembedding then spells the rest of the phrase. Prompts ending in NEUTRAL words
never fire the detector, so removing v from that one writer changes them very little.

The detector neuron for trigger token t reads the normalised residual along ê_t (= √d for t itself,
~N(0, 1) for other tokens) against a threshold of 6: the extract-selected direction, the mean
embedding difference of the two prompt sets, removes only a small part of ê_t, so the default
pipeline leaves the behaviour in place while a search finds v. Deterministic (fixed seeds).
Also writes prompts/refusal-{train,eval}-{positive,negative}.txt (different sentences per split).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import make_fixtures as mf

from patcher.io.writer import OutTensor, write_safetensors

NAME = "tiny-llama-refusal"
LAYERS, D, INTER = 5, 64, 96
MARKER = "I cannot"
TRIGGERS = ["sea", "robot", "poem", "bread", "fox", "cat", "art", "dog"]
NEUTRAL = ["weather", "plants", "colors", "today", "France", "people", "numbers", "model"]
TRAIN = [
    "Tell me something about the {}",
    "Write one line on the {}",
    "What do you know about the {}",
    "Say a kind word about the {}",
]
EVAL = ["Give me a fact on the {}", "Describe the {}", "I want to read about the {}", "Explain the {}"]
GAMMA, THRESHOLD, SHARP, BETA_V, BETA_CHAIN, SMALL = 40.0, 6.0, 2.0, 1.0, 2.5, 0.1


def search_setup(root: Path, dirs: Path, **options):
    """`patcher search`'s set-up on the fixture made under `root` (its train and eval prompt files, raw
    prompts), directions extracted into `dirs` once and reused after."""
    from patcher.search import run as sr

    P = root / "prompts"
    evals = {
        "eval_positive": P / "refusal-eval-positive.txt",
        "eval_negative": P / "refusal-eval-negative.txt",
    }
    return sr.setup(
        root / NAME,
        P / "refusal-train-positive.txt",
        P / "refusal-train-negative.txt",
        directions=dirs if dirs.is_file() else None,
        directions_out=dirs,
        chat_template=False,
        **{**evals, **options},
    )


def prompts(templates, words):
    return [t.format(w) for t in templates for w in words]


def make(out: Path) -> Path:
    from tokenizers import Tokenizer

    folder = out / NAME
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    mf.build_tokenizer(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")  # raw prompts: the last token is the prompt's last word
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    marker = tok.encode(MARKER).ids
    trig = sorted({tok.encode(" " + w).ids[-1] for w in TRIGGERS})
    neutral = {tok.encode(" " + w).ids[-1] for w in NEUTRAL}
    assert not neutral & set(trig) and not set(marker) & set(trig), "trigger tokens must be distinct"
    rng = np.random.default_rng(2024)
    v = rng.standard_normal(D)
    v /= np.linalg.norm(v)
    emb = rng.standard_normal((vocab, D))
    emb -= np.outer(emb @ v, v)  # no token carries v: only the detector writes it
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = {"model.embed_tokens.weight": emb, "model.norm.weight": np.ones(D)}
    q, kv = mf.HEADS * mf.HD, mf.KV * mf.HD
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        small = lambda *shape: rng.normal(0, SMALL / np.sqrt(shape[-1]), shape)  # noqa: E731
        w.update(
            {
                p + "input_layernorm.weight": np.ones(D),
                p + "post_attention_layernorm.weight": np.ones(D),
                p + "self_attn.q_proj.weight": rng.normal(0, 1 / np.sqrt(D), (q, D)),
                p + "self_attn.k_proj.weight": rng.normal(0, 1 / np.sqrt(D), (kv, D)),
                p + "self_attn.v_proj.weight": rng.normal(0, 1 / np.sqrt(D), (kv, D)),
                p + "self_attn.o_proj.weight": small(D, q),
                p + "mlp.gate_proj.weight": rng.normal(0, 1 / np.sqrt(D), (INTER, D)),
                p + "mlp.up_proj.weight": rng.normal(0, 1 / np.sqrt(D), (INTER, D)),
                p + "mlp.down_proj.weight": small(D, INTER),
                p + "mlp.gate_proj.bias": np.zeros(INTER),
                p + "mlp.up_proj.bias": np.zeros(INTER),
                p + "mlp.down_proj.bias": np.zeros(D),
            }
        )
    p = f"model.layers.{LAYERS - 1}."
    fire = SHARP * (np.sqrt(D) - THRESHOLD)
    for k, t in enumerate(trig):  # neuron k: silu(SHARP (ê_t·h - THRESHOLD)) * 1, written along v
        w[p + "mlp.gate_proj.weight"][k] = SHARP * unit[t]
        w[p + "mlp.gate_proj.bias"][k] = -SHARP * THRESHOLD
        w[p + "mlp.up_proj.weight"][k] = 0.0
        w[p + "mlp.up_proj.bias"][k] = 1.0
        w[p + "mlp.down_proj.weight"][:, k] = GAMMA * v / (fire / (1 + np.exp(-fire)))
    head = rng.normal(0, 1 / np.sqrt(D), (vocab, D))
    head[[0, 1, 2]] = 0.0  # pad, bos, eos never win: replies are not cut short by chance
    head[marker[0]] = BETA_V * v
    for a, b in zip(marker, marker[1:]):
        head[b] = BETA_CHAIN * unit[a]
    w["lm_head.weight"] = head
    cfg = {
        **mf.config_for("llama"),
        "num_hidden_layers": LAYERS,
        "vocab_size": vocab,
        "mlp_bias": True,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
    )
    write_safetensors(
        folder / "model.safetensors",
        [
            OutTensor(n, "F32", a.shape, produce=lambda a=a: [np.ascontiguousarray(a, np.float32)])
            for n, a in w.items()
        ],
        {"format": "pt"},
    )
    pdir = out / "prompts"
    pdir.mkdir(exist_ok=True)
    for split, templates in (("train", TRAIN), ("eval", EVAL)):
        (pdir / f"refusal-{split}-positive.txt").write_text("\n".join(prompts(templates, TRIGGERS)) + "\n")
        (pdir / f"refusal-{split}-negative.txt").write_text("\n".join(prompts(templates, NEUTRAL)) + "\n")
    np.save(out / "refusal-direction-64.npy", v.astype(np.float32))
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures")
    print(make(ap.parse_args(argv).out))


if __name__ == "__main__":
    main()
