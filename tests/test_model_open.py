"""The one Model object: every command opens models through it, so a config that disagrees with the
tensors, or lacks what the forward pass needs, is the same one line everywhere, before any work; a
custom architecture table is honoured by every command and by recipes (run and dry-run); and the one
FP8 block-scale naming rule."""

import json
import shutil

import numpy as np
import pytest
from conftest import DEMO, fixture_path, run_cli

from patcher.errors import PatcherError
from patcher.io.checkpoint import Checkpoint, TensorInfo, fp8_scale_of, fp8_weight_of
from patcher.model.opened import Model

POS = DEMO / "positive.txt"
NEG = DEMO / "negative.txt"


def broken(tmp_path, **changes):
    """tiny-llama with config.json keys changed (None removes a key)."""
    dst = tmp_path / "m"
    shutil.copytree(fixture_path("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def commands(model, tmp_path, direction64):
    return {
        "inspect": ("inspect", model),
        "ablate": ("ablate", model, "-d", direction64, "-o", tmp_path / "out"),
        "inject": (
            "inject",
            model,
            "-d",
            direction64,
            "-o",
            tmp_path / "out",
            "--layer",
            "1",
            "--alpha",
            "1",
        ),
        "extract": ("extract", model, "--positive", POS, "--negative", NEG, "-o", tmp_path / "d.safetensors"),
        "export": ("export", model, "-o", tmp_path / "out"),
    }


def one_line_error(args) -> str:
    res = run_cli(*args, expect=1)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.mark.parametrize(
    "n, problem",
    [
        (
            2,
            "num_hidden_layers = 2 but the tensors also hold layer 2 (layers in the tensors: 0..2); "
            "an edit would leave it unedited",
        ),
        (4, "num_hidden_layers = 4 but the tensors have no layer 3 (layers in the tensors: 0..2)"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "ablate", "inject", "extract", "export"])
def test_layer_count_must_match_the_tensors(tmp_path, direction64, n, problem, command):
    model = broken(tmp_path, num_hidden_layers=n)
    line = one_line_error(commands(model, tmp_path, direction64)[command])
    assert line == f"error: {model / 'config.json'}: {problem}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("command", ["ablate", "extract", "export"])
def test_d_model_must_match_the_embedding(tmp_path, direction64, command):
    model = broken(tmp_path, hidden_size=32)
    line = one_line_error(commands(model, tmp_path, direction64)[command])
    assert line == (
        f"error: {model / 'config.json'}: hidden_size = 32 but model.embed_tokens.weight has shape [384, 64]"
    )


@pytest.mark.parametrize("value", [2.0, "3", True, -1, 0])
def test_layer_count_must_be_a_positive_integer(tmp_path, direction64, value):
    model = broken(tmp_path, num_hidden_layers=value)
    line = one_line_error(commands(model, tmp_path, direction64)["ablate"])
    if isinstance(value, int) and not isinstance(value, bool):
        assert line == (
            f"error: {model / 'config.json'}: num_hidden_layers must be a positive integer, got {value}"
        )
    else:
        assert line == (
            f"error: {model / 'config.json'}: config.json needs integer 'num_hidden_layers' and "
            f"'hidden_size' for model_type 'llama' (got {value!r} and 64)"
        )


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"num_attention_heads": None}, "has no num_attention_heads (or n_head): the forward pass needs it"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_attention_heads": "4"}, "num_attention_heads must be a positive integer, got '4'"),
        ({"num_attention_heads": 5}, "num_attention_heads = 5 is not a multiple of num_key_value_heads = 2"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
        (
            {"head_dim": None, "num_attention_heads": 6, "num_key_value_heads": 6},
            "hidden size 64 is not a multiple of num_attention_heads = 6 (and there is no head_dim)",
        ),
        (
            {"hidden_act": "swiglu_foo"},
            "hidden_act = 'swiglu_foo' is not supported (supported: gelu, gelu_fast, "
            "gelu_new, gelu_pytorch_tanh, gelu_tanh, relu, silu, swish)",
        ),
        (
            {"rope_theta": "big"},
            "cannot read the hyperparameters the forward pass needs (rope_theta must be a "
            "finite positive number, got 'big')",
        ),
    ],
)
@pytest.mark.parametrize("command", ["extract", "export"])
def test_forward_hyperparameters_are_checked(tmp_path, direction64, changes, problem, command):
    model = broken(tmp_path, **changes)
    line = one_line_error(commands(model, tmp_path, direction64)[command])
    assert line == f"error: {model / 'config.json'}: {problem}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "d.safetensors").exists()


def test_editing_does_not_need_the_forward_hyperparameters(tmp_path, direction64):
    """Weights-only commands never read heads or the activation: a config without them still edits."""
    model = broken(tmp_path, num_attention_heads=None, hidden_act="unknown")
    run_cli("ablate", model, "-d", direction64, "-o", tmp_path / "out")
    with Checkpoint(fixture_path("llama")) as a, Checkpoint(tmp_path / "out") as b:
        w = "model.layers.0.mlp.down_proj.weight"
        assert not np.array_equal(a.array(w), b.array(w))


def test_multi_token_prediction_layers_beyond_the_count_are_allowed(tmp_path):
    """DeepSeek-V3 stores num_nextn_predict_layers extra blocks after the last one: not a mismatch, and
    not edited (they are not part of the forward pass)."""
    model = broken(tmp_path, num_hidden_layers=2, num_nextn_predict_layers=1)
    with Model.open(model) as m:
        assert m.n_layers == 2
        assert {t.layer for t in m.resolved.targets} == {None, 0, 1}


# --- custom tables everywhere ---------------------------------------------------------------------


@pytest.fixture
def custom(tmp_path):
    """tiny-llama relabelled as model_type my_llama, and a table for it that extends llama."""
    model = broken(tmp_path, model_type="my_llama")
    table = tmp_path / "my_llama.toml"
    table.write_text('model_type = "my_llama"\nextends = "llama"\n')
    return model, table


def test_custom_table_extract_and_export(tmp_path, custom):
    model, table = custom
    args = ["--positive", POS, "--negative", NEG, "--no-chat-template", "--max-prompts", "6"]
    line = one_line_error(("extract", model, *args, "-o", tmp_path / "x.safetensors"))
    assert "model_type 'my_llama' is not supported" in line and "--arch-table FILE" in line
    run_cli("extract", model, *args, "-o", tmp_path / "a.safetensors", "--arch-table", table)
    run_cli("extract", fixture_path("llama"), *args, "-o", tmp_path / "b.safetensors")
    with Checkpoint(tmp_path / "a.safetensors") as a, Checkpoint(tmp_path / "b.safetensors") as b:
        assert np.array_equal(a.array("direction"), b.array("direction"))
    run_cli("export", model, "-o", tmp_path / "e", "--arch-table", table)
    run_cli("export", fixture_path("llama"), "-o", tmp_path / "f")
    assert (tmp_path / "e/onnx/model.onnx_data").read_bytes() == (
        tmp_path / "f/onnx/model.onnx_data"
    ).read_bytes()


def test_recipe_uses_the_models_arch_table_in_run_and_dry_run(tmp_path, custom, direction64):
    model, table = custom
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[[model]]\npath = "{model}"\noutput = "out"\narch_table = "{table.name}"\n\n'
        f'[[step]]\nop = "ablate"\ndirection = "{direction64}"\nlayers = "1-2"\n\n'
        f'[[step]]\nop = "export"\n'
    )
    dry = run_cli("run", recipe, "--dry-run")
    assert "model.layers.1.self_attn.o_proj.weight" in dry.output and "nothing written" in dry.output
    run_cli("run", recipe)
    run_cli(
        "ablate",
        model,
        "-d",
        direction64,
        "--layers",
        "1-2",
        "-o",
        tmp_path / "cli",
        "--arch-table",
        table,
        "--no-hash",
    )
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with Checkpoint(tmp_path / "out/01-ablated" / shard) as a, Checkpoint(tmp_path / "cli" / shard) as b:
            assert all(np.array_equal(a.array(n), b.array(n)) for n in a.tensors)
    assert (tmp_path / "out/02-onnx/onnx/model.onnx").is_file()
    # without the table the same recipe is refused up front, naming the model_type
    recipe.write_text(recipe.read_text().replace(f'arch_table = "{table.name}"\n', ""))
    line = run_cli("run", recipe, "--dry-run", expect=1).output
    assert "model_type 'my_llama' is not supported" in line


