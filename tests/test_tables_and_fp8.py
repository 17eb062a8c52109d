"""Architecture tables (built-in, custom, errors), `inspect`, and FP8 block-scaled checkpoints."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import MODEL_TYPES, fixture_path, run_cli, unit
from patcher_kernels.fp8 import FP8_MAX, block_amax, dequantize_blocks

from patcher.io.checkpoint import Checkpoint
from patcher.io.writer import OutTensor, write_safetensors
from patcher.model.architectures import load_table, supported


def test_every_required_architecture_has_a_table():
    assert set(MODEL_TYPES) <= set(supported())
    for mt in supported():
        arch = load_table(fixture_path("llama").parents[1] / "patcher" / "model" / "tables" / f"{mt}.toml")
        assert arch.model_type == mt and arch.writers and arch.embeds


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_inspect_json_maps_every_role(model_type):
    info = json.loads(run_cli("inspect", fixture_path(model_type), "--json").output)
    assert info["model_type"] == model_type and info["layers"] == 3 and info["d_model"] == 64
    assert not info["missing"]
    assert len(info["roles"]["attn_out"]) == 3 and len(info["roles"]["mlp_out"]) >= 3
    assert info["dtypes"] == {"BF16": info["total_bytes"]} and len(info["shards"]) == 2


def test_inspect_shows_provenance(tmp_path, direction64):
    run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", tmp_path / "out")
    info = json.loads(run_cli("inspect", tmp_path / "out", "--json").output)
    assert info["provenance"]["op"] == "ablate"
    assert "edited by patcher" in run_cli("inspect", tmp_path / "out").output


def test_unknown_model_type_lists_supported_and_custom_table(tmp_path, direction64):
    src = tmp_path / "m"
    shutil.copytree(fixture_path("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "my_llama"
    (src / "config.json").write_text(json.dumps(cfg))
    res = run_cli("ablate", src, "-d", direction64, "-o", tmp_path / "out", expect=1)
    assert "my_llama" in res.output and "gpt_neox" in res.output and "--arch-table" in res.output
    assert not (tmp_path / "out").exists()
    table = tmp_path / "my_llama.toml"
    table.write_text('model_type = "my_llama"\nextends = "llama"\n')
    run_cli("ablate", src, "-d", direction64, "-o", tmp_path / "out", "--arch-table", table)
    assert (tmp_path / "out" / "config.json").exists()


def test_bad_custom_table_is_reported(tmp_path, direction64):
    table = tmp_path / "t.toml"
    table.write_text('model_type = "x"\nextends = "llama"\nwritre = []\n')
    res = run_cli(
        "ablate",
        fixture_path("llama"),
        "-d",
        direction64,
        "-o",
        tmp_path / "o",
        "--arch-table",
        table,
        expect=1,
    )
    assert "unknown keys" in res.output and "writre" in res.output


def test_post_norm_correction_is_what_removes_the_direction(tmp_path, direction64):
    """Without the (g*r) correction a gemma2 block still writes r: the oracle test would catch it."""
    torch = pytest.importorskip("torch")
    from test_hf_oracle import load, resid_pre, tokens

    table = tmp_path / "no_post_norm.toml"
    table.write_text('model_type = "gemma2"\nextends = "gemma"\n')  # same writers, no post_norm entries
    out = tmp_path / "out"
    run_cli("ablate", fixture_path("gemma2"), "-d", direction64, "-o", out, "--arch-table", table)
    r = unit(np.load(direction64))
    states = resid_pre(load(out)[0], "gemma2", tokens())
    assert torch is not None
    assert max((np.abs(h @ r) / np.linalg.norm(h, axis=-1)).max() for h in states[1:]) > 5e-2


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


def test_docs_architecture_table_is_generated_from_the_tables():
    from patcher.model.architectures import markdown_table

    readme = (fixture_path("llama").parents[1] / "docs" / "models.md").read_text()
    assert markdown_table() in readme
