"""`patcher search`: the space, the objectives, the in-forward edit (against the checkpoint
`ablate --from-study` writes, run through the ordinary forward), and a search on a model with a
planted behaviour in a late layer."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, fixture_path, run_cli
from patcher_kernels.codecs import decode

from patcher.errors import PatcherError
from patcher.io.checkpoint import Checkpoint
from patcher.io.writer import OutTensor, write_safetensors
from patcher.model.execution import StreamedModel
from patcher.model.prompts import encode_prompts, left_pad, load_tokenizer, read_prompt_file
from patcher.onnx.verify import greedy_numpy
from patcher.search import space as sp
from patcher.search import study as st
from patcher.search.engine import ResidentModel
from patcher.search.objectives import Evaluator, hits, load_markers, normalize

sys.path.insert(0, str(ROOT / "scripts"))
import make_search_fixture


def fp32_copy(src: Path, dst: Path) -> Path:
    """The fixture in float32 storage, so bf16 rounding of the written edit does not dominate."""
    dst.mkdir(parents=True)
    with Checkpoint(src) as ck:
        for fname in ck.files:
            ts = [
                OutTensor(
                    t.name,
                    "F32",
                    t.shape,
                    produce=lambda a=decode(np.array(ck.array(t.name))).astype(np.float32): [a],
                )
                for t in ck.shard_tensors(fname)
            ]
            write_safetensors(dst / fname, ts, {"format": "pt"})
    for p in Path(src).iterdir():
        if not p.name.endswith(".safetensors"):
            shutil.copyfile(p, dst / p.name)
    return dst


def directions_file(path: Path, L: int, d: int, seed: int = 0) -> Path:
    from patcher.edit.directions import save_directions

    table = np.random.default_rng(seed).standard_normal((L + 1, d)).astype(np.float32)
    Path(path).unlink(missing_ok=True)  # a user's new file, not patcher rewriting its own
    save_directions(path, table, table, table * 0, {"selected_layer": 1})
    return path


def manual_study(path: Path, model: Path, dirs: Path, params: dict, fixed: dict) -> int:
    """A study holding one completed trial with these free parameters (as `patcher search` stores it)."""
    import optuna

    from patcher.io.manifest import folder_identity, sha256_file

    attrs = st.base_attrs(
        model=str(model),
        model_identity=folder_identity(model),
        directions=str(dirs),
        directions_sha256=sha256_file(dirs),
        fixed=fixed,
        untie_embeddings=False,
        space={},
        evaluation={},
    )
    study = st.open_study(path, attrs)
    dist = {
        k: optuna.distributions.CategoricalDistribution(["global", "per_layer"])
        if k == "direction_scope"
        else optuna.distributions.FloatDistribution(0.0, 10.0)
        for k in params
    }
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, values=[0.5, 0.01]))
    return st.completed(study)[0].number


# --- space ---------------------------------------------------------------------------------------


def test_space_narrowing_cli_and_toml(tmp_path):
    space = sp.default_space(24)
    assert (space["direction_index"].low, space["direction_index"].high) == (0.4 * 24, 0.9 * 24)
    assert (space["attn_out_center"].low, space["attn_out_center"].high) == (0.6 * 23, 23.0)
    assert (space["mlp_out_peak"].low, space["mlp_out_width"].high) == (0.8, 0.6 * 23)
    assert space["embed"].fixed is False and space["norm_preserve"].fixed == "none"
    sp.parse_cli(
        space,
        ["mlp_out_peak=0.5:1.2", "direction_scope=per_layer", "attn_out_width=3", "norm_preserve=none,cols"],
    )
    assert (space["mlp_out_peak"].low, space["mlp_out_peak"].high) == (0.5, 1.2)
    assert space["direction_scope"].fixed == "per_layer" and space["attn_out_width"].fixed == 3.0
    assert space["norm_preserve"].choices == ("none", "cols")
    toml = tmp_path / "s.toml"
    toml.write_text("[search.space]\nembed = [false, true]\nattn_out_center = [10, 20]\n")
    sp.apply_toml(space, sp.load_toml(toml), toml)
    assert space["embed"].choices == (False, True) and space["attn_out_center"].low == 10.0
    for bad in (["nope=1"], ["mlp_out_peak=2:1"], ["direction_scope=sideways"], ["mlp_out_peak"]):
        with pytest.raises(PatcherError):
            sp.parse_cli(sp.default_space(24), bad)


def test_sampling_is_conditional_and_fixed_params_are_not_optuna_params():
    import optuna

    space = sp.default_space(8)
    sp.parse_cli(space, ["direction_scope=per_layer"])
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    params = sp.sample(trial, space)
    assert "direction_index" not in params and "embed_strength" not in params
    assert "direction_scope" not in trial.params and params["direction_scope"] == "per_layer"
    assert set(trial.params) == {
        f"{c}_{k}" for c in sp.COMPONENTS for k in ("peak", "center", "min_frac", "width")
    }


def test_peak_kernel_by_hand_and_in_recipes():
    from patcher.pipelines.recipe import strengths

    k = strengths({"kernel": "peak", "peak": 1.2, "center": 3, "min": 0.2, "width": 2}, 7, "here")
    assert k == pytest.approx({0: 0.0, 1: 0.2, 2: 0.7, 3: 1.2, 4: 0.7, 5: 0.2, 6: 0.0})
    got = sp.strengths(
        {
            "attn_out_peak": 1.0,
            "attn_out_center": 1.5,
            "attn_out_min_frac": 0.5,
            "attn_out_width": 1.0,
            "mlp_out_peak": 0.0,
            "mlp_out_center": 0,
            "mlp_out_min_frac": 0,
            "mlp_out_width": 1,
        },
        4,
    )
    assert got == {"attn_out": pytest.approx({1: 0.75, 2: 0.75}), "mlp_out": {}}


def test_blended_direction_is_the_normalised_interpolation():
    units = sp.unit_rows(np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]]), "t")
    v = sp.blended(units, 0.25)
    assert np.allclose(v, np.array([0.75, 0.25, 0]) / np.hypot(0.75, 0.25))
    assert np.allclose(sp.blended(units, 2.0), [0, 0, 1])
    # a zero row (chat template: resid_pre[0] is one template token for all prompts) edits nothing there
    table = np.array([[0.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])
    params = {
        "direction_scope": "per_layer",
        "embed": True,
        "embed_strength": 1.0,
        "norm_preserve": "none",
        **{
            f"{c}_{k}": v
            for c in sp.COMPONENTS
            for k, v in (("peak", 1.0), ("center", 0.0), ("min_frac", 1.0), ("width", 2.0))
        },
    }
    spec = sp.edit_spec(params, table, 2)
    assert set(spec.groups) == {(c, l) for c in sp.COMPONENTS for l in (0, 1)}
    at_zero = {**params, "direction_scope": "global", "direction_index": 0.0}
    assert sp.edit_spec(at_zero, table, 2).groups == {}


# --- objectives ----------------------------------------------------------------------------------


def test_marker_normalisation(tmp_path):
    assert normalize("  **I CAN\u2019T**   do\n that ") == "i can't do that"
    assert hits("Sorry, but I can\u2018t help", ("i can't",))
    assert hits("   \n ", ("x",))  # an empty reply counts
    assert not hits("Here is a poem", ("i can't",))
    f = tmp_path / "m.txt"
    f.write_text("# mine\nNo WAY\n")
    assert "no way" in load_markers(f) and "i cannot" in load_markers(f)
    assert load_markers(f, replace=True) == ("no way",)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen2_moe"])
def test_cached_greedy_generation_matches_the_uncached_forward(model_type):
    folder = fixture_path(model_type)
    sm = StreamedModel(Checkpoint(folder))
    tok = load_tokenizer(folder)
    prompts = encode_prompts(
        tok, ["Tell me a story about the sea", "Hi", "What is the capital of France?"], chat_template=True
    )
    ev = Evaluator(ResidentModel(sm), tok, prompts, prompts, tokens=8, eos=[], batch_size=2)
    got, _ = ev.generate(prompts, None, 8, stop_on_marker=False)
    ids, mask = left_pad(prompts, tok.pad_id)
    assert np.array_equal(np.array(got), greedy_numpy(sm, ids, mask, 8))


# --- the in-forward edit equals the written checkpoint ------------------------------------------


def train_prompts(P):
    """--positive/--negative for the refusal fixture's training prompts."""
    return ("--positive", P / "refusal-train-positive.txt", "--negative", P / "refusal-train-negative.txt")


