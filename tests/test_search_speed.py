"""`patcher search` speed and scale: the original's reference cached beside the study, trials pruned
once they cannot reach the front (and never one that would have been on it), weights resident as
stored (bf16) with the same logits as float32, BLAS threads from the cores, --provider checks."""

import os
import sys

import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT, fixture_path, run_cli
from test_search import LAYER_KERNELS, train_prompts

from patcher.io.checkpoint import Checkpoint
from patcher.model.execution import StreamedModel
from patcher.model.prompts import left_pad
from patcher.search import engine as en
from patcher.search import reference_cache
from patcher.search import run as sr
from patcher.search import space as sp
from patcher.search.objectives import Evaluator, Hopeless
from patcher.search.plan import build_plan

sys.path.insert(0, str(ROOT / "scripts"))
import make_search_fixture


@pytest.fixture(scope="module")
def refusal(tmp_path_factory):
    return make_search_fixture.make(tmp_path_factory.mktemp("refusal")).parent


def _setup(refusal, tmp_path, **kw) -> sr.Setup:
    """The refusal fixture's search on the markers objective (the one that generates and prunes)."""
    return make_search_fixture.search_setup(
        refusal,
        tmp_path / "dirs.safetensors",
        **{"tokens": 16, "batch_size": 8, "objective": "markers", **kw},
    )


def _points(s: sr.Setup, n: int, seed: int = 0) -> list[dict]:
    """Random points of the default space (as the start-up trials draw them), then the default pipeline."""
    rng = np.random.default_rng(seed)
    out = [sp.complete(sp.sample(sp.RandomTrial(rng), s.space), {}) for _ in range(n)]
    return out + [sr.heuristic_params(int(s.selected), s.n_layers)]


def _front(values: list) -> list:
    return sorted(v for v in values if not any(o[0] <= v[0] and o[1] <= v[1] and o != v for o in values))


# --- the reference, cached beside the study --------------------------------------------------------


def test_a_repeated_study_loads_the_reference_and_scores_the_same(refusal, tmp_path, monkeypatch):
    cache = reference_cache.path_for(tmp_path / "s.db")
    s1 = _setup(refusal, tmp_path)
    ref1, cached = sr.reference(s1, cache)
    assert not cached and cache.is_file()
    calls = []
    generate = Evaluator.generate
    monkeypatch.setattr(
        Evaluator, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k)
    )
    monkeypatch.setattr(
        Evaluator, "_log_probs", lambda self, e, f=Evaluator._log_probs: calls.append(2) or f(self, e)
    )
    s2 = _setup(refusal, tmp_path)
    ref2, cached = sr.reference(s2, cache)
    assert cached and calls == []  # no generation, no forward pass of the original
    assert ref2["positive_completions"] == ref1["positive_completions"]
    assert ref2["negative_completions"] == ref1["negative_completions"]
    assert ref2["marker_rate"] == ref1["marker_rate"] and np.array_equal(ref2["log_probs"], ref1["log_probs"])
    params = _points(s1, 1)[0]
    a, b = s1.evaluate(params), s2.evaluate(params)
    assert (a.marker_rate, a.kl, a.first_token_kl) == (b.marker_rate, b.kl, b.first_token_kl)
    # other settings are another reference: computed again, the file rewritten for them
    s3 = _setup(refusal, tmp_path, tokens=8)
    ref3, cached = sr.reference(s3, cache)
    assert not cached and calls and ref3["positive_completions"] != ref1["positive_completions"]
    assert reference_cache.load(cache, s1.reference_key) is None
    assert reference_cache.load(cache, s3.reference_key) is not None
    cache.write_bytes(b"not a zip")  # a damaged cache only costs time
    assert reference_cache.load(cache, s3.reference_key) is None


def test_the_cli_says_the_reference_was_loaded(refusal, tmp_path):
    P = refusal / "prompts"
    args = ["search", refusal / make_search_fixture.NAME, *train_prompts(P), "--no-chat-template"]
    args += ["--tokens", "4", "--max-prompts", "8", "--study", tmp_path / "s.db", "--no-heuristic"]
    r = run_cli(*args, "--trials", "1")
    assert "reference computed in" in r.output
    r = run_cli(*args, "--trials", "2")
    assert "reference loaded from s.reference.npz" in r.output


# --- pruning --------------------------------------------------------------------------------------


