"""FP8 block-scaled checkpoints. The deepseek_v3 fixture stored FP8 (make_fp8_model, which other tests
use too) ablated end to end; and matrices that span several 128x128 tiles in both directions, with tile
scales that differ by orders of magnitude and are stored in the other shard: a reader that used the
wrong tile's scale (always row 0, always column 0, off by one block) is off by ~10x and fails here.

The references are independent: dequantisation is written out tile by tile in this file, and the
ablation is W - r(rᵀW) in float64."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import fixture_path, run_cli, unit
from patcher_kernels.fp8 import FP8_MAX, block_amax, dequantize_blocks

from patcher.errors import PatcherError
from patcher.io.checkpoint import Checkpoint
from patcher.io.writer import OutTensor, write_safetensors
from patcher.model.execution import StreamedModel
from patcher.model.opened import Model

D, FF, VOCAB, LAYERS, HEADS, HEAD_DIM = 160, 288, 50, 2, 5, 32  # 2 tiles x 3 tiles per MLP matrix
PROJ = {
    "self_attn.q_proj": (D, D),
    "self_attn.k_proj": (D, D),
    "self_attn.v_proj": (D, D),
    "self_attn.o_proj": (D, D),
    "mlp.gate_proj": (FF, D),
    "mlp.up_proj": (FF, D),
    "mlp.down_proj": (D, FF),
}


def make_fp8_model(tmp_path, scale_dtype="F32"):
    """The deepseek_v3 fixture with every 2-D projection weight stored FP8 + `_scale_inv` block scales."""
    src = fixture_path("deepseek_v3")
    dst = tmp_path / "fp8"
    shutil.copytree(src, dst)
    with Checkpoint(src) as ck:
        for fname in ck.files:
            tensors = []
            for info in ck.shard_tensors(fname):
                w = ck.array(info.name).astype(np.float32)
                if info.name.endswith("proj.weight") and w.ndim == 2:
                    s = block_amax(w) / FP8_MAX
                    q = np.clip(
                        w / np.repeat(np.repeat(s, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]],
                        -FP8_MAX,
                        FP8_MAX,
                    ).astype(ml_dtypes.float8_e4m3fn)
                    sd = s.astype({"F32": np.float32, "BF16": ml_dtypes.bfloat16}[scale_dtype])
                    tensors.append(OutTensor(info.name, "F8_E4M3", q.shape, produce=lambda q=q: [q]))
                    tensors.append(
                        OutTensor(info.name + "_scale_inv", scale_dtype, sd.shape, produce=lambda s=sd: [s])
                    )
                else:
                    a = ck.array(info.name)
                    tensors.append(
                        OutTensor(info.name, info.dtype, info.shape, produce=lambda a=a: [np.array(a)])
                    )
            write_safetensors(dst / fname, tensors, {"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    with Checkpoint(dst) as ck:  # re-read to rebuild the index with the new scale tensors
        index["weight_map"] = dict(ck.shard_of)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("scale_dtype", ["F32", "BF16"])
def test_fp8_block_scaled_ablation(tmp_path, direction64, scale_dtype):
    src = make_fp8_model(tmp_path, scale_dtype)
    out = tmp_path / "out"
    res = run_cli("ablate", src, "-d", direction64, "-o", out, "--targets", "attn_out,mlp_out")
    r = unit(np.load(direction64))
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    with Checkpoint(src) as a, Checkpoint(out) as b:
        assert b.tensors[name].dtype == "F8_E4M3"
        w = dequantize_blocks(a.array(name), a.array(name + "_scale_inv").astype(np.float32)).astype(
            np.float64
        )
        w2 = dequantize_blocks(b.array(name), b.array(name + "_scale_inv").astype(np.float32)).astype(
            np.float64
        )
        want = w - np.outer(r, r @ w)
        # fp8 e4m3 keeps 3 mantissa bits: agreement to within its rounding, and the direction mostly gone
        assert np.abs(w2 - want).max() <= 0.07 * np.abs(want).max()
        assert np.linalg.norm(r @ w2) < 0.1 * np.linalg.norm(r @ w)
        # scales only ever grow, and every stored value is finite
        assert np.all(
            b.array(name + "_scale_inv").astype(np.float32) >= a.array(name + "_scale_inv").astype(np.float32)
        )
        assert np.isfinite(b.array(name).astype(np.float32)).all()
        # tensors that were not edited keep their bytes, scales included
        other = "model.layers.1.mlp.experts.2.up_proj.weight"
        assert a.array(other).tobytes() == b.array(other).tobytes()
        assert a.array(other + "_scale_inv").tobytes() == b.array(other + "_scale_inv").tobytes()
    assert "leakage" in res.output


def tiles(shape):
    return -(-shape[0] // 128), -(-shape[1] // 128)


def dequant_reference(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Tile by tile, by hand: W[i, j] = q[i, j] * scale[i // 128, j // 128]."""
    out = np.empty(q.shape, np.float64)
    for ti in range(scale.shape[0]):
        for tj in range(scale.shape[1]):
            sl = (slice(ti * 128, (ti + 1) * 128), slice(tj * 128, (tj + 1) * 128))
            out[sl] = q[sl].astype(np.float64) * float(scale[ti, tj])
    return out