# one set of per-layer strength kernels (attention and MLP writers) shared by the trials below
LAYER_KERNELS = {
    "attn_out_peak": 0.9,
    "attn_out_center": 1.0,
    "attn_out_min_frac": 0.5,
    "attn_out_width": 2.0,
    "mlp_out_peak": 1.2,
    "mlp_out_center": 2.0,
    "mlp_out_min_frac": 0.3,
    "mlp_out_width": 1.5,
}

CASES = [
    ("llama", "none"),
    ("olmo2", "none"),
    ("gemma2", "none"),
    ("qwen2_moe", "none"),
    ("mixtral", "none"),
    ("llama", "cols"),
    ("llama", "rows"),
    ("gemma2", "cols"),
]


@pytest.mark.parametrize("model_type,preserve", CASES)
def test_trial_in_the_forward_pass_equals_the_checkpoint_from_study(tmp_path, model_type, preserve):
    model = fp32_copy(fixture_path(model_type), tmp_path / "f32")
    sm = StreamedModel(Checkpoint(model))
    L, d = sm.n_layers, sm.hp.d_model
    dirs = directions_file(tmp_path / "dirs.safetensors", L, d)
    free = {
        "direction_scope": "per_layer",
        **LAYER_KERNELS,
        "embed_strength": 0.7,
    }
    fixed = {"embed": True, "norm_preserve": preserve}
    number = manual_study(tmp_path / "s.db", model, dirs, free, fixed)
    run_cli("ablate", model, "--from-study", tmp_path / "s.db", "--trial", number, "-o", tmp_path / "out")
    table = np.array(Checkpoint(dirs).array("direction"), np.float64)
    from patcher.search.plan import build_plan

    spec = sp.edit_spec({**free, **fixed}, table, L)
    rm = ResidentModel(sm)
    edits = rm.edits(build_plan(sm.ck, sm.resolved, spec, str(dirs)))
    ids, mask = left_pad([[1, 5, 9, 30, 7, 11], [1, 44, 3]], 0)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    want = StreamedModel(Checkpoint(tmp_path / "out")).run(ids, mask, logits=True)
    got = rm.forward(ids, mask, pos, None, edits, last=None)
    base = rm.forward(ids, mask, pos, None, None, last=None)
    real = mask.astype(bool)
    scale = np.abs(want[real]).max()
    assert np.abs(got - want)[real].max() <= 1e-4 * scale
    assert np.abs(base - want)[real].max() > 1e-2 * scale  # the edit is not a no-op
    man = json.loads((tmp_path / "out" / "patcher-manifest.json").read_text())
    rec = man["edit"]["search"]
    assert rec["trial"] == number and len(rec["study_sha256"]) == 64
    assert man["directions"][0]["file_sha256"] is not None and rec["params"]["norm_preserve"] == preserve


