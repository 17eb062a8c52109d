"""`patcher extract`: difference in means equal to an HF transformers reference, a planted direction
recovered and ranked, the directions file feeding ablate/inject, and the options."""

import json
import shutil

import numpy as np
import pytest
from conftest import DEMO, fixture_path, run_cli, unit

from patcher.edit.directions import read_metadata
from patcher.edit.extract import extract
from patcher.io.checkpoint import Checkpoint

POS = DEMO / "positive.txt"
NEG = DEMO / "negative.txt"
PLANTED = DEMO / "model"


def hf_difference_in_means(folder, pos_prompts, neg_prompts, winsorize=None):
    """Reference: HF tokenizer + chat template, HF forward, mean last-token hidden state per layer
    (each hidden state clamped to ± its `winsorize`-quantile absolute component first, if given)."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    tok = T.AutoTokenizer.from_pretrained(folder)
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    means = []
    for prompts in (pos_prompts, neg_prompts):
        rows = []
        for p in prompts:  # one at a time: no padding in the reference at all
            ids = tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            with torch.no_grad():
                hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            row = np.stack([h[0, -1].double().numpy() for h in hs[:-1]])  # last HF entry is post-norm
            if winsorize is not None:
                t = np.array([np.quantile(np.abs(r), winsorize) for r in row])[:, None]
                row = np.minimum(np.maximum(row, -t), t)
            rows.append(row)
        means.append(np.mean(rows, axis=0))
    return means[0] - means[1], np.abs(means[0]).max(axis=1)


@pytest.mark.parametrize(
    "model_type", ["llama", "gemma2", "qwen3_moe", "gpt2", "olmo2", "phi3", "deepseek_v3"]
)
def test_difference_in_means_matches_hf(model_type):
    pos = POS.read_text().splitlines()[:10]
    neg = NEG.read_text().splitlines()[:10]
    want, scale = hf_difference_in_means(fixture_path(model_type), pos, neg)
    got = extract(fixture_path(model_type), pos, neg, batch_size=4)  # batched, left-padded
    for l in range(want.shape[0]):  # relative to the size of the activations being averaged
        assert np.abs(got.direction[l] - want[l]).max() <= 1e-4 * scale[l], f"layer {l}"
    assert np.abs(want[1:]).max() > 1e-2  # the sets do differ, so the comparison means something


def test_winsorized_means_match_hf():
    pos = POS.read_text().splitlines()[:8]
    neg = NEG.read_text().splitlines()[:8]
    want, scale = hf_difference_in_means(fixture_path("llama"), pos, neg, winsorize=0.9)
    plain, _ = hf_difference_in_means(fixture_path("llama"), pos, neg)
    got = extract(fixture_path("llama"), pos, neg, batch_size=4, winsorize=0.9)
    for l in range(want.shape[0]):
        assert np.abs(got.direction[l] - want[l]).max() <= 1e-4 * scale[l], f"layer {l}"
    assert np.abs(want[1:] - plain[1:]).max() > 1e-2  # clamping changed the means: the check can fail
    assert got.metadata["winsorize"] == 0.9


@pytest.mark.parametrize("q", ["1.0", "0", "-0.5", "nan"])
def test_winsorize_out_of_range_is_refused(tmp_path, q):
    out = tmp_path / "d.safetensors"
    r = run_cli(
        "extract", PLANTED, "--positive", POS, "--negative", NEG, "-o", out, "--winsorize", q, expect=1
    )
    assert "--winsorize" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_planted_direction_is_recovered_and_ranked_first(tmp_path):
    out = tmp_path / "d.safetensors"
    res = run_cli("extract", PLANTED, "--positive", POS, "--negative", NEG, "-o", out, "--no-chat-template")
    v = np.load(DEMO / "planted-direction.npy")
    with Checkpoint(out) as ck:
        d = ck.array("direction")
        meta = read_metadata(ck)
    assert float(unit(d[0]) @ unit(v)) >= 0.99
    assert meta["selected_layer"] == 0
    snr = {s["layer"]: s["snr"] for s in meta["scores"] if s.get("snr") is not None}
    assert max(snr, key=snr.get) == 0
    assert "selected: 0" in res.output


def test_directions_file_format_and_feeds_ablate_and_inject(tmp_path):
    out = tmp_path / "d.safetensors"
    run_cli("extract", PLANTED, "--positive", POS, "--negative", NEG, "-o", out, "--max-prompts", "12")
    with Checkpoint(out) as ck:
        for name in ("direction", "positive_mean", "negative_mean"):
            assert ck.tensors[name].dtype == "F32" and ck.tensors[name].shape == (4, 64)
        np.testing.assert_allclose(
            ck.array("direction"), ck.array("positive_mean") - ck.array("negative_mean"), atol=1e-5
        )
        meta = read_metadata(ck)
    assert meta["prompts"]["positive"]["count"] == 12 and len(meta["prompts"]["positive"]["sha256"]) == 64
    assert meta["chat_template"] is True and meta["positions"] == [-1] and meta["model"] == str(PLANTED)
    assert isinstance(meta["selected_layer"], int) and len(meta["scores"]) == 4
    run_cli("ablate", PLANTED, "-d", out, "-o", tmp_path / "abl")
    run_cli("inject", PLANTED, "-d", f"{out}:2", "-o", tmp_path / "inj", "--layer", "1", "--alpha", "2")
    prov = json.loads(run_cli("inspect", tmp_path / "abl", "--json").output)["provenance"]
    assert prov["direction"] == str(out)


def test_several_positions_and_projected_variant(tmp_path):
    r = extract(PLANTED, POS, NEG, positions=(-1, -2), project_out_negative_mean=True, max_prompts=8)
    assert set(r.per_position) == {-1, -2}
    neg = r.negative_mean.astype(np.float64)
    nonzero = [l for l in range(r.direction.shape[0]) if np.linalg.norm(r.direction[l]) > 0]
    assert len(nonzero) >= 3
    for l in nonzero:
        assert abs(unit(r.direction[l]) @ unit(neg[l])) < 1e-5
    r.save(tmp_path / "d.safetensors")
    with Checkpoint(tmp_path / "d.safetensors") as ck:
        assert {"direction.pos-1", "direction.pos-2", "positive_mean.pos-2"} <= set(ck.tensors)
        plain = ck.array("direction.pos-1") + ck.array("direction.pos-2")
        assert plain.shape == (4, 64)


def test_per_position_means_match_a_prompt_by_prompt_reference(tmp_path):
    """Each position's means and direction equal resid_pre at that position, prompt by prompt (no
    batching, no padding), averaged in float64; the overall direction is their average."""
    from patcher.model.execution import StreamedModel
    from patcher.model.prompts import encode_prompts, load_tokenizer, read_prompt_file

    positions = (-1, -2, -3)
    r = extract(PLANTED, POS, NEG, positions=positions, max_prompts=6, batch_size=4, chat_template=False)
    tok, sm = load_tokenizer(PLANTED), StreamedModel(PLANTED)
    means = {}
    for label, path in (("positive", POS), ("negative", NEG)):
        rows = {p: [] for p in positions}
        for ids in encode_prompts(tok, read_prompt_file(path, 6), chat_template=False):
            states = {}
            sm.run(
                np.array([ids]),
                np.ones((1, len(ids)), np.int64),
                on_resid=lambda l, x: states.__setitem__(l, x[0].astype(np.float64)),
            )
            for p in positions:
                rows[p].append(np.stack([states[l][p] for l in sorted(states)]))
        means[label] = {p: np.mean(rows[p], axis=0) for p in positions}
    scale = max(np.abs(m).max() for m in means["positive"].values())
    for p in positions:
        d, pm, nm = r.per_position[p]
        assert np.abs(pm - means["positive"][p]).max() <= 1e-5 * scale, p
        assert np.abs(nm - means["negative"][p]).max() <= 1e-5 * scale, p
        assert np.abs(d - (means["positive"][p] - means["negative"][p])).max() <= 2e-5 * scale, p
        assert np.linalg.norm(d[1:]) > 0.1  # the sets differ at every position
    overall = np.mean([means["positive"][p] - means["negative"][p] for p in positions], axis=0)
    assert np.abs(r.direction - overall).max() <= 2e-5 * scale
    # the positions really differ from each other (a per-position bug copying one would be seen)
    assert np.abs(r.per_position[-1][0] - r.per_position[-3][0]).max() > 0.1


def test_layers_option_and_plot(tmp_path):
    out = tmp_path / "d.safetensors"
    run_cli(
        "extract",
        PLANTED,
        "--positive",
        POS,
        "--negative",
        NEG,
        "-o",
        out,
        "--layers",
        "0-1",
        "--plot",
        tmp_path / "s.svg",
        "--no-chat-template",
    )
    svg = (tmp_path / "s.svg").read_text()
    assert svg.startswith("<svg") and "<polyline" in svg and "selected 0" in svg
    with Checkpoint(out) as ck:
        d = ck.array("direction")
        assert np.all(d[2:] == 0) and np.all(np.linalg.norm(d[:2], axis=1) > 0)
    res = run_cli("ablate", PLANTED, "-d", f"{out}:3", "-o", tmp_path / "x", expect=1)
    assert "zero norm" in res.output


def test_unsafe_chat_template_refused(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(PLANTED, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    res = run_cli(
        "extract", src, "--positive", POS, "--negative", NEG, "-o", tmp_path / "d.safetensors", expect=1
    )
    assert "unsafe" in res.output and not (tmp_path / "d.safetensors").exists()


def test_prompt_shorter_than_positions_is_an_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("sea\n")
    res = run_cli(
        "extract",
        PLANTED,
        "--positive",
        short,
        "--negative",
        NEG,
        "-o",
        tmp_path / "d.safetensors",
        "--no-chat-template",
        "--positions",
        "-1,-2,-3",
        expect=1,
    )
    assert "tokens" in res.output


@pytest.mark.parametrize("model_type", [m for m in __import__("conftest").MODEL_TYPES])
def test_injected_bias_is_live_in_the_numpy_forward(model_type, tmp_path, direction64):
    """Every architecture table's mlp_out injection slot is one the forward description applies:
    the output of block L gains exactly alpha * r, whether or not HF could load the bias."""
    from patcher.model.execution import StreamedModel

    layer, alpha = 1, 2.5
    out = tmp_path / "inj"
    run_cli(
        "inject", fixture_path(model_type), "-d", direction64, "-o", out, "--layer", layer, "--alpha", alpha
    )
    ids = np.random.default_rng(2).integers(3, 380, size=(2, 6))
    mask = np.ones_like(ids)
    states = []
    for folder in (fixture_path(model_type), out):
        got = {}
        with Checkpoint(folder) as ck:
            StreamedModel(ck).run(ids, mask, on_resid=lambda l, x: got.__setitem__(l, x.astype(np.float64)))
        states.append(got)
    for l in range(layer + 1):
        np.testing.assert_allclose(states[1][l], states[0][l], atol=1e-6)
    stored = Checkpoint(out)  # the bias as stored (bf16-rounded alpha * r)
    name = json.loads(run_cli("inspect", out, "--json").output)["provenance"]["bias"]
    want = stored.array(name).astype(np.float64)
    with Checkpoint(fixture_path(model_type)) as base:  # GPT-2 / NeoX: the bias existed and was shifted
        if name in base.tensors:
            want = want - base.array(name).astype(np.float64)
    np.testing.assert_allclose(
        states[1][layer + 1] - states[0][layer + 1], np.broadcast_to(want, (2, 6, 64)), atol=1e-4
    )


def test_shuffled_label_snr_matches_isotropic_noise_theory():
    """Labels carry nothing: the best shuffled SNR sits near sqrt(d·(1/n+ + 1/n-)) (the in-sample fit's
    bias); the same data with a real offset of 3σ along one axis scores far above it."""
    from patcher.edit.extract import _snr, shuffled_snr

    rng = np.random.default_rng(5)
    n, d = 40, 64
    pos, neg = rng.standard_normal((n, 1, d)), rng.standard_normal((n, 1, d))
    theory = np.sqrt(d * 2 / n)
    null = shuffled_snr(pos, neg, [0])
    assert 0.8 * theory < null < 1.6 * theory
    pos[:, 0, 0] += 3.0
    assert _snr(pos[:, 0], neg[:, 0]) > 1.5 * null


def test_extract_warns_when_the_sets_do_not_differ(tmp_path):
    """One prompt set split at random: the direction is noise and extract says so, on stderr, with the
    chat-template hint; the planted sets without a template get no warning."""
    lines = [ln for ln in NEG.read_text().splitlines() if ln]
    np.random.default_rng(1).shuffle(lines)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(lines[:24]) + "\n")
    b.write_text("\n".join(lines[24:]) + "\n")
    res = run_cli("extract", PLANTED, "--positive", a, "--negative", b, "-o", tmp_path / "noise.safetensors")
    assert "weak direction" in res.stderr and "--no-chat-template" in res.stderr
    meta = read_metadata(Checkpoint(tmp_path / "noise.safetensors"))
    best = next(r["snr"] for r in meta["scores"] if r["layer"] == meta["selected_layer"])
    assert best <= 1.25 * meta["shuffled_labels_snr"]
    res = run_cli(
        "extract",
        PLANTED,
        "--positive",
        POS,
        "--negative",
        NEG,
        "--no-chat-template",
        "-o",
        tmp_path / "planted.safetensors",
    )
    assert "weak direction" not in res.stderr
    meta = read_metadata(Checkpoint(tmp_path / "planted.safetensors"))
    best = next(r["snr"] for r in meta["scores"] if r["layer"] == meta["selected_layer"])
    assert best > 10 * meta["shuffled_labels_snr"]


def test_snr_against_a_float64_hand_computation():
    from patcher.edit.extract import _snr

    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((30, 8)) + 0.4, rng.standard_normal((20, 8))
    r = a.mean(0) - b.mean(0)
    r /= np.linalg.norm(r)
    pa, pb = a @ r, b @ r
    want = (pa.mean() - pb.mean()) / np.sqrt((pa.var() + pb.var()) / 2)
    assert _snr(a, b) == pytest.approx(want, rel=1e-12)
    assert _snr(a, a) == 0.0  # no difference at all: no direction, no signal
    assert _snr(np.ones((3, 4)), np.zeros((2, 4))) == float("inf")  # no spread along the difference


def test_shuffled_snr_is_small_when_prompts_outnumber_dimensions():
    """n >> d: the in-sample bias vanishes, so the null sits near sqrt(d·(1/n+ + 1/n-)) = 0.14, not at
    any floor."""
    from patcher.edit.extract import shuffled_snr

    rng = np.random.default_rng(3)
    null = shuffled_snr(rng.standard_normal((400, 1, 4)), rng.standard_normal((400, 1, 4)), [0])
    assert 0.05 < null < 0.4


def test_selection_ignores_the_last_fifth_of_layers():
    """L = 10: resid_pre layers 0..8 are candidates (floor(0.8·10)); 9 and 10 never win."""
    from patcher.edit.extract import select_layer

    rows = [{"layer": i, "snr": 1.0, "diff_norm": 1.0} for i in range(11)]
    rows[9]["snr"] = rows[10]["snr"] = 50.0
    rows[8]["snr"] = 5.0
    assert select_layer(rows, 10) == 8
    rows[8]["snr"] = 1.0
    rows[3]["diff_norm"] = 2.0  # ties go to the larger mean difference
    assert select_layer(rows, 10) == 3