# --- the FP8 block-scale rule ---------------------------------------------------------------------


def _infos(**dtypes):
    return {
        n.replace("__", "."): TensorInfo(n.replace("__", "."), d, (256, 256), None, 0, 0)
        for n, d in dtypes.items()
    }


def test_fp8_scale_rule():
    t = _infos(
        a__weight="F8_E4M3",
        a__weight_scale_inv="F32",
        b__weight="F8_E4M3",
        b__weight_scale="BF16",
        c__weight="BF16",
        c__weight_scale="BF16",
        d__weight="F8_E5M2",
        d__weight_scale_inv="F32",
        e__weight="F8_E4M3",
    )
    assert fp8_scale_of(t, "a.weight") == "a.weight_scale_inv"
    assert fp8_scale_of(t, "b.weight") == "b.weight_scale"  # compressed-tensors naming
    assert fp8_scale_of(t, "c.weight") is None  # not FP8: its `_scale` is an ordinary tensor
    assert fp8_scale_of(t, "d.weight") == "d.weight_scale_inv"
    assert fp8_scale_of(t, "e.weight") is None  # per-tensor FP8: no block scale
    assert [n for n in t if fp8_weight_of(t, n)] == [
        "a.weight_scale_inv",
        "b.weight_scale",
        "d.weight_scale_inv",
    ]
    assert fp8_weight_of(t, "c.weight_scale") is None


def test_model_open_errors_are_patcher_errors(tmp_path):
    with pytest.raises(PatcherError) as e:
        Model.open(tmp_path / "nothing-here")
    assert "no such file or folder" in str(e.value)


def test_lone_safetensors_file(tmp_path, direction64):
    """inspect describes a lone file; commands that need the architecture say what is missing."""
    f = fixture_path("llama") / "model-00001-of-00002.safetensors"
    info = json.loads(run_cli("inspect", f, "--json").stdout)
    assert info["model_type"] is None and info["shards"] == [f.name]
    for args in (("ablate", f, "-d", direction64, "-o", tmp_path / "o"), ("export", f, "-o", tmp_path / "e")):
        assert one_line_error(args) == (
            f"error: {f}: this needs a model folder with config.json "
            "(architecture and hyperparameters), not a lone .safetensors file"
        )