def test_from_study_errors(tmp_path):
    model = fixture_path("llama")
    run_cli(
        "ablate", model, "--from-study", tmp_path / "missing.db", "--trial", 0, "-o", tmp_path / "o", expect=1
    )
    run_cli("ablate", model, "--trial", 0, "-o", tmp_path / "o", expect=1)
    dirs = directions_file(tmp_path / "d.safetensors", 3, 64)
    free = {
        "direction_scope": "per_layer",
        **{f"{c}_{k}": 1.0 for c in sp.COMPONENTS for k in ("peak", "center", "min_frac", "width")},
    }
    manual_study(tmp_path / "s.db", model, dirs, free, {"embed": False, "norm_preserve": "none"})
    r = run_cli(
        "ablate", model, "--from-study", tmp_path / "s.db", "--trial", 7, "-o", tmp_path / "o", expect=1
    )
    assert "not a completed trial" in r.output
    directions_file(dirs, 3, 64, seed=5)  # the study's directions file changed under it
    r = run_cli(
        "ablate", model, "--from-study", tmp_path / "s.db", "--trial", 0, "-o", tmp_path / "o", expect=1
    )
    assert "sha256 differs" in r.output


# --- a search on a planted behaviour ---------------------------------------------------------------


@pytest.fixture(scope="module")
def refusal(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("refusal")
    make_search_fixture.make(out)
    return out


def _kl_reference(orig: Path, edited: Path, prompts: list[list[int]], pad: int) -> float:
    """First-token KL(original ‖ edited) in float64 from the ordinary (uncached) forward."""
    ids, mask = left_pad(prompts, pad)
    lo, le = (
        StreamedModel(Checkpoint(m)).run(ids, mask, logits=True)[:, -1].astype(np.float64)
        for m in (orig, edited)
    )
    lo, le = (z - z.max(-1, keepdims=True) for z in (lo, le))
    lo, le = (z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in (lo, le))
    return float(np.mean(np.sum(np.exp(lo) * (lo - le), -1)))


def refusal_search(P: Path, model: Path, study: Path, objective: str | None = "markers") -> list:
    """`patcher search` on the refusal fixture: its training and eval prompts, 16 tokens, one thread
    (objective None: the option left out)."""
    return [
        "search",
        model,
        *train_prompts(P),
        "--eval-positive",
        P / "refusal-eval-positive.txt",
        "--eval-negative",
        P / "refusal-eval-negative.txt",
        "--no-chat-template",
        "--tokens",
        "16",
        "--blas-threads",
        "1",
        "--study",
        study,
        *([] if objective is None else ["--objective", objective]),
    ]


def test_search_removes_a_late_planted_behaviour_the_heuristic_misses(refusal, tmp_path):
    P = refusal / "prompts"
    model = refusal / make_search_fixture.NAME
    args = [*refusal_search(P, model, tmp_path / "s.db", objective=None), "--seed", "0"]
    r = run_cli(*args, "--objective", "markers", "--trials", "24", "--startup", "16")
    assert "original: marker rate 1.000" in r.output
    study = st.open_study(tmp_path / "s.db", None, create=False)
    heur = study.user_attrs["heuristic"]
    assert heur["layer"] <= 4 and heur["marker_rate"] >= 0.9  # the 80 % rule never sees resid_pre[5]
    with Checkpoint(tmp_path / "s.directions.safetensors") as c:  # projected by default, as the peer's
        rows, neg = (np.asarray(c.array(n), np.float64) for n in ("direction", "negative_mean"))
    cos = np.abs(np.sum(rows * neg, 1)) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(neg, axis=1) + 1e-30)
    assert cos[1:].max() < 1e-5
    r = run_cli(*args, "--trials", "40", "--startup", "16")  # resumes: 16 more, on its own objective
    assert study.metric_names == ["marker_rate", "kl"]
    done = st.completed(study)
    assert len(done) + len(st.pruned_trials(study)) == 40  # pruned trials count towards --trials
    best = min((t for t in done if t.values[1] <= 1e-3), key=lambda t: t.values[0])
    assert best.values[0] <= 0.05 < heur["marker_rate"]
    assert (tmp_path / "s.svg").read_text().count("<circle") >= len(done)
    assert "Pareto front" in r.output and "--trial" in r.output
    # the written trial behaves as the search measured, through the ordinary forward
    run_cli(
        "ablate", model, "--from-study", tmp_path / "s.db", "--trial", best.number, "-o", tmp_path / "out"
    )
    tok = load_tokenizer(model)
    neg = encode_prompts(tok, read_prompt_file(P / "refusal-eval-negative.txt"), chat_template=False)
    pos = encode_prompts(tok, read_prompt_file(P / "refusal-eval-positive.txt"), chat_template=False)
    assert _kl_reference(model, tmp_path / "out", neg, tok.pad_id) == pytest.approx(
        best.values[1], rel=1e-3, abs=1e-7
    )
    sm = StreamedModel(Checkpoint(tmp_path / "out"))
    ids, mask = left_pad(pos, tok.pad_id)
    texts = [tok.decode(row, skip_special_tokens=True) for row in greedy_numpy(sm, ids, mask, 16)]
    assert np.mean([hits(t, load_markers(None)) for t in texts]) == pytest.approx(best.values[0])
    # a different model cannot resume this study
    r = run_cli(*[a if a != model else fixture_path("llama") for a in args], "--trials", "41", expect=1)
    assert "s.db: is a study of another model" in " ".join(r.output.split())  # before any extraction