def test_pruning_never_drops_a_trial_that_would_be_on_the_front(refusal, tmp_path):
    """Trials in order, each judged against the front of those completed before it (as the search
    does): a pruned trial is dominated by that front at its full values; a completed one has exactly
    its full values; the final front is the front without pruning."""
    s = _setup(refusal, tmp_path)
    s.evaluator.check_every = 1
    points = _points(s, 16)
    full = [(r.marker_rate, r.kl) for r in map(s.evaluate, points)]
    done, pruned = [], []
    for i, (params, want) in enumerate(zip(points, full)):
        front = _front(done)
        try:
            r = s.evaluate(params, prune=sr.beyond_front(front) if front else None)
        except Hopeless as h:
            pruned.append(i)
            assert h.kl == want[1] and h.rate <= want[0]
            assert any(f <= want[0] and g <= want[1] and (f, g) != want for f, g in front)
            continue
        assert (r.marker_rate, r.kl) == want
        done.append(want)
    assert pruned and len(pruned) < len(points)  # the check can fail both ways
    assert _front(done) == _front(full)


def test_likelihood_pruning_never_drops_a_trial_that_would_be_on_the_front(refusal, tmp_path):
    """The same for the refusal likelihood, its openings in batches of 2: the sum so far is a lower
    bound (each prompt adds a probability >= 0), so a trial given up after some batches is dominated
    at its full values; at least one is given up part-way (not by its KL alone). The eval-positive
    prompts include ones the original does not refuse: the bound divides by all of them."""
    P = refusal / "prompts"
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(
        (P / "refusal-eval-positive.txt").read_text() + (P / "refusal-eval-negative.txt").read_text()
    )
    s = _setup(refusal, tmp_path, objective="likelihood", batch_size=2, eval_positive=mixed)
    points = _points(s, 16)
    full = [(r.likelihood, r.kl) for r in map(s.evaluate, points)]
    assert 2 < len(s.evaluator._openings[0]) < len(s.evaluator.positive)  # batches; some not refused
    done, given_up = [], []
    for params, want in zip(points, full):
        front = _front(done)
        try:
            r = s.evaluate(params, prune=sr.beyond_front(front) if front else None)
        except Hopeless as h:
            given_up.append(h)
            assert h.kl == want[1] and h.rate <= want[0] + 1e-12
            assert sr.beyond_front(front)(h.rate, h.kl)  # the bound it reports is the one that gave up
            assert any(f <= want[0] and g <= want[1] and (f, g) != want for f, g in front)
            continue
        assert (r.likelihood, r.kl) == want
        done.append(want)
    assert any(0 < h.rows < len(s.evaluator._openings[0]) and h.rate > 0 for h in given_up)
    assert len(given_up) < len(points) and _front(done) == _front(full)


def test_a_trial_behind_the_front_on_kl_alone_generates_nothing(refusal, tmp_path):
    """A front point with marker rate 0 and a lower KL dominates whatever the trial would say: the
    trial is given up after its KL, before a single row is generated; at a KL just below that point's
    it runs to the end."""
    s = _setup(refusal, tmp_path)
    params = sr.heuristic_params(int(s.selected), s.n_layers)
    full = s.evaluate(params)
    calls = []
    generate = s.evaluator.generate
    s.evaluator.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    with pytest.raises(Hopeless) as h:
        s.evaluate(params, prune=sr.beyond_front([(0.0, full.kl * 0.999)]))
    assert (h.value.rate, h.value.kl, h.value.rows) == (0.0, full.kl, 0) and not calls
    r = s.evaluate(params, prune=sr.beyond_front([(0.0, full.kl * 1.001)]))
    assert (r.marker_rate, r.kl) == (full.marker_rate, full.kl) and calls


def test_a_trial_that_refuses_as_often_as_the_original_is_pruned(refusal, tmp_path):
    """The original (marker rate r0, KL 0) bounds every front: a trial known to reach r0 is given up
    even before any trial has completed; without pruning the same trial completes at rate r0."""
    from patcher.search import study as st

    s = _setup(refusal, tmp_path)
    r0 = s.evaluator.reference()["marker_rate"]
    assert r0 > 0
    for name in ("attn_out_peak", "mlp_out_peak"):  # a faint edit: KL > 0, the behaviour untouched
        sp.narrow(s.space, name, 0.01, "test")
    states = {}
    for prune in (True, False):
        s.prune = prune
        study = st.open_study(tmp_path / f"{prune}.db", s.attrs, seed=0, startup=1)
        st.optimize(study, s.run_trial, 1, None)
        (t,) = study.trials
        states[prune] = (t.state.name, t.values)
    assert states[True] == ("PRUNED", None)
    assert states[False][0] == "COMPLETE" and states[False][1][0] == r0 and states[False][1][1] > 0


