"""Architecture tables (built-in, custom, errors), `inspect`, the post-norm correction they enable, and
the table in docs/models.md generated from them."""

import json
import shutil

import numpy as np
import pytest
from conftest import MODEL_TYPES, fixture_path, run_cli, unit

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


def test_post_norm_without_its_gain_rule_is_one_line(tmp_path, direction64):
    # a writer behind a post-norm needs the table to say how the norm's gain reads (was a KeyError)
    table = tmp_path / "t.toml"
    table.write_text(
        'model_type = "gemma2"\nextends = "gemma"\n\n[[writer]]\nrole = "mlp_out"\n'
        'weight = "mlp.down_proj.weight"\nresidual_axis = 0\n'
        'post_norm = "post_feedforward_layernorm.weight"\n'
    )
    out = tmp_path / "o"
    res = run_cli(
        "ablate", fixture_path("gemma2"), "-d", direction64, "-o", out, "--arch-table", table, expect=1
    )
    assert "no post_norm_gain" in res.output and "mlp.down_proj.weight" in res.output, res.output
    assert "internal error" not in res.output and not out.exists()


def test_post_norm_correction_is_what_removes_the_direction(tmp_path, direction64):
    """Without the (g*r) correction a gemma2 block still writes r: the oracle test would catch it."""
    torch = pytest.importorskip("torch")
    from test_edits_in_transformers import load, resid_pre, tokens

    table = tmp_path / "no_post_norm.toml"
    table.write_text('model_type = "gemma2"\nextends = "gemma"\n')  # same writers, no post_norm entries
    out = tmp_path / "out"
    run_cli("ablate", fixture_path("gemma2"), "-d", direction64, "-o", out, "--arch-table", table)
    r = unit(np.load(direction64))
    states = resid_pre(load(out)[0], "gemma2", tokens())
    assert torch is not None
    assert max((np.abs(h @ r) / np.linalg.norm(h, axis=-1)).max() for h in states[1:]) > 5e-2


def test_docs_architecture_table_is_generated_from_the_tables():
    from patcher.model.architectures import markdown_table

    readme = (fixture_path("llama").parents[1] / "docs" / "models.md").read_text()
    assert markdown_table() in readme