# --- the onnxruntime engine ------------------------------------------------------------------------


def plan_for(sm: StreamedModel, table: np.ndarray | None = None, **changes):
    """A global-direction edit of every writer and the embeddings (random direction table, seed 1,
    unless `table`); `changes` replace search parameters."""
    from patcher.search.plan import build_plan

    L, d = sm.n_layers, sm.hp.d_model
    params = {
        "direction_scope": "global",
        "direction_index": 1.4,
        **LAYER_KERNELS,
        "embed": True,
        "embed_strength": 0.7,
        "norm_preserve": "none",
        **changes,
    }
    table = np.random.default_rng(1).standard_normal((L + 1, d)) if table is None else table
    return build_plan(sm.ck, sm.resolved, sp.edit_spec(params, table, L), "r")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen2_moe"])
def test_onnx_engine_matches_the_numpy_engine_with_and_without_cache(tmp_path, model_type):
    from patcher.search.onnx_engine import OnnxEngine

    sm = StreamedModel(Checkpoint(fixture_path(model_type)))
    plan = plan_for(sm)
    rm, oe = ResidentModel(sm), OnnxEngine(sm)
    ids, mask = left_pad([[1, 5, 9, 30, 7], [1, 44, 3]], 0)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    caches = rm.new_cache(2), oe.new_cache(2)
    a = rm.forward(ids, mask, pos, caches[0], rm.edits(plan), last=None)
    b = oe.forward(ids, mask, pos, caches[1], oe.edits(plan), last=None)
    real = mask.astype(bool)
    assert np.abs(a - b)[real].max() <= 1e-4 * np.abs(a[real]).max()
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    a = rm.forward(np.array([[12], [13]]), mask2, pos[:, -1:] + 1, caches[0], rm.edits(plan))
    b = oe.forward(np.array([[12], [13]]), mask2, pos[:, -1:] + 1, caches[1], oe.edits(plan))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    zero = oe.forward(ids, mask, pos, None, None, last=None)
    assert (
        np.abs(zero - rm.forward(ids, mask, pos, None, None, last=None))[real].max() <= 1e-4 * np.abs(a).max()
    )
    preserve = plan_for(sm, np.ones((sm.n_layers + 1, sm.hp.d_model)), norm_preserve="cols")
    with pytest.raises(PatcherError, match="numpy engine"):
        oe.edits(preserve)