def test_an_original_that_never_refuses_prunes_nothing(refusal, tmp_path):
    """With no marker in the original's completions (rate 0) the original is no front point: it would
    dominate every trial with KL > 0 and prune them all."""
    from patcher.search import study as st

    never = tmp_path / "markers.txt"
    never.write_text("zzqx never said\n")
    s = _setup(refusal, tmp_path, markers=never, replace_markers=True)
    assert s.evaluator.reference()["marker_rate"] == 0.0
    study = st.open_study(tmp_path / "s.db", s.attrs, seed=0, startup=1)
    st.optimize(study, s.run_trial, 1, None)
    (t,) = study.trials
    assert t.state.name == "COMPLETE" and t.values[0] == 0.0 and t.values[1] > 0


def test_pruning_bound_is_strict_on_ties():
    prune = sr.beyond_front([(0.25, 0.01)])
    assert not prune(0.25, 0.01)  # the same values would tie: both on the front
    assert prune(0.25, 0.02) and prune(0.3, 0.01)
    assert not prune(0.2, 0.5) and not prune(0.9, 0.005)


# --- weights resident as stored ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type,preserve", [("llama", "cols"), ("qwen2_moe", "none"), ("gemma2", "rows")]
)
def test_weights_as_stored_give_the_float32_logits_bit_for_bit(model_type, preserve):
    sm = StreamedModel(Checkpoint(fixture_path(model_type)))
    L, d = sm.n_layers, sm.hp.d_model
    stored, f32 = en.ResidentModel(sm, "storage"), en.ResidentModel(sm, "float32")
    kept = [dict.__getitem__(stored.blocks[0], n).dtype for n in stored.blocks[0]]
    assert np.dtype(ml_dtypes.bfloat16) in kept and np.dtype(np.float32) not in kept  # not decoded
    params = {
        "direction_scope": "global",
        "direction_index": 1.4,
        **LAYER_KERNELS,
        "embed": True,
        "embed_strength": 0.7,
        "norm_preserve": preserve,
    }
    table = np.random.default_rng(1).standard_normal((L + 1, d))
    plan = build_plan(sm.ck, sm.resolved, sp.edit_spec(params, table, L), "r")
    ids, mask = left_pad([[1, 5, 9, 30, 7], [1, 44, 3]], 0)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    caches = stored.new_cache(2), f32.new_cache(2)
    a = stored.forward(ids, mask, pos, caches[0], stored.edits(plan), last=None)
    b = f32.forward(ids, mask, pos, caches[1], f32.edits(plan), last=None)
    assert np.array_equal(a, b)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    a = stored.forward(np.array([[12], [13]]), mask2, pos[:, -1:] + 1, caches[0], stored.edits(plan))
    b = f32.forward(np.array([[12], [13]]), mask2, pos[:, -1:] + 1, caches[1], f32.edits(plan))
    assert np.array_equal(a, b) and stored.vocab == f32.vocab


def test_auto_keeps_weights_as_stored_when_float32_would_not_fit(monkeypatch):
    sm = StreamedModel(Checkpoint(fixture_path("llama")))
    need = en.float32_bytes(sm)
    assert need == 4 * sum(int(np.prod(sm.ck.info(n).shape)) for n in sm.ck.tensors)
    monkeypatch.setattr(en, "available_memory", lambda: 2 * need)
    assert en.choose_resident(sm) == "float32"
    monkeypatch.setattr(en, "available_memory", lambda: 2 * need - 1)
    assert en.choose_resident(sm) == "storage" and en.ResidentModel(sm, "auto").resident == "storage"


# --- threads and providers ----------------------------------------------------------------------------


