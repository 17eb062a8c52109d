"""`ablate --adapter`: PEFT itself is the oracle. The adapter loaded on the base model must compute what
the merged checkpoint that `patcher ablate -o` writes computes, and PEFT's own merge_and_unload must give
back that checkpoint's weights.

Tolerances. On float32 copies of the fixtures both sides run in fp32 and differ only by summation order
(W'x vs Wx + B(Ax), A accumulated in float64 then rounded to fp32): elementwise weight differences are
a few fp32 ulps of |W| ~ 1 (measured ≤ 5e-7) and logits (|z| ≲ 10, three layers) agree to ~1e-5; we allow
1e-6 on weights and 1e-4 on logits. On the bf16 fixtures patcher rounds W' once to bf16 (round to nearest):
PEFT's fp32 merge rounded the same way must be within 1 bf16 ulp.
"""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import fixture_path, run_cli, unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

# (fixture, extra ablate options): dense, qkv-bias, post-norm (u instead of r̂), tied embeddings,
# GPT-2 Conv1D with writer biases (lora_bias) and its tied + positional embeddings, MoE (fused experts).
CASES = [
    ("llama", ()),
    ("qwen2", ()),
    ("gemma2", ()),
    ("olmo2", ()),
    ("gemma", ()),
    ("gpt2", ("--targets", "attn_out,mlp_out")),
    ("gpt2", ("--targets", "embed")),
    ("gpt_neox", ("--targets", "attn_out,mlp_out")),
    ("phi3", ()),
    ("qwen2_moe", ()),
    ("qwen3_moe", ()),
    ("mixtral", ()),
    ("deepseek_v3", ("--targets", "embed,attn_out")),
    ("llama", ("--scale", "0.6", "--layers", "1-2")),
]


def f32_copy(model_type, dst):
    """The fixture with every tensor in float32, so the comparison sees no bf16 rounding."""
    src = fixture_path(model_type)
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return dst


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_untied(folder):
    """PEFT's advice for merging into a tied model: load it untied, lm_head a copy of the embedding."""
    if not transformers.AutoConfig.from_pretrained(folder).tie_word_embeddings:
        return load(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, tie_word_embeddings=False
    )
    model.get_output_embeddings().weight.data = model.get_input_embeddings().weight.data.clone()
    return model.eval()


def ids():
    return torch.tensor(np.random.default_rng(1).integers(3, 380, size=(2, 12)))


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits.double().numpy()


def ablate_both(src, tmp_path, direction, opts):
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    run_cli("ablate", src, "-d", direction, "-o", merged, *opts)
    run_cli("ablate", src, "-d", direction, "--adapter", adapter, *opts)
    return merged, adapter


@pytest.mark.parametrize(
    "model_type,opts", CASES, ids=lambda c: c if isinstance(c, str) else "-".join(c) or "all"
)
def test_peft_adapter_equals_merged_checkpoint(model_type, opts, tmp_path, direction64):
    src = f32_copy(model_type, tmp_path / "base")
    merged, adapter = ablate_both(src, tmp_path, direction64, opts)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 1
    want = load(merged)
    base = load(src)
    z0 = logits(base)
    model = peft.PeftModel.from_pretrained(base, adapter)
    z = logits(model)
    zm = logits(want)
    assert np.abs(zm - z0).max() > 1e-2, "the edit must change the logits, or the test says nothing"
    assert np.abs(z - zm).max() <= 1e-4, np.abs(z - zm).max()
    # PEFT's own merge gives back patcher's weights, every parameter. A tied base is merged as PEFT
    # advises, loaded untied: merging into the one shared matrix would add ΔW twice.
    if want.config.tie_word_embeddings:
        model = peft.PeftModel.from_pretrained(load_untied(src), adapter)
        assert np.abs(logits(model) - zm).max() <= 1e-4
    merged_model = model.merge_and_unload()
    got = dict(merged_model.named_parameters())
    for name, p in want.named_parameters():
        assert name in got, name
        if name.startswith("lm_head") or name == "embed_out.weight":
            continue  # tied: the want side has no lm_head parameter of its own
        diff = (got[name].detach() - p.detach()).abs().max().item()
        assert diff <= 1e-6, (name, diff)
    head = dict(want.named_parameters()).get("lm_head.weight", want.get_input_embeddings().weight)
    diff = (merged_model.get_output_embeddings().weight.detach() - head.detach()).abs().max().item()
    assert diff <= 1e-6, ("unembedding", diff)


def test_rank_k_adapter(tmp_path):
    src = f32_copy("qwen3", tmp_path / "base")
    v = np.random.default_rng(3).standard_normal((2, 64))
    np.save(tmp_path / "dirs.npy", v)
    merged, adapter = ablate_both(src, tmp_path, tmp_path / "dirs.npy", ())
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    model = peft.PeftModel.from_pretrained(load(src), adapter)
    assert np.abs(logits(model) - logits(load(merged))).max() <= 1e-4


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_bf16_merge_within_one_ulp_of_patcher(model_type, tmp_path, direction64):
    from patcher_kernels.codecs import ulp_distance

    merged, adapter = ablate_both(fixture_path(model_type), tmp_path, direction64, ())
    model = peft.PeftModel.from_pretrained(load_untied(fixture_path(model_type)), adapter).merge_and_unload()
    got = {n: p.detach().numpy() for n, p in model.named_parameters()}
    for n, p in load(merged).named_parameters():
        a = got[n].astype(ml_dtypes.bfloat16)
        assert ulp_distance(a, p.detach().numpy().astype(ml_dtypes.bfloat16), "BF16").max() <= 1, n