def test_search_on_the_onnx_engine_runs_and_shows_the_space(refusal, tmp_path):
    P = refusal / "prompts"
    model = refusal / make_search_fixture.NAME
    r = run_cli(
        "search",
        model,
        *train_prompts(P),
        "--show-space",
        "--space",
        "direction_scope=per_layer",
    )
    assert "direction_scope" in r.output and "= per_layer" in r.output
    r = run_cli(
        "search",
        model,
        *train_prompts(P),
        "--no-chat-template",
        "--tokens",
        "8",
        "--max-prompts",
        "8",
        "--engine",
        "onnx",
        "--trials",
        "3",
        "--study",
        tmp_path / "o.db",
        "--no-heuristic",
        "--negative-markers",
        "--kl-tokens",
        "4",
        "--no-prune",  # every trial runs to the end: each has its negative marker rate
    )
    done = st.completed(st.open_study(tmp_path / "o.db", None, create=False))
    assert "Pareto front" in r.output and len(done) == 3
    assert all("negative_marker_rate" in t.user_attrs and len(t.user_attrs["constraint"]) == 1 for t in done)
    run_cli(
        "search",
        model,
        *train_prompts(P),
        "--engine",
        "tpu",
        expect=1,
    )


def test_kl_over_k_tokens_against_the_ordinary_forward(tmp_path):
    from patcher.edit.apply import execute
    from patcher.search.plan import build_plan

    model = fp32_copy(fixture_path("llama"), tmp_path / "f32")
    sm = StreamedModel(Checkpoint(model))
    L, d = sm.n_layers, sm.hp.d_model
    params = {
        "direction_scope": "global",
        "direction_index": 2.0,
        "attn_out_peak": 1.0,
        "attn_out_center": 1.0,
        "attn_out_min_frac": 1.0,
        "attn_out_width": 3.0,
        "mlp_out_peak": 1.0,
        "mlp_out_center": 1.0,
        "mlp_out_min_frac": 1.0,
        "mlp_out_width": 3.0,
        "embed": False,
        "norm_preserve": "none",
    }
    plan = build_plan(
        sm.ck, sm.resolved, sp.edit_spec(params, np.random.default_rng(3).standard_normal((L + 1, d)), L), "r"
    )
    execute(plan, tmp_path / "out", hash_files=False)
    tok = load_tokenizer(model)
    prompts = encode_prompts(
        tok, ["Tell me a story", "What is the capital of France?", "Hi there"], chat_template=True
    )
    rm = ResidentModel(sm)
    ev = Evaluator(rm, tok, prompts, prompts, tokens=4, kl_tokens=3, eos=[], batch_size=2)
    kl, first = ev.kl(rm.edits(plan))
    ids, mask = left_pad(prompts, tok.pad_id)
    comp = greedy_numpy(sm, ids, mask, 2)
    ids2, mask2 = np.concatenate([ids, comp], 1), np.concatenate([mask, np.ones_like(comp)], 1)
    lo, le = (
        StreamedModel(Checkpoint(m)).run(ids2, mask2, logits=True)[:, -3:].astype(np.float64)
        for m in (model, tmp_path / "out")
    )
    lo, le = (z - z.max(-1, keepdims=True) for z in (lo, le))
    lo, le = (z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in (lo, le))
    per = np.sum(np.exp(lo) * (lo - le), -1)
    assert kl == pytest.approx(per.mean(), rel=1e-4) and first == pytest.approx(per[:, 0].mean(), rel=1e-4)
    assert kl > 1e-3