def test_blas_threads_share_the_cores_between_jobs():
    from patcher.cli.search import blas_threads_for

    cores = len(os.sched_getaffinity(0))
    assert blas_threads_for(1) == cores and blas_threads_for(cores + 1) == 1
    assert blas_threads_for(2) == max(1, cores // 2)


def _has_cuda() -> bool:
    from patcher.onnx.runtime import available_providers

    return "cuda" in available_providers()


def test_provider_is_checked_before_any_work(refusal, tmp_path):
    P = refusal / "prompts"
    base = ["search", refusal / make_search_fixture.NAME, *train_prompts(P), "--study", tmp_path / "s.db"]
    r = run_cli(*base, "--provider", "cuda", expect=1)  # the numpy engine
    assert "numpy engine runs on the CPU" in r.output
    r = run_cli(*base, "--engine", "onnx", "--provider", "tpu", expect=1)
    assert "--provider" in r.output and "cpu, cuda" in r.output
    r = run_cli(*base, "--resident", "fp8", expect=1)
    assert "--resident" in r.output
    if not _has_cuda():
        r = run_cli(*base, "--engine", "onnx", "--provider", "cuda", expect=1)
        assert "cuda is not available" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "s.directions.safetensors").exists()  # no extraction ran


def test_eval_prompts_and_judge_are_checked_before_the_extraction(refusal, tmp_path):
    """An eval prompt longer than the model's positions (with the tokens to generate), or a judge that
    does not exist: one line naming it, exit 1, and no directions extracted."""
    P = refusal / "prompts"
    base = ["search", refusal / make_search_fixture.NAME, *train_prompts(P), "--no-chat-template"]
    base += ["--study", tmp_path / "s.db"]
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["w7"] * 400) + "\n")
    r = run_cli(*base, "--eval-positive", long, "--eval-negative", P / "refusal-eval-negative.txt", expect=1)
    assert str(long) in r.output and "positions" in r.output and r.output.count("\n") == 1
    r = run_cli(*base, "--judge", tmp_path / "no-judge", expect=1)
    assert "no-judge" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "s.directions.safetensors").exists() and not (tmp_path / "s.db").exists()