def make_model(folder, seed=0, fp8=True):
    """A llama with FP8 projections (scales in the second shard), or the same weights dequantised (BF16
    for everything that is not a projection, F32 for the dequantised projections)."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    weights, scales = [], []

    def add(name, arr, dtype, where=weights):
        arr = np.ascontiguousarray(arr)
        where.append(OutTensor(name, dtype, arr.shape, produce=lambda a=arr: [a]))

    add("model.embed_tokens.weight", rng.standard_normal((VOCAB, D)).astype(ml_dtypes.bfloat16), "BF16")
    add("model.norm.weight", (1 + 0.1 * rng.standard_normal(D)).astype(ml_dtypes.bfloat16), "BF16")
    add("lm_head.weight", (0.1 * rng.standard_normal((VOCAB, D))).astype(ml_dtypes.bfloat16), "BF16")
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(p + norm + ".weight", (1 + 0.1 * rng.standard_normal(D)).astype(ml_dtypes.bfloat16), "BF16")
        for proj, shape in PROJ.items():
            # tile scales spread over three orders of magnitude: a wrong tile is visibly wrong
            scale = (10.0 ** rng.uniform(-4.5, -2.5, tiles(shape))).astype(np.float32)
            q = rng.uniform(-448, 448, shape).astype(ml_dtypes.float8_e4m3fn)
            if fp8:
                add(p + proj + ".weight", q, "F8_E4M3")
                add(p + proj + ".weight_scale_inv", scale, "F32", scales)
            else:
                add(p + proj + ".weight", dequant_reference(q, scale).astype(np.float32), "F32")
    shards = {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": scales}
    shards = {k: v for k, v in shards.items() if v}
    for fname, ts in shards.items():
        write_safetensors(folder / fname, ts, {"format": "pt"})
    if len(shards) > 1:
        wm = {t.name: fname for fname, ts in shards.items() for t in ts}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        (folder / next(iter(shards))).rename(folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": D,
                "intermediate_size": FF,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS,
                "num_key_value_heads": HEADS,
                "head_dim": HEAD_DIM,
                "vocab_size": VOCAB,
                "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
                "hidden_act": "silu",
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fp8") / "m")


@pytest.fixture(scope="module")
def direction(tmp_path_factory):
    path = tmp_path_factory.mktemp("dir") / "r.npy"
    np.save(path, np.random.default_rng(7).standard_normal(D))
    return path


def test_fixture_is_multi_tile_with_distinct_scales(fp8_model):
    with Checkpoint(fp8_model) as ck:
        s = ck.array("model.layers.0.mlp.down_proj.weight_scale_inv")
        assert s.shape == (2, 3) and s.max() / s.min() > 10
        assert (
            ck.shard_of["model.layers.0.mlp.down_proj.weight_scale_inv"]
            != ck.shard_of["model.layers.0.mlp.down_proj.weight"]
        )


def test_decode_uses_each_tiles_scale(fp8_model):
    with Model.open(fp8_model) as m, Checkpoint(fp8_model) as ck:
        for proj in PROJ:
            name = f"model.layers.1.{proj}.weight"
            want = dequant_reference(ck.array(name), ck.array(name + "_scale_inv"))
            assert np.array_equal(m.decode(name).astype(np.float64), want.astype(np.float32)), proj
            assert m.is_scale(name + "_scale_inv") and not m.is_scale(name)


def test_forward_matches_the_dequantised_model(fp8_model, tmp_path):
    """The layer-streamed forward on FP8 weights equals the forward on the same weights stored F32."""
    plain = make_model(tmp_path / "plain", fp8=False)
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 9))
    mask = np.ones_like(ids)
    a = StreamedModel(fp8_model).run(ids, mask, logits=True)
    b = StreamedModel(plain).run(ids, mask, logits=True)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert np.abs(b).max() > 0.1


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_ablation_is_exact_per_tile(fp8_model, direction, tmp_path, scale):
    out = tmp_path / "out"
    run_cli(
        "ablate",
        fp8_model,
        "-d",
        direction,
        "-o",
        out,
        "--targets",
        "attn_out,mlp_out",
        "--scale",
        scale,
        "--no-hash",
    )
    r = unit(np.load(direction))
    with Checkpoint(fp8_model) as a, Checkpoint(out) as b:
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            for layer in range(LAYERS):
                name = f"model.layers.{layer}.{proj}.weight"
                assert b.info(name).dtype == "F8_E4M3"
                old_s, new_s = a.array(name + "_scale_inv"), b.array(name + "_scale_inv")
                w = dequant_reference(a.array(name), old_s)
                got = dequant_reference(b.array(name), new_s)
                want = w - scale * np.outer(r, r @ w)
                assert np.all(new_s >= old_s)  # scales only grow
                # every tile agrees to within e4m3 rounding of *its own* magnitude (3 mantissa bits): one
                # grid step, since rounding that keeps the ablation may take the other neighbour
                for ti in range(new_s.shape[0]):
                    for tj in range(new_s.shape[1]):
                        sl = (slice(ti * 128, (ti + 1) * 128), slice(tj * 128, (tj + 1) * 128))
                        assert np.abs(got[sl] - want[sl]).max() <= 0.13 * np.abs(want[sl]).max(), (
                            name,
                            ti,
                            tj,
                        )
                # and the component along r is what the strength asked for
                kept = np.linalg.norm(r @ got) / np.linalg.norm(r @ w)
                assert kept == pytest.approx(1 - scale, abs=0.1), name  # e4m3 rounding leaks ~5 %
        untouched = "model.layers.0.mlp.up_proj.weight"
        assert a.array(untouched).tobytes() == b.array(untouched).tobytes()


def test_diff_recovers_the_direction_through_the_tiles(fp8_model, direction, tmp_path):
    out = tmp_path / "out"
    run_cli("ablate", fp8_model, "-d", direction, "-o", out, "--targets", "attn_out,mlp_out", "--no-hash")
    report = json.loads(run_cli("diff", fp8_model, out, "--json", "-d", direction, expect=1).stdout)
    assert report["verdict"] == "rank-1 directional ablation along one shared direction (4 tensors)"
    assert report["shared_direction"]["cos_to_direction"] >= 0.999
    assert all(t["ignorable"] for t in report["tensors"] if t["role"] == "fp8_scale")


def test_scale_of_the_wrong_shape_is_one_clear_error(tmp_path, direction):
    model = make_model(tmp_path / "m")
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    with Checkpoint(model) as ck:
        tensors = [
            OutTensor(
                i.name,
                i.dtype,
                (1, 3) if i.name == name else i.shape,
                produce=(lambda: [np.ones((1, 3), np.float32)])
                if i.name == name
                else (lambda i=i: [np.array(ck.array(i.name))]),
            )
            for i in ck.shard_tensors("model-00002-of-00002.safetensors")
        ]
        write_safetensors(tmp_path / "s2", tensors, {"format": "pt"})
    (tmp_path / "s2").replace(model / "model-00002-of-00002.safetensors")
    with pytest.raises(PatcherError) as e:
        Model.open(model)
    assert str(e.value) == (
        f"{model / 'model-00002-of-00002.safetensors'}: {name} has shape [1, 3]; the FP8 "
        f"weight model.layers.0.mlp.down_proj.weight [160, 288] needs [2, 3] "
        f"(one scale per 128x128 tile)"
    )
    res = run_cli("ablate", model, "-d", direction, "-o", tmp_path / "o", expect=1)
    assert res.output.strip() == f"error: {e.value}"
