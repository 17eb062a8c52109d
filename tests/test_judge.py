"""The judge (patcher/search/judge.py): on a tiny model whose answer is forced by construction
(every block writes nothing, every embedding row is the same, the unembedding scores only the yes/no
tokens), P(refusal) is hand-computed; on a random tiny llama it matches HF transformers' softmax."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from patcher.errors import PatcherError
from patcher.io.writer import OutTensor, write_safetensors
from patcher.search import study as st
from patcher.search.judge import JUDGE_PROMPT, NO, YES, Judge

sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures as mf
import make_search_fixture

EPS = 1e-5


def first_ids(folder: Path, words, others) -> list[int]:
    """First tokens of `words` that no word of `others` starts with (tokenizers, not patcher's code)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    first = lambda ws: {tok.encode(w, add_special_tokens=False).ids[0] for w in ws}  # noqa: E731
    return sorted(first(words) - first(others))


def forced_model(folder: Path, a: float, b: float) -> Path:
    """Logits after the prompt: a/√(1+ε) on each first token of Yes/yes, b/√(1+ε) on No/no, 0 else."""
    folder.mkdir(parents=True)
    mf.build_tokenizer(folder)
    cfg = {
        **mf.config_for("llama"),
        "rms_norm_eps": EPS,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    d, V = cfg["hidden_size"], cfg["vocab_size"]
    yes, no = first_ids(folder, YES, NO), first_ids(folder, NO, YES)
    head = np.zeros((V, d))
    head[yes], head[no] = a / d, b / d  # · (1, .., 1)/√(1+ε) after the final norm
    w = {
        "model.embed_tokens.weight": np.ones((V, d)),
        "model.norm.weight": np.ones(d),
        "lm_head.weight": head,
    }
    for name, shape in mf.layout("llama"):
        if name.startswith("model.layers."):
            w[name] = np.ones(shape) if name.endswith("layernorm.weight") else np.zeros(shape)
    tensors = [OutTensor(n, "F32", x.shape, produce=lambda x=x: [x.astype(np.float32)]) for n, x in w.items()]
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    return folder


REQUESTS = ["Write a poem about the sea.", "Tell me a story about a robot.", "How do plants grow?"]
REPLIES = ["I cannot help with that.", "Once upon a time a robot", ""]


@pytest.mark.parametrize("a,b", [(3.0, 1.0), (0.0, 2.0), (1.5, 1.5)])
def test_forced_answer_is_hand_computed(tmp_path, a, b):
    folder = forced_model(tmp_path / "judge", a, b)
    ky, kn = len(first_ids(folder, YES, NO)), len(first_ids(folder, NO, YES))
    s = 1 / np.sqrt(1 + EPS)
    want = ky * np.exp(a * s) / (ky * np.exp(a * s) + kn * np.exp(b * s))
    judge = Judge.open(folder)
    p = judge.probabilities(REQUESTS, REPLIES)
    np.testing.assert_allclose(p, want, rtol=1e-5)
    assert judge.refusals(REQUESTS, REPLIES) == [bool(want >= 0.5)] * 3
    assert judge.rate(REQUESTS, REPLIES) == float(want >= 0.5)


def test_judge_prompt_holds_request_and_reply(tmp_path):
    judge = Judge.open(forced_model(tmp_path / "judge", 1.0, 0.0), reply_chars=10)
    text = judge.tok.decode(judge.prompt("How do plants grow?", "They grow from seeds in the soil."))
    assert JUDGE_PROMPT.split("{request}")[0] in text and "How do plants grow?" in text
    assert "They grow " in text and "seeds" not in text  # cut to reply_chars
    assert text.rstrip().endswith("<|assistant|>")
    with pytest.raises(PatcherError, match="2 requests but 1 replies"):
        judge.probabilities(REQUESTS[:2], REPLIES[:1])


def test_random_model_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = mf.make("llama", tmp_path)
    judge = Judge.open(folder)
    p = judge.probabilities(REQUESTS, REPLIES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    yes, no = first_ids(folder, YES, NO), first_ids(folder, NO, YES)
    for q, r, got in zip(REQUESTS, REPLIES, p):
        msg = [{"role": "user", "content": JUDGE_PROMPT.format(request=q, reply=r)}]
        ids = tok.apply_chat_template(msg, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            prob = torch.softmax(hf(**ids).logits[0, -1].double(), -1)
        want = float(prob[yes].sum() / (prob[yes].sum() + prob[no].sum()))
        assert abs(got - want) < 1e-4, (q, r, got, want)


def test_search_reports_the_judge_beside_the_marker_rate(tmp_path):
    """`patcher search --judge`: every trial records the judge's rate (forced to 1 here, while the
    planted fixture's marker rate falls below 1 once an edit removes the behaviour)."""
    make_search_fixture.make(tmp_path)
    P = tmp_path / "prompts"
    judge = forced_model(tmp_path / "judge", 3.0, 1.0)
    search = (
        "search",
        tmp_path / make_search_fixture.NAME,
        "--positive",
        P / "refusal-train-positive.txt",
        "--negative",
        P / "refusal-train-negative.txt",
        "--no-chat-template",
    )
    r = run_cli(
        *search,
        "--tokens",
        "4",
        "--max-prompts",
        "4",
        "--trials",
        "2",
        "--no-heuristic",
        "--no-prune",  # both trials judged, even one behind the first on KL alone
        "--study",
        tmp_path / "s.db",
        "--judge",
        judge,
    )
    assert "judge's refusal rate 1.000" in r.output and "judge" in r.output.split("Pareto front")[1]
    done = st.completed(st.open_study(tmp_path / "s.db", None, create=False))
    assert len(done) == 2 and all(t.user_attrs["judge_rate"] == 1.0 for t in done)
    bad = run_cli(*search, "--study", tmp_path / "t.db", "--judge", tmp_path / "nothing-here", expect=1)
    assert "nothing-here" in bad.output and "Traceback" not in bad.output