@pytest.mark.skipif(not _has_cuda(), reason="onnxruntime has no CUDA provider here (no GPU)")
def test_search_on_cuda_matches_the_cpu_engine(refusal, tmp_path):
    P = refusal / "prompts"
    args = ["search", refusal / make_search_fixture.NAME, *train_prompts(P), "--no-chat-template"]
    args += ["--tokens", "8", "--max-prompts", "8", "--engine", "onnx", "--trials", "2", "--no-heuristic"]
    run_cli(*args, "--provider", "cuda", "--study", tmp_path / "g.db")
    run_cli(*args, "--study", tmp_path / "c.db")
    from patcher.search import study as st

    gpu, cpu = (st.completed(st.open_study(tmp_path / f, None, create=False)) for f in ("g.db", "c.db"))
    assert [t.params for t in gpu] == [t.params for t in cpu]
    for g, c in zip(gpu, cpu):
        assert g.values[0] == c.values[0] and g.values[1] == pytest.approx(c.values[1], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("neg_rate", [None, 0.25])
def test_the_reference_file_round_trips_every_field(tmp_path, neg_rate):
    # hand-made reference: ragged completions, both forms of the negative marker rate
    ref = {
        "positive_completions": [[5, 6, 7], [8], []],
        "negative_completions": [[1, 2], [3, 4, 9, 10]],
        "marker_rate": 1 / 3,
        "negative_marker_rate": neg_rate,
        "log_probs": np.log(np.full((2, 1, 4), 0.25)),
        "seconds": 12.5,
    }
    path = tmp_path / "s.reference.npz"
    reference_cache.save(path, "k1", ref)
    got = reference_cache.load(path, "k1")
    assert got is not None and set(got) == set(ref)
    for k, v in ref.items():
        if k == "log_probs":
            np.testing.assert_array_equal(got[k], v)
        else:
            assert got[k] == v, k
    assert reference_cache.load(path, "k2") is None


def test_the_reference_file_never_replaces_a_users_file(tmp_path):
    from patcher.errors import PatcherError

    path = tmp_path / "s.reference.npz"
    path.write_bytes(b"mine")
    ref = {
        "positive_completions": [[1]],
        "negative_completions": [[2]],
        "marker_rate": 0.0,
        "negative_marker_rate": None,
        "log_probs": np.zeros((1, 1, 2)),
        "seconds": 1.0,
    }
    with pytest.raises(PatcherError) as e:
        reference_cache.save(path, "k", ref)
    assert "not written by patcher" in str(e.value) and path.read_bytes() == b"mine"


# --- a prefix every prompt shares runs once ------------------------------------------------------


def test_shared_prefix_is_what_every_row_starts_with():
    head = [5, 6, 7, 8, 9]
    assert en_shared([head + [1, 2], head + [3], head + [4, 4, 4]]) == 5
    assert en_shared([head + [1, 2], head + [3]], last=2) == 4  # each row keeps `last` tokens of its own
    assert en_shared([head + [1], [5, 6, 7, 0, 9, 1]]) == 0  # 3 shared: below MIN_SHARED
    assert en_shared([head + [1, 2]]) == 0 and en_shared([head, head]) == 4


def en_shared(batch, last=1):
    from patcher.search.objectives import shared_prefix

    return shared_prefix(batch, last)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_a_shared_prefix_run_once_gives_the_same_completions_and_kl(model_type):
    """Rows laid out as [shared prefix, padding, own tokens] give the left-padded batch's greedy tokens
    and log-probabilities (gemma3_text: sliding window 4 < the prompts, so the window must count
    positions, not columns); the prefix runs as one row."""
    from patcher.model.prompts import load_tokenizer

    folder = fixture_path(model_type)
    sm = StreamedModel(Checkpoint(folder))
    tok = load_tokenizer(folder)
    head = [int(t) for t in np.random.default_rng(0).integers(3, 100, 7)]
    prompts = [
        head + [int(t) for t in np.random.default_rng(i).integers(3, 100, n)]
        for i, n in enumerate((1, 5, 9, 3))
    ]
    engine = en.ResidentModel(sm)
    ev = Evaluator(engine, tok, prompts, prompts, tokens=6, kl_tokens=3, eos=[], batch_size=4)
    ev.reference()
    widths = []
    forward = engine.forward
    engine.forward = lambda ids, *a, **k: widths.append(ids.shape) or forward(ids, *a, **k)
    got, _ = ev.generate(prompts, None, 6, stop_on_marker=False)
    shared = ev._log_probs(None)
    assert (1, 7) in widths  # the prefix, once
    engine.shares_prefix = False
    want, _ = ev.generate(prompts, None, 6, stop_on_marker=False)
    assert got == want
    np.testing.assert_allclose(shared, ev._log_probs(None), atol=2e-5)


# --- a trial runs only the layers its edit reaches ---------------------------------------------


def _stem_evaluator(model_type, **kw):
    from patcher.model.prompts import load_tokenizer

    folder = fixture_path(model_type)
    sm = StreamedModel(Checkpoint(folder))
    head = [int(t) for t in np.random.default_rng(0).integers(3, 100, 6)]
    prompts = [
        head + [int(t) for t in np.random.default_rng(i).integers(3, 100, n)]
        for i, n in enumerate((1, 5, 9, 3, 2))
    ]
    engine = en.ResidentModel(sm)
    ev = Evaluator(engine, load_tokenizer(folder), prompts, prompts[::-1], eos=[], batch_size=3, **kw)
    return sm, engine, ev


# kernels over the 3 fixture layers: (first edited layer, parameters)
STEM_EDITS = [
    (1, {"attn_out_center": 2.0, "attn_out_width": 0.5, "mlp_out_center": 1.5, "mlp_out_width": 0.6}),
    (2, {"attn_out_center": 2.0, "attn_out_width": 0.5, "mlp_out_center": 2.0, "mlp_out_width": 0.5}),
    (0, {"attn_out_center": 2.0, "attn_out_width": 0.5, "mlp_out_center": 2.0, "mlp_out_width": 0.5}),
]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "deepseek_v3", "gpt_neox", "qwen2_moe"])
def test_a_trial_started_from_the_originals_stem_scores_the_same(model_type):
    """Completions (generation: the skipped layers' keys and values come from the stem, and from the
    original's track while a row's tokens are the original's), KL over 3 tokens and the negatives'
    marker rate equal those of passes from the embedding; the passes did start at the first edited
    layer (0 when the embedding is edited)."""
    from test_search import plan_for

    sm, engine, ev = _stem_evaluator(model_type, tokens=5, kl_tokens=3, negative_markers=True)
    ev.reference()
    top = max(ev._kept())  # keys/values kept for the layers below the last kept one only
    assert all(set(t.steps[0][2]) == set(range(top)) for t in ev._tracks.values()) and ev._tracks
    assert all(set(s.kv) == set(range(top)) for s in ev._stems.values() if s.kv is not None)
    for track in ev._tracks.values():  # every other row leaves the track at step 2 (always allowed)
        for r in range(0, len(track.tokens), 2):
            track.tokens[r] = track.tokens[r][:2] + [-1] + track.tokens[r][3:]
    starts = []
    forward = engine.forward

    def spy(ids, *a, **k):  # (start, rows resuming there, rows)
        known = k.get("known")
        starts.append((k.get("start", 0), len(ids) if known is None else len(known[0]), len(ids)))
        return forward(ids, *a, **k)

    engine.forward = spy
    moved_off = False
    for first, kernels in STEM_EDITS:
        edits = engine.edits(plan_for(sm, embed=first == 0, **kernels))
        assert edits.first_layer == first
        starts.clear()
        got = ev.evaluate(edits, keep_texts=True)
        # prompt passes and on-track rows start late; rows off the original's track run every layer
        assert {s for s, _, _ in starts} <= {0, first} and any(s == first for s, _, _ in starts)
        moved_off |= any(s == first > 0 and 0 < n < b for s, n, b in starts)
        stems, ev._stems = ev._stems, None
        want = ev.evaluate(edits, keep_texts=True)
        ev._stems = stems
        assert got.completions == want.completions and got.negative_marker_rate == want.negative_marker_rate
        np.testing.assert_allclose(
            [got.kl, got.first_token_kl], [want.kl, want.first_token_kl], rtol=1e-4, atol=1e-11
        )
        assert want.kl > 1e-7  # the edit changes the model: a pass that skipped it would not match
    assert moved_off  # some row left the original's track mid-generation


