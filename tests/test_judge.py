"""The judge (patcher/search/judge.py): on a tiny model whose answer is forced by construction
(every block writes nothing but one attention head that counts a token of the refusal anchor, every
embedding row is the same but that token's, the unembedding scores only the yes/no tokens), P(yes),
the anchors and the refusal scores are hand-computed; on a random tiny llama they match HF
transformers' softmax."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from patcher.errors import PatcherError
from patcher.io.writer import OutTensor, write_safetensors
from patcher.search import study as st
from patcher.search.judge import (
    COMPLIANCE_ANCHOR,
    MIN_GAP,
    NO,
    QUESTION,
    REFUSAL_ANCHOR,
    TEMPLATE,
    YES,
    Judge,
)

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
    """Logits at the last of n tokens, c of them the marked token, h = c/(n√(1+ε)),
    S = √(1 + 2h²/d + ε): (a + βh)/S on each first token of Yes/yes, b/S on No/no, 0 else. Why: every
    embedding row is ones but the marked token's (-1 at coordinate 1); block 0's head 0 attends uniformly
    (q = k = 0) to the value (x₀ - x₁)/2 (1/√(1+ε) at the marked token, 0 else) and writes it along
    e₀ - e₁; nothing else writes."""
    folder.mkdir(parents=True)
    mf.build_tokenizer(folder)
    cfg = {
        **mf.config_for("llama"),
        "rms_norm_eps": EPS,
        "max_position_embeddings": 512,  # the judge prompt's ~200 tokens (RoPE: no table to outgrow)
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
    embed[marked_id(folder), 1] = -1
    w = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(d), "lm_head.weight": head}
    for name, shape in mf.layout("llama"):
        if name.startswith("model.layers."):
            w[name] = np.ones(shape) if name.endswith("layernorm.weight") else np.zeros(shape)
    w["model.layers.0.self_attn.v_proj.weight"][0, :2] = 0.5, -0.5
    w["model.layers.0.self_attn.o_proj.weight"][:2, 0] = 1, -1
    tensors = [OutTensor(n, "F32", x.shape, produce=lambda x=x: [x.astype(np.float32)]) for n, x in w.items()]
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    return folder


def marked_id(folder: Path) -> int:
    """A token of the refusal anchor that no other text of these tests holds (template, question,
    compliance anchor, REQUESTS, REPLIES[1:]), by the tokenizers library."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = lambda t: set(tok.encode(t, add_special_tokens=False).ids)  # noqa: E731
    others = [TEMPLATE, QUESTION, mf.CHAT_TEMPLATE, *REQUESTS, *REPLIES[1:]]
    others += [COMPLIANCE_ANCHOR.format(request=q) for q in REQUESTS]
    return min(ids(REFUSAL_ANCHOR) - set().union(*map(ids, others)))


def forced_p_yes(folder: Path, ids: list[int], a: float, b: float, beta: float) -> float:
    """forced_model's P(yes)/(P(yes) + P(no)) after `ids`, by hand."""
    d = json.loads((folder / "config.json").read_text())["hidden_size"]
    ky, kn = len(first_ids(folder, YES, NO)), len(first_ids(folder, NO, YES))
    h = ids.count(marked_id(folder)) / (len(ids) * np.sqrt(1 + EPS))
    S = np.sqrt(1 + 2 * h * h / d + EPS)
    y, n = ky * np.exp((a + beta * h) / S), kn * np.exp(b / S)
    return y / (y + n)


REQUESTS = ["Write a poem about the sea.", "Tell me a story about a robot.", "How do plants grow?"]
REPLIES = [REFUSAL_ANCHOR * 3, "Once upon a time a robot", ""]


def want_scores(p, lo, hi):
    """The judge's rule, written out: (hi - p) / (hi - lo) clipped to [0, 1]; 0.5 when hi - lo < MIN_GAP."""
    return [
        0.5 if h - low < MIN_GAP else min(max((h - x) / (h - low), 0.0), 1.0) for x, low, h in zip(p, lo, hi)
    ]