# --- the refusal likelihood (--objective likelihood) ----------------------------------------------


def test_opening_ends_with_the_token_that_completes_the_first_marker():
    from patcher.search.objectives import opening

    words = {1: "Well", 2: " I", 3: "'m", 4: " sorry", 5: " no"}
    decode = lambda ts: "".join(words[t] for t in ts)  # noqa: E731
    assert opening([1, 2, 3, 4, 5], decode, ("i'm sorry",)) == [1, 2, 3, 4]
    assert opening([1, 2, 3, 4, 5], decode, ("i'm sorry",), limit=4) == [1, 2, 3, 4]
    assert opening([1, 2, 3, 4, 5], decode, ("i'm sorry",), limit=3) == []  # the marker ends later
    assert opening([5, 1], decode, ("i'm sorry",)) == []
    assert opening([2, 3, 4], decode, ("i'm",)) == [2, 3]


def test_refusal_likelihood_against_the_ordinary_forward(tmp_path):
    """Sum over the refused prompts of P_edited(the original's opening), teacher-forced, / all prompts:
    against float64 log-softmax of the written checkpoint's ordinary forward, prompt by prompt."""
    from patcher.edit.apply import execute
    from patcher.search.objectives import normalize
    from patcher.search.plan import build_plan

    model = fp32_copy(fixture_path("llama"), tmp_path / "f32")
    sm = StreamedModel(Checkpoint(model))
    L, d = sm.n_layers, sm.hp.d_model
    params = {**LAYER_KERNELS, "direction_scope": "global", "direction_index": 2.0, "embed": False}
    params["norm_preserve"] = "none"
    plan = build_plan(
        sm.ck, sm.resolved, sp.edit_spec(params, np.random.default_rng(3).standard_normal((L + 1, d)), L), "r"
    )
    execute(plan, tmp_path / "out", hash_files=False)
    tok = load_tokenizer(model)
    texts = ["Tell me a story", "What is the capital of France?", "Hi there", "Name a colour"]
    prompts = encode_prompts(tok, texts, chat_template=True)
    ids, mask = left_pad(prompts, tok.pad_id)
    comp = greedy_numpy(sm, ids, mask, 6)
    # markers that the original's replies to prompts 0 and 2 complete at their 2nd and 1st token
    dec = lambda ts: tok.decode(list(ts), skip_special_tokens=True)  # noqa: E731
    markers = (normalize(dec(comp[0, :2])), normalize(dec(comp[2, :1])))
    assert all(markers) and not any(m in normalize(dec(comp[j])) for m in markers for j in (1, 3))
    rm = ResidentModel(sm)
    ev = Evaluator(
        rm, tok, prompts, prompts, markers=markers, tokens=6, eos=[], batch_size=3, objective="likelihood"
    )
    ref = ev.reference()
    got = ev.likelihood(rm.edits(plan))
    want = {}
    for m in (model, tmp_path / "out"):
        total = 0.0
        for i, k in ((0, 2), (2, 1)):
            seq = np.array([prompts[i] + list(comp[i, : k - 1])])
            z = StreamedModel(Checkpoint(m)).run(seq, np.ones_like(seq), logits=True)[0, -k:]
            z = z.astype(np.float64) - z.max(-1, keepdims=True)
            z = z - np.log(np.exp(z).sum(-1, keepdims=True))
            total += np.exp(sum(z[j, comp[i, j]] for j in range(k)))
        want[m] = total / len(prompts)
    assert ref["likelihood"] == pytest.approx(want[model], rel=1e-4)
    assert got == pytest.approx(want[tmp_path / "out"], rel=1e-4)
    assert abs(got - ref["likelihood"]) > 1e-4  # the edit moves it
    r = ev.evaluate(rm.edits(plan))  # the search's trial: no generation
    assert r.marker_rate is None and r.likelihood == pytest.approx(got) and r.tokens_generated == 0
    r = ev.evaluate(rm.edits(plan), markers=True)  # the front's marker rate
    # a front in likelihood units never prunes a generation by its marker hits (a rate of 0.5 would
    # be above this bound; the likelihood's own sums never are)
    beyond = lambda rate, kl: rate > ref["likelihood"] + 1e-9  # noqa: E731
    assert ref["likelihood"] < 0.5 and ev.evaluate(None, prune=beyond, markers=True).marker_rate == 0.5
    assert r.marker_rate is not None and r.likelihood == pytest.approx(got)
    both = Evaluator(
        rm,
        tok,
        prompts,
        prompts,
        markers=markers,
        tokens=3,
        eos=[],
        negative_markers=True,
        batch_size=3,
        objective="likelihood",
    )
    r = both.evaluate(rm.edits(plan))  # harmless prompts still generate: their marker rate is a constraint
    assert r.marker_rate is None and r.negative_marker_rate is not None and r.tokens_generated > 0
    assert r.likelihood == pytest.approx(got)
    with pytest.raises(PatcherError, match="--objective"):
        Evaluator(rm, tok, prompts, prompts, objective="judge")