def test_stems_keep_every_stride_th_layer_as_memory_allows(monkeypatch):
    from patcher.search import stems as objectives

    sm, engine, ev = _stem_evaluator("llama", tokens=4)
    per_layer = (
        2 * 4 * sm.hp.d_model * (sum(len(p) + 4 for p in ev.positive) + sum(len(p) + 1 for p in ev.negative))
    )
    monkeypatch.setattr(objectives, "STEM_MAX_BYTES", per_layer * 3 // 2)  # 3 layers at stride 2
    assert ev._kept() == {2}
    stem = objectives.Stem(rows={2: None}, kv={})
    assert [stem.start(first, True) for first in range(4)] == [0, 0, 2, 2]
    assert objectives.Stem(rows={1: None, 2: None}).start(2, needs_kv=True) == 0  # no keys/values kept
    ev2 = _stem_evaluator("llama", tokens=4)[2]
    monkeypatch.setattr(objectives, "STEM_MAX_BYTES", per_layer)  # stride 3: nothing kept
    assert ev2._kept() == set()
    assert objectives.kept_layers(7, 10, 1 << 40) == {1, 2, 3, 4, 5, 6}  # everything fits
    monkeypatch.setattr(objectives, "STEM_MAX_BYTES", 28)  # 70 bytes in 28: stride 2.5, rounded up
    assert objectives.kept_layers(7, 10, 1 << 40) == {3, 6}


# --- prompts run in length buckets, joined for generation ----------------------------------------


def test_buckets_keep_padding_within_the_slack(monkeypatch):
    from patcher.search import stems as objectives

    monkeypatch.setattr(objectives, "MIN_BUCKET", 10)
    # 4 rows of 5: 20 real tokens; a 6 would pad 4 of 30 (13 % > 10 %): new run; 6, 6 then 20 pads 28 of 60
    assert objectives.buckets([5, 5, 5, 5, 6, 6, 20]) == [slice(0, 4), slice(4, 6), slice(6, 7)]
    assert objectives.buckets([5, 5, 5, 5, 5, 5]) == [slice(0, 6)]  # no padding: one run
    assert objectives.buckets([2, 2, 9]) == [slice(0, 3)]  # 4 real tokens: too few to split off
    assert objectives.buckets([5, 5, 6]) == [slice(0, 2), slice(2, 3)]  # exactly MIN_BUCKET: may split
    monkeypatch.setattr(objectives, "MIN_BUCKET", 8)
    assert objectives.buckets([8, 10]) == [slice(0, 2)]  # pads exactly 10 %: allowed
    monkeypatch.setattr(objectives, "MIN_BUCKET", 10)  # a later run counts its own rows and tokens
    assert objectives.buckets([5, 5, 5, 5, 6, 6, 6, 6]) == [slice(0, 4), slice(4, 8)]
    monkeypatch.setattr(objectives, "MIN_BUCKET", 7)
    assert objectives.buckets([3, 4, 6, 20]) == [slice(0, 2), slice(2, 4)]  # 6 real tokens: too few
    assert objectives.buckets([]) == []


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "deepseek_v3"])
def test_prompts_in_length_buckets_give_the_one_batch_completions_and_kl(model_type, monkeypatch):
    """Buckets' caches joined right-aligned (zeros on the left, masked) decode as the one left-padded
    batch does (gemma3_text: a window of 4 counts positions), with and without the stem."""
    from test_search import plan_for

    from patcher.search import stems as objectives

    sm, engine, ev = _stem_evaluator(model_type, tokens=6, kl_tokens=2)
    ev.batch_size = 5
    edits = engine.edits(plan_for(sm, embed=False, **STEM_EDITS[0][1]))
    whole = [ev.evaluate(e, keep_texts=True) for e in (None, edits)]
    monkeypatch.setattr(objectives, "MIN_BUCKET", 1)
    joined = []
    engine.concat = lambda caches: joined.append(len(caches)) or en.ResidentModel.concat(caches)
    for want, e in zip(whole, (None, edits)):
        got = ev.evaluate(e, keep_texts=True)
        assert got.completions == want.completions
        np.testing.assert_allclose([got.kl, got.first_token_kl], [want.kl, want.first_token_kl], atol=1e-7)
    assert joined and max(joined) >= 3  # five rows of 7..15 tokens: in at least three runs


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v3", "gemma3_text"])
def test_rows_resuming_at_a_layer_give_the_full_passs_logits_and_cache(model_type):
    """One decode step where rows 0 and 2 resume at layer 2 from the residual and keys/values a full
    pass computed, row 1 runs every layer: same logits and the same cache, column for column, so the
    next full step (which reads every layer's keys) gives the same logits too."""
    from test_search import plan_for

    sm = StreamedModel(Checkpoint(fixture_path(model_type)))
    engine = en.ResidentModel(sm)
    edits = engine.edits(plan_for(sm, embed=False, **STEM_EDITS[1][1]))
    ids, mask = left_pad([[5, 9, 13, 4], [7, 3], [11, 12, 8]], 0)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    caches = [{}, {}]
    for c in caches:
        engine.forward(ids, mask, pos, c, edits)
    step, mask2, pos2 = (
        np.array([[21], [22], [23]]),
        np.concatenate([mask, np.ones((3, 1), int)], 1),
        pos[:, -1:] + 1,
    )
    trace = {2: None}
    want = engine.forward(step, mask2, pos2, caches[0], edits, trace=trace)
    rows = np.array([0, 2])
    kv = {layer: (k[rows, :, n - 1 : n], v[rows, :, n - 1 : n]) for layer, (k, v, n) in caches[0].items()}
    got = engine.forward(step, mask2, pos2, caches[1], edits, start=2, known=(rows, trace[2][rows], kv))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for layer, (k, v, n) in caches[0].items():
        np.testing.assert_allclose(caches[1][layer][0][:, :, :n], k[:, :, :n], atol=1e-5)
        np.testing.assert_allclose(caches[1][layer][1][:, :, :n], v[:, :, :n], atol=1e-5)
    mask3, pos3 = np.concatenate([mask2, np.ones((3, 1), int)], 1), pos2 + 1
    a, b = (engine.forward(np.array([[30], [31], [32]]), mask3, pos3, c, edits) for c in caches)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_a_row_is_on_track_while_its_tokens_are_the_originals():
    from patcher.search.stems import Decoding, Group, Track

    track = Track(tokens=[[5, 6, 7], [5, 8]], steps=[None, None])  # two decode steps recorded
    dec = Decoding(None, None, None, Group(np.arange(2), {}, np.ones((2, 1)), np.ones((2, 1))), track, 1)
    assert dec.on.tolist() == [True, True]
    assert dec._on_track(0, [0, 1], [5, 5]).tolist() == [True, True]
    assert dec._on_track(1, [0, 1], [6, 6]).tolist() == [True, False]
    assert dec._on_track(2, [0, 1], [7, 7]).tolist() == [False, False]  # past the recorded steps
    ended = Track(tokens=[[5, 6, 7], [5]], steps=[None, None, None])  # row 1's original stopped at EOS
    dec = Decoding(None, None, None, Group(np.arange(2), {}, np.ones((2, 1)), np.ones((2, 1))), ended, 1)
    assert dec._on_track(1, [0, 1], [6, 9]).tolist() == [True, False]
    assert not Decoding(None, None, None, Group(np.arange(2), {}, None, None), track, 0).on.any()