def test_adapter_is_the_factored_projection(tmp_path, direction64):
    """Hand-computed: B = -r̂, A = r̂ᵀW for a Linear writer; A = (W r̂)ᵀ for the embedding."""
    from patcher.io.checkpoint import Checkpoint

    adapter = tmp_path / "ad"
    run_cli("ablate", fixture_path("llama"), "-d", direction64, "--adapter", adapter)
    r = unit(np.load(direction64))
    t = {k: v.numpy().astype(np.float64) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    ck = Checkpoint(fixture_path("llama"))
    w = ck.array("model.layers.1.mlp.down_proj.weight").astype(np.float64)
    key = "base_model.model.model.layers.1.mlp.down_proj"
    np.testing.assert_allclose(t[key + ".lora_B.weight"][:, 0], -r, atol=1e-7)
    np.testing.assert_allclose(t[key + ".lora_A.weight"][0], r @ w, atol=1e-6)
    e = ck.array("model.embed_tokens.weight").astype(np.float64)
    np.testing.assert_allclose(t["base_model.model.model.embed_tokens.lora_embedding_A"][0], e @ r, atol=1e-6)
    assert (adapter / "patcher-manifest.json").is_file()


@pytest.mark.parametrize(
    "opts,message",
    [
        (("--norm-preserve", "cols"), "not a low-rank change"),
        (("--untie-embeddings",), "cannot untie"),
    ],
)
def test_adapter_refusals(opts, message, tmp_path, direction64):
    res = run_cli(
        "ablate", fixture_path("gemma"), "-d", direction64, "--adapter", tmp_path / "ad", *opts, expect=1
    )
    assert message in res.output and not (tmp_path / "ad").exists()


def test_adapter_refuses_unverified_experts(tmp_path, direction64):
    res = run_cli(
        "ablate", fixture_path("deepseek_v3"), "-d", direction64, "--adapter", tmp_path / "ad", expect=1
    )
    assert "no known PEFT target" in res.output and not (tmp_path / "ad").exists()
    run_cli(
        "ablate",
        fixture_path("deepseek_v3"),
        "-d",
        direction64,
        "--adapter",
        tmp_path / "ad",
        "--targets",
        "attn_out",
    )


def test_adapter_refuses_bias_plus_embedding_and_gguf_bias(tmp_path, direction64):
    res = run_cli("ablate", fixture_path("gpt2"), "-d", direction64, "--adapter", tmp_path / "ad", expect=1)
    assert "lora_bias" in res.output
    res = run_cli(
        "ablate",
        fixture_path("gpt2"),
        "-d",
        direction64,
        "--adapter",
        tmp_path / "a.gguf",
        "--targets",
        "attn_out,mlp_out",
        expect=1,
    )
    assert "carry no biases" in res.output and not (tmp_path / "a.gguf").exists()


def test_adapter_output_rules(tmp_path, direction64, model_copy):
    src = model_copy("llama")
    res = run_cli("ablate", src, "-d", direction64, "--adapter", src / "ad", expect=1)
    assert "inside the input" in res.output
    res = run_cli("ablate", src, "-d", direction64, "--adapter", src / "ad.gguf", expect=1)
    assert "inside the input" in res.output and not (src / "ad.gguf").exists()
    res = run_cli("ablate", src, "-d", direction64, expect=1)
    assert "exactly one" in res.output
    out = tmp_path / "a.gguf"
    run_cli("ablate", src, "-d", direction64, "--adapter", out)
    res = run_cli("ablate", src, "-d", direction64, "--adapter", out, expect=1)
    assert "already exists" in res.output
    run_cli("ablate", src, "-d", direction64, "--adapter", out, "--force")
    assert not list(tmp_path.glob(".a.gguf.partial-*"))


def test_fp8_adapter_uses_the_dequantized_weights(tmp_path, direction64):
    """FP8 block-scaled weights: A = r̂ᵀ(q·scale), no re-rounding (the adapter keeps the edit exact)."""
    from patcher_kernels.fp8 import dequantize_blocks
    from test_fp8 import make_fp8_model

    from patcher.io.checkpoint import Checkpoint

    src = make_fp8_model(tmp_path, "BF16")
    adapter = tmp_path / "ad"
    run_cli("ablate", src, "-d", direction64, "--adapter", adapter, "--targets", "attn_out")
    t = load_file(adapter / "adapter_model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    with Checkpoint(src) as ck:
        scale = ck.array(name + "_scale_inv").astype(np.float32)
        w = dequantize_blocks(ck.array(name), scale).astype(np.float64)
    r = unit(np.load(direction64))
    got = t["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].numpy()[0].astype(np.float64)
    np.testing.assert_allclose(got, r @ w, rtol=1e-6, atol=1e-6 * np.abs(r @ w).max())


def test_adapter_dry_run_writes_nothing(tmp_path, direction64):
    res = run_cli(
        "ablate", fixture_path("llama"), "-d", direction64, "--adapter", tmp_path / "a.gguf", "--dry-run"
    )
    assert "would write a gguf LoRA adapter of rank 1" in res.output and not list(tmp_path.iterdir())
    res = run_cli(
        "ablate", fixture_path("gpt2"), "-d", direction64, "--adapter", tmp_path / "a", "--dry-run", expect=1
    )  # refusals come before the plan is shown
    assert "lora_bias" in res.output and not list(tmp_path.iterdir())