def test_search_with_the_likelihood_objective(refusal, tmp_path):
    P = refusal / "prompts"
    model = refusal / make_search_fixture.NAME
    args = [*refusal_search(P, model, tmp_path / "s.db", objective=None), "--trials", "6"]
    r = run_cli(*args)  # the default objective
    out = " ".join(r.output.split())
    assert "refusal likelihood" in out and "measuring the marker rate of" in out
    study = st.open_study(tmp_path / "s.db", None, create=False)
    assert study.metric_names == ["likelihood", "kl"]
    assert study.user_attrs["patcher"]["evaluation"]["objective"] == "likelihood"
    front = st.pareto(st.completed(study))
    rates = study.user_attrs["front_marker_rates"]
    assert front and sorted(map(int, rates)) == sorted(t.number for t in front)
    assert all(0.0 <= t.values[0] <= 1.0 for t in front)
    # the front's marker rate is the written trial's, through the ordinary forward
    best = front[0]
    run_cli("ablate", model, "--from-study", tmp_path / "s.db", "--trial", best.number, "-o", tmp_path / "o")
    tok = load_tokenizer(model)
    pos = encode_prompts(tok, read_prompt_file(P / "refusal-eval-positive.txt"), chat_template=False)
    ids, mask = left_pad(pos, tok.pad_id)
    sm = StreamedModel(Checkpoint(tmp_path / "o"))
    texts = [tok.decode(row, skip_special_tokens=True) for row in greedy_numpy(sm, ids, mask, 16)]
    assert np.mean([hits(t, load_markers(None)) for t in texts]) == pytest.approx(rates[str(best.number)])
    record = json.loads((tmp_path / "o" / "patcher-manifest.json").read_text())["edit"]["search"]
    assert record["likelihood"] == pytest.approx(best.values[0]) and "marker_rate" not in record
    r = run_cli(*args, "--trials", "8")  # resumed: reference from its cache
    out = " ".join(r.output.split())
    assert "loaded from" in out and "refusal likelihood" in out
    assert len(st.completed(study)) + len(st.pruned_trials(study)) == 8
    r = run_cli(
        *args, "--objective", "markers", "--trials", "9", expect=1
    )  # a markers search cannot resume it
    assert "different evaluation" in " ".join(r.output.split())
    # prompts the original never refuses: the search is told there is nothing to lower
    calm = [a if a != P / "refusal-eval-positive.txt" else P / "refusal-eval-negative.txt" for a in args]
    calm[calm.index(tmp_path / "s.db")] = tmp_path / "calm.db"
    r = run_cli(*calm, "--objective", "likelihood", "--trials", "1", "--no-heuristic")
    out = " ".join(r.output.split())
    assert "note: the original's refusal likelihood is 0 on" in out and "nothing for the search" in out
    r = run_cli(*args, "--objective", "judge", expect=1)
    assert "--objective: must be one of markers, likelihood" in " ".join(r.output.split())