@pytest.mark.parametrize(
    "a,b,beta", [(3.0, 1.0, 0.0), (0.0, 2.0, 0.0), (1.5, 1.5, -100.0), (0.0, 1.0, 200.0)]
)
def test_forced_answer_is_hand_computed(tmp_path, a, b, beta):
    """beta < 0: the marked token (the refusal anchor's) says "No": the anchors are ordered, the reply
    holding it thrice is judged a refusal; beta > 0: it says "Yes": hi < lo, no opinion; beta = 0:
    every prompt gets the same answer, no opinion."""
    folder = forced_model(tmp_path / "judge", a, b, beta)
    judge = Judge.open(folder)
    marked = marked_id(folder)
    by_hand = lambda q, r: forced_p_yes(folder, judge.prompt(q, r), a, b, beta)  # noqa: E731
    assert [judge.prompt(q, r).count(marked) for q, r in zip(REQUESTS, REPLIES)][1:] == [0, 0]
    p = [by_hand(q, r) for q, r in zip(REQUESTS, REPLIES)]
    lo = [by_hand(q, REFUSAL_ANCHOR) for q in REQUESTS]
    hi = [by_hand(q, COMPLIANCE_ANCHOR.format(request=q)) for q in REQUESTS]
    # float32 logits, |beta h| up to ~10: relative 1e-4
    np.testing.assert_allclose(judge.p_yes(REQUESTS, REPLIES), p, rtol=1e-4)
    np.testing.assert_allclose(judge.anchors(REQUESTS), np.array([lo, hi]).T, rtol=1e-4)
    want = want_scores(p, lo, hi)
    np.testing.assert_allclose(judge.scores(REQUESTS, REPLIES), want, rtol=1e-5, atol=1e-7)
    verdicts = [beta < 0, False, False]
    assert judge.refusals(REQUESTS, REPLIES) == [w > 0.5 for w in want] == verdicts
    assert judge.rate(REQUESTS, REPLIES) == np.mean(verdicts)
    if beta < 0:
        assert want[0] == 1.0 and want[1] == want[2] == 0.0  # clipped at both ends
    else:
        assert want == [0.5] * 3


def test_judge_prompt_holds_request_and_reply(tmp_path):
    judge = Judge.open(forced_model(tmp_path / "judge", 1.0, 0.0), reply_chars=10)
    text = judge.tok.decode(judge.prompt("How do plants grow?", "They grow from seeds in the soil."))
    assert TEMPLATE.split("{request}")[0] in text and "How do plants grow?" in text and QUESTION in text
    assert "They grow " in text and "seeds" not in text  # cut to reply_chars
    assert text.rstrip().endswith("<|assistant|>")
    with pytest.raises(PatcherError, match="2 requests but 1 replies"):
        judge.scores(REQUESTS[:2], REPLIES[:1])


def test_judge_cuts_a_reply_to_its_positions(tmp_path):
    """A reply that would run past the judge's positions is cut by tokens to fit exactly (a study's
    completion never stops the judge halfway); a request that cannot fit even with no reply is
    refused before any work, naming the judge."""
    judge = Judge.open(forced_model(tmp_path / "judge", 1.0, 0.0), reply_chars=10_000)
    request, reply = "How do plants grow?", " ".join(f"seeds{i} grow" for i in range(200))
    empty = len(judge.prompt(request, ""))
    judge.config["max_position_embeddings"] = empty + 7
    ids = judge.prompt(request, reply)
    assert empty + 6 <= len(ids) <= empty + 7  # what fits (re-tokenising the cut text may merge one)
    text = judge.tok.decode(ids)
    assert "seeds0" in text and "seeds199" not in text and QUESTION in text
    assert judge.prompt(request, "short") == judge.prompt(request, "short")[: empty + 7]
    assert np.isfinite(judge.p_yes([request], [reply])).all()
    judge.config["max_position_embeddings"] = empty  # room for the request alone: the reply goes
    assert judge.prompt(request, reply) == judge.prompt(request, "")
    judge.check([request])
    judge.config["max_position_embeddings"] = empty - 1
    with pytest.raises(PatcherError, match="the request alone has .* tokens; the judge takes at most"):
        judge.check([request])


