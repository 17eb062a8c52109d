"""HF transformers as the oracle: fixtures load strictly, ablated models no longer carry the
direction in any residual stream state, and injected biases show up as +alpha*r in HF."""

import numpy as np
import pytest
from conftest import MODEL_TYPES, fixture_path, run_cli, unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Where each architecture keeps its decoder blocks in the HF module tree.
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
# Which injection targets HF loads as a live bias (from the architecture tables' hf_loads).
HF_INJECT = {
    ("llama", "mlp_out"),
    ("llama", "attn_out"),
    ("qwen3", "attn_out"),
    ("qwen3_moe", "attn_out"),
    ("gemma", "attn_out"),
    ("deepseek_v3", "attn_out"),
    ("gpt2", "mlp_out"),
    ("gpt2", "attn_out"),
    ("gpt_neox", "mlp_out"),
    ("gpt_neox", "attn_out"),
}
ATTN_MODULE = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense"}


def load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def blocks(model, model_type):
    return model.get_submodule(BLOCKS.get(model_type, "model.layers"))


def resid_pre(model, model_type, ids):
    """resid_pre[l] for l = 0..L: inputs of every block plus the output of the last one."""
    states = []
    layers = blocks(model, model_type)

    def pre(_m, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def post(_m, _args, output):
        states.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    hooks = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in layers]
    hooks.append(layers[-1].register_forward_hook(post))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    return [s.double().numpy() for s in states]


def tokens():
    return torch.tensor(np.random.default_rng(0).integers(3, 380, size=(2, 10)))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fixture_loads_strictly_in_hf(model_type):
    model, info = load(fixture_path(model_type))
    assert model.config.model_type == model_type
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ablated_hidden_states_carry_no_direction(model_type, tmp_path, direction64):
    out = tmp_path / "out"
    run_cli("ablate", fixture_path(model_type), "-d", direction64, "-o", out)
    r = unit(np.load(direction64))
    ids = tokens()
    before = resid_pre(load(fixture_path(model_type))[0], model_type, ids)
    model, info = load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    after = resid_pre(model, model_type, ids)
    assert len(after) == model.config.num_hidden_layers + 1
    for l, (h0, h) in enumerate(zip(before, after)):
        ratio = np.abs(h @ r) / np.linalg.norm(h, axis=-1)
        assert ratio.max() <= 1e-2, f"resid_pre[{l}]: |r·h|/|h| = {ratio.max():.3g}"
        # the original model did carry it, so the check is not vacuous
        assert (np.abs(h0 @ r) / np.linalg.norm(h0, axis=-1)).max() > 5e-2


@pytest.mark.parametrize("model_type,target", sorted(HF_INJECT))
def test_injection_is_live_in_hf(model_type, target, tmp_path, direction64):
    layer, alpha = 1, 3.0
    out = tmp_path / "out"
    run_cli(
        "inject",
        fixture_path(model_type),
        "-d",
        direction64,
        "-o",
        out,
        "--layer",
        layer,
        "--alpha",
        alpha,
        "--target",
        target,
    )
    r = unit(np.load(direction64))
    ids = tokens()
    base = load(fixture_path(model_type))[0]
    model, info = load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    h0, h1 = resid_pre(base, model_type, ids), resid_pre(model, model_type, ids)
    for l in range(layer + 1):  # zero sibling biases change nothing upstream
        np.testing.assert_allclose(h1[l], h0[l], atol=1e-5)
    if target == "mlp_out" or model_type == "gpt_neox":  # last writer of the block (NeoX: parallel)
        diff = h1[layer + 1] - h0[layer + 1]
    else:  # attention output feeds the MLP, so compare the attention writer's own output
        diff = attn_output(model, model_type, layer, ids) - attn_output(base, model_type, layer, ids)
    np.testing.assert_allclose(diff, np.broadcast_to(alpha * r, diff.shape), atol=2e-2 * alpha)


def attn_output(model, model_type, layer, ids):
    mod = blocks(model, model_type)[layer].get_submodule(ATTN_MODULE.get(model_type, "self_attn.o_proj"))
    got = []
    h = mod.register_forward_hook(lambda _m, _a, o: got.append(o.detach().double().numpy()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        h.remove()
    return got[0]


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "mixtral", "gemma2", "olmo2"])
def test_injection_without_hf_slot_is_written_and_reported(model_type, tmp_path, direction64):
    out = tmp_path / "out"
    res = run_cli(
        "inject", fixture_path(model_type), "-d", direction64, "-o", out, "--layer", 0, "--alpha", 2.0
    )
    assert "ONNX export" in res.output and "no bias slot" in res.output
    from patcher.io.checkpoint import Checkpoint

    with Checkpoint(out) as ck:
        new = [n for n in ck.tensors if n not in Checkpoint(fixture_path(model_type)).tensors]
        assert len(new) == 1
        np.testing.assert_allclose(
            ck.array(new[0]).astype(np.float64), 2.0 * unit(np.load(direction64)), atol=2e-2
        )