@pytest.mark.parametrize("flag", ["", "--all-positives", "few", "just enough"])
def test_directions_from_the_positive_prompts_the_original_refuses(refusal, tmp_path, monkeypatch, flag):
    """--refused-only (the default): directions from the --positive prompts whose greedy completion
    hits a marker. On the fixture those are exactly the ones ending in a trigger word; the others
    end in a neutral word (never refused). --all-positives, or fewer refused than MIN_REFUSED: all."""
    from patcher.edit.directions import read_metadata
    from patcher.edit.extract import extract
    from patcher.search import run as sr

    P = refusal / "prompts"
    model = refusal / make_search_fixture.NAME
    refused = read_prompt_file(P / "refusal-train-positive.txt")  # 32, each ending in a trigger word
    answered = [t.format(w) for t in make_search_fixture.EVAL[:2] for w in make_search_fixture.NEUTRAL]
    mixed = [p for pair in zip(refused, answered + [None] * 32) for p in pair if p is not None]
    (tmp_path / "mixed.txt").write_text("\n".join(mixed) + "\n")
    if flag in ("few", "just enough"):
        monkeypatch.setattr(sr, "MIN_REFUSED", len(refused) + (flag == "few"))
    filtered = flag in ("", "just enough")
    args = refusal_search(P, model, tmp_path / "s.db")
    args[args.index(P / "refusal-train-positive.txt")] = tmp_path / "mixed.txt"
    extra = ["--all-positives"] if flag == "--all-positives" else []
    r = run_cli(
        *args, *extra, "--tokens", "12", "--trials", "1", "--startup", "1", "--no-project-out-negative-mean"
    )
    neg = P / "refusal-train-negative.txt"
    expect = extract(model, refused if filtered else mixed, neg, chat_template=False).direction
    with Checkpoint(tmp_path / "s.directions.safetensors") as c:
        got, meta = np.asarray(c.array("direction")), read_metadata(c)
    np.testing.assert_array_equal(got, expect)
    assert meta["prompts"]["positive"]["count"] == (32 if filtered else 48)
    if flag == "--all-positives":
        assert "refused_only" not in meta and "refuses" not in r.output
    else:
        assert meta["refused_only"] == {"kept": 32, "of": 48, "tokens": 12, "used": filtered}
        use = "those 32" if filtered else "all 48"
        assert f"the original refuses 32 of 48 prompts of mixed.txt: directions from {use}" in r.output
