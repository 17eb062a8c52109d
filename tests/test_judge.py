"""The judge (patcher/search/judge.py): on a tiny model whose answer is forced by construction
(every block writes nothing but one attention head that counts commas, every embedding row is the same
but the comma's, the unembedding scores only the yes/no tokens), P(yes) per question and P(refusal) are
hand-computed; on a random tiny llama both questions and their combination match HF transformers."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from patcher.errors import PatcherError
from patcher.io.writer import OutTensor, write_safetensors
from patcher.search import study as st
from patcher.search.judge import NO, QUESTIONS, TEMPLATE, YES, Judge

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


def forced_model(folder: Path, a: float, b: float, beta: float = 0.0) -> Path:
    """Logits at the last of n tokens, c of them commas, h = c/(n√(1+ε)), S = √(1 + 2h²/d + ε):
    (a + βh)/S on each first token of Yes/yes, b/S on No/no, 0 else. Why: every embedding row is ones
    but the comma's (-1 at coordinate 1); block 0's head 0 attends uniformly (q = k = 0) to the value
    (x₀ - x₁)/2 (1/√(1+ε) at a comma, 0 else) and writes it along e₀ - e₁; nothing else writes."""
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
    head[yes, 0], head[yes, 1] = head[yes, 0] + beta / 2, head[yes, 1] - beta / 2
    embed = np.ones((V, d))
    embed[comma_id(folder), 1] = -1
    w = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(d), "lm_head.weight": head}
    for name, shape in mf.layout("llama"):
        if name.startswith("model.layers."):
            w[name] = np.ones(shape) if name.endswith("layernorm.weight") else np.zeros(shape)
    w["model.layers.0.self_attn.v_proj.weight"][0, :2] = 0.5, -0.5
    w["model.layers.0.self_attn.o_proj.weight"][:2, 0] = 1, -1
    tensors = [OutTensor(n, "F32", x.shape, produce=lambda x=x: [x.astype(np.float32)]) for n, x in w.items()]
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    return folder


def comma_id(folder: Path) -> int:
    from tokenizers import Tokenizer

    (i,) = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(",", add_special_tokens=False).ids
    return i


def forced_p_yes(folder: Path, ids: list[int], a: float, b: float, beta: float) -> float:
    """forced_model's P(yes)/(P(yes) + P(no)) after `ids`, by hand."""
    d = json.loads((folder / "config.json").read_text())["hidden_size"]
    ky, kn = len(first_ids(folder, YES, NO)), len(first_ids(folder, NO, YES))
    h = ids.count(comma_id(folder)) / (len(ids) * np.sqrt(1 + EPS))
    S = np.sqrt(1 + 2 * h * h / d + EPS)
    y, n = ky * np.exp((a + beta * h) / S), kn * np.exp(b / S)
    return y / (y + n)


REQUESTS = ["Write a poem about the sea.", "Tell me a story about a robot.", "How do plants grow?"]
REPLIES = ["I cannot help with that.", "Once upon a time a robot", ""]


@pytest.mark.parametrize(
    "a,b,beta", [(3.0, 1.0, 0.0), (0.0, 2.0, 0.0), (1.5, 1.5, 300.0), (0.0, 1.0, -200.0)]
)
def test_forced_answer_is_hand_computed(tmp_path, a, b, beta):
    folder = forced_model(tmp_path / "judge", a, b, beta)
    judge = Judge.open(folder)
    (refuses, yes_refuses), (complies, yes_complies) = QUESTIONS
    assert (yes_refuses, yes_complies) == ("yes", "no")
    want = {}
    for q in (refuses, complies):
        ids = [judge.prompt(x, r, q) for x, r in zip(REQUESTS, REPLIES)]
        assert [i.count(comma_id(folder)) for i in ids] == [int(q == refuses)] * 3  # the comma is Q1's
        want[q] = np.array([forced_p_yes(folder, i, a, b, beta) for i in ids])
        np.testing.assert_allclose(judge.p_yes(REQUESTS, REPLIES, q), want[q], rtol=1e-5)
    p = (want[refuses] + 1 - want[complies]) / 2
    np.testing.assert_allclose(judge.probabilities(REQUESTS, REPLIES), p, rtol=1e-5, atol=1e-7)
    if beta == 0:  # a judge that answers both questions alike has no opinion (the comma still moves S)
        np.testing.assert_allclose(p, 0.5, atol=1e-6)
    else:
        assert judge.refusals(REQUESTS, REPLIES) == list(p >= 0.5) == [beta > 0] * 3
        assert judge.rate(REQUESTS, REPLIES) == float(beta > 0)


def test_judge_prompt_holds_request_and_reply(tmp_path):
    judge = Judge.open(forced_model(tmp_path / "judge", 1.0, 0.0), reply_chars=10)
    for q, _ in QUESTIONS:
        text = judge.tok.decode(judge.prompt("How do plants grow?", "They grow from seeds in the soil.", q))
        assert TEMPLATE.split("{request}")[0] in text and "How do plants grow?" in text and q in text
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
    p_yes = {q: judge.p_yes(REQUESTS, REPLIES, q) for q, _ in QUESTIONS}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    yes, no = first_ids(folder, YES, NO), first_ids(folder, NO, YES)
    for i, (q, r) in enumerate(zip(REQUESTS, REPLIES)):
        want = {}
        for question, _ in QUESTIONS:
            text = TEMPLATE.format(request=q, reply=r, question=question)
            msg = [{"role": "user", "content": text}]
            ids = tok.apply_chat_template(
                msg, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                prob = torch.softmax(hf(**ids).logits[0, -1].double(), -1)
            want[question] = float(prob[yes].sum() / (prob[yes].sum() + prob[no].sum()))
            assert abs(p_yes[question][i] - want[question]) < 1e-4, (q, r, question)
        (refuses, _), (complies, _) = QUESTIONS
        assert abs(p[i] - (want[refuses] + 1 - want[complies]) / 2) < 1e-4, (q, r)


def test_search_reports_the_judge_beside_the_marker_rate(tmp_path):
    """`patcher search --judge`: every trial records the judge's rate (forced to 1 here: the refusal
    question holds one comma more than the compliance one, while the planted fixture's marker rate falls
    below 1 once an edit removes the behaviour)."""
    make_search_fixture.make(tmp_path)
    P = tmp_path / "prompts"
    judge = forced_model(tmp_path / "judge", 0.0, 0.0, 1000.0)
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
