"""The numpy forward against HF transformers: tiny random models of every supported architecture,
created and saved by transformers itself, on a left-padded batch; resid_pre and logits agree to
1e-4 relative in float32, and each padded row equals the same prompt run alone."""

import numpy as np
import pytest

from patcher.io.checkpoint import Checkpoint
from patcher.model.execution import StreamedModel

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON, rope_parameters=ROPE_LLAMA3, attention_bias=True, mlp_bias=True),
    "mistral": lambda: T.MistralConfig(**COMMON, sliding_window=4),
    "qwen2": lambda: T.Qwen2Config(**COMMON),
    "qwen3": lambda: T.Qwen3Config(**COMMON),
    "gemma": lambda: T.GemmaConfig(**COMMON),
    "gemma2": lambda: T.Gemma2Config(**COMMON, sliding_window=4, query_pre_attn_scalar=24),
    "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, sliding_window=4, sliding_window_pattern=2),
    "olmo2": lambda: T.Olmo2Config(**COMMON),
    "phi3": lambda: T.Phi3Config(
        **{k: v for k, v in COMMON.items() if k != "head_dim"}, partial_rotary_factor=0.5, sliding_window=4
    ),
    "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=64),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=128,
        rotary_pct=0.5,
    ),
    "gpt_neox_sequential": lambda: T.GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=128,
        use_parallel_residual=False,
    ),
    # sliding_window set: HF then slides every layer of Mixtral and Phi-3, as Mistral
    "mixtral": lambda: T.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=4
    ),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(
        **COMMON,
        **MOE,
        num_experts=4,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, **MOE, num_experts=4, norm_topk_prob=True),
    "deepseek_v3": lambda: T.DeepseekV3Config(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        pad_token_id=0,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    "deepseek_v3_no_q_lora": lambda: T.DeepseekV3Config(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
        pad_token_id=0,
        rope_interleave=False,
    ),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    made = {}

    def get(name):
        if name not in made:
            torch.manual_seed(0)
            model = T.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
            with torch.no_grad():  # non-trivial norm gains and biases, so their handling matters
                for pname, p in model.named_parameters():
                    if "norm" in pname or "ln" in pname or pname.endswith("bias"):
                        p.add_(torch.randn_like(p) * 0.2)
                for bname, b in model.named_buffers():  # DeepSeek's router correction bias
                    if bname.endswith("e_score_correction_bias"):
                        b.add_(torch.randn_like(b) * 0.1)
            model.save_pretrained(root / name)
            made[name] = model
        return made[name], root / name

    return get


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 120, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


def ours(folder, ids, mask):
    got = {}
    with Checkpoint(folder) as ck:
        logits = StreamedModel(ck).run(
            ids, mask, on_resid=lambda l, x: got.__setitem__(l, x.copy()), logits=True
        )
    return [got[l] for l in sorted(got)], logits


def rel(a, b, real):
    return float(np.abs(a - b)[real].max() / np.abs(b[real]).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resid_pre_and_logits_match_hf(hf_models, name):
    model, folder = hf_models(name)
    ids, mask = batch()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
            output_hidden_states=True,
        )
    hs = [h.numpy() for h in out.hidden_states]
    resid, logits = ours(folder, ids, mask)
    real = mask.astype(bool)
    assert len(resid) == model.config.num_hidden_layers + 1
    for l in range(len(resid) - 1):  # HF's last entry is after the final norm for most models
        assert rel(resid[l], hs[l], real) <= 1e-4, f"resid_pre[{l}]"
    assert rel(logits, out.logits.numpy(), real) <= 1e-4


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "qwen2_moe"])
def test_left_padding_equals_unpadded(hf_models, name):
    _, folder = hf_models(name)
    ids, mask = batch()
    resid, _ = ours(folder, ids, mask)
    for row in (1, 2):
        n_pad = int((mask[row] == 0).sum())
        alone, _ = ours(folder, ids[row : row + 1, n_pad:], mask[row : row + 1, n_pad:])
        for l in range(len(resid)):
            np.testing.assert_allclose(resid[l][row, n_pad:], alone[l][0], rtol=1e-4, atol=1e-5)


def test_chunked_batches_equal_one_chunk(hf_models):
    """Layer-outer execution over several batches gives the same states whatever the chunking."""
    _, folder = hf_models("qwen3_moe")
    ids, mask = batch()
    batches = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    with Checkpoint(folder) as ck:
        sm = StreamedModel(ck)
        runs = []
        for budget in (1, 1 << 30):  # one batch per chunk, then both in one chunk
            got = {}
            sm.run_many(
                batches, on_resid=lambda b, l, x: got.__setitem__((b, l), x.copy()), budget_bytes=budget
            )
            runs.append(got)
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 2 * 4
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key])