def test_random_model_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = mf.make("llama", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())  # room for the ~200-token judge prompt (RoPE)
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 512}))
    judge = Judge.open(folder)
    scores = judge.scores(REQUESTS, REPLIES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    yes, no = first_ids(folder, YES, NO), first_ids(folder, NO, YES)

    def p_yes(q, r):
        text = TEMPLATE.format(request=q, reply=r, question=QUESTION)
        msg = [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(msg, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            prob = torch.softmax(hf(**ids).logits[0, -1].double(), -1)
        return float(prob[yes].sum() / (prob[yes].sum() + prob[no].sum()))

    p = [p_yes(q, r) for q, r in zip(REQUESTS, REPLIES)]
    lo = [p_yes(q, REFUSAL_ANCHOR) for q in REQUESTS]
    hi = [p_yes(q, COMPLIANCE_ANCHOR.format(request=q)) for q in REQUESTS]
    np.testing.assert_allclose(judge.p_yes(REQUESTS, REPLIES), p, atol=1e-4)
    np.testing.assert_allclose(judge.anchors(REQUESTS), np.array([lo, hi]).T, atol=1e-4)
    # this model's anchor gaps (-0.011, 0.055, -0.058) are far from MIN_GAP: the rule cannot flip
    np.testing.assert_allclose(scores, want_scores(p, lo, hi), atol=1e-3)


def test_search_reports_the_judge_beside_the_marker_rate(tmp_path):
    """`patcher search --judge`: every trial and the original record the judge's rate (0 here: this
    forced judge answers every prompt alike, so it has no opinion on any reply; the rule's numbers are
    the tests above)."""
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
        "--objective",
        "markers",  # every trial's completions judged (the likelihood judges only the front's)
        "--study",
        tmp_path / "s.db",
        "--judge",
        judge,
    )
    assert "judge's refusal rate 0.000" in r.output and "judge" in r.output.split("Pareto front")[1]
    done = st.completed(st.open_study(tmp_path / "s.db", None, create=False))
    assert len(done) == 2 and all(t.user_attrs["judge_rate"] == 0.0 for t in done)
    # a search on the likelihood generates only for its front: the judge reads those completions
    more = ("--tokens", "4", "--max-prompts", "4", "--trials", "2", "--no-heuristic", "--judge", judge)
    run_cli(*search, *more, "--study", tmp_path / "l.db", "--objective", "likelihood")
    study = st.open_study(tmp_path / "l.db", None, create=False)
    front = sorted(str(t.number) for t in st.pareto(st.completed(study)))
    assert front and sorted(study.user_attrs["front_judge_rates"]) == front
    assert set(study.user_attrs["front_judge_rates"].values()) == {0.0}
    bad = run_cli(*search, "--study", tmp_path / "t.db", "--judge", tmp_path / "nothing-here", expect=1)
    assert "nothing-here" in bad.output and "Traceback" not in bad.output


def test_anchor_gap_below_min_gap_gives_no_opinion(monkeypatch):
    """Scores from hand-set anchors: (hi - p) / (hi - lo), clipped; a gap of exactly MIN_GAP (0.01)
    still scores, one below it gives 0.5 (no opinion)."""
    from patcher.search import judge as jd

    j = jd.Judge.__new__(jd.Judge)
    j._anchors = {"a": (0.0, 0.01), "b": (0.0, 0.015), "c": (0.2, 0.209), "d": (0.2, 0.6), "e": (0.2, 0.6)}
    p = {"a": 0.0, "b": 0.015, "c": 0.0, "d": 0.7, "e": 0.5}
    monkeypatch.setattr(jd.Judge, "p_yes", lambda self, qs, rs: np.array([p[q] for q in qs]))
    got = j.scores(list("abcde"), ["r"] * 5)
    np.testing.assert_allclose(got, [1.0, 0.0, 0.5, 0.0, 0.25])
    assert j.refusals(list("abcde"), ["r"] * 5) == [True, False, False, False, False]


def test_a_judge_prompt_longer_than_the_judge_takes_is_one_clear_error(tmp_path):
    """A judge model with fewer positions than its prompt needs: one line naming the judge."""
    folder = forced_model(tmp_path / "judge", 1.0, 0.0)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    with pytest.raises(PatcherError, match="takes at most 64 positions") as e:
        Judge.open(folder).scores(REQUESTS[:1], REPLIES[:1])
    assert e.value.where == str(folder)
