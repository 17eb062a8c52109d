"""A new architecture from one table file (issue 23): a copy of a built-in table under a new model_type,
its tensor names changed, passed with --arch-table, runs extract, export and search. The checkpoint is the
built-in's fixture with the same weights under the new names and the new model_type, so HF transformers on
the original fixture is the oracle for the forward pass, and every command must give the built-in's numbers.
verify takes the table too.
"""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import DEMO, fixture_path, run_cli

from patcher.io.checkpoint import Checkpoint
from patcher.io.writer import OutTensor, write_safetensors
from patcher.model.architectures import TABLE_DIR
from patcher.model.execution import StreamedModel
from patcher.onnx.runtime import OnnxModel
from patcher.search import study as st

POS, NEG = DEMO / "positive.txt", DEMO / "negative.txt"
# the three tables that extend nothing, each a different forward: (old, new) pairs renamed in the table's
# string values and in the tensor names alike, so a name taken from anywhere but the table is missing
RENAMES = {
    "llama": [
        ("model.layers.", "net.blocks."),
        ("self_attn.", "mix."),
        ("mlp.", "ffn."),
        ("model.embed_tokens", "net.tok"),
        ("model.norm", "net.norm_f"),
        ("lm_head", "unembed"),
    ],
    "gpt2": [
        ("transformer.", "net."),
        ("attn.c_", "mix.c_"),
        ("mlp.c_", "ffn.c_"),
        ("wte", "tok"),
        ("ln_f", "nf"),
    ],
    "gpt_neox": [("gpt_neox.", "neo."), ("attention.", "mix."), ("embed_out", "unembed")],
}


def renamed(name: str, base: str) -> str:
    for old, new in RENAMES[base]:
        name = name.replace(old, new)
    return name


def new_architecture(base: str, root):
    """(checkpoint, table) for model_type my_<base>: the base fixture and table, every name renamed."""
    src, model, mt = fixture_path(base), root / f"my_{base}", f"my_{base}"
    model.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, model / f.name)
    cfg = json.loads((src / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": mt}))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {renamed(n, base): f for n, f in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with Checkpoint(src) as ck:
        for fname in sorted(set(ck.shard_of.values())):
            tensors = [
                OutTensor(renamed(t.name, base), t.dtype, t.shape, produce=lambda a=ck.array(t.name): [a])
                for t in ck.shard_tensors(fname)
            ]
            write_safetensors(model / fname, tensors, {"format": "pt"})
    text = (TABLE_DIR / f"{base}.toml").read_text().replace(f'model_type = "{base}"', f'model_type = "{mt}"')
    table = root / f"{mt}.toml"
    table.write_text(re.sub(r'"[^"]*"', lambda m: renamed(m.group(0), base), text))  # values, not keys
    return model, table


def batch():
    ids = np.random.default_rng(3).integers(3, 120, size=(2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return np.where(mask == 1, ids, 0), mask


def hf_logits(folder, ids, mask) -> np.ndarray:
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        )
    return out.logits.double().numpy()


def search(model, study, *extra):
    args = [
        "--tokens",
        "4",
        "--max-prompts",
        "6",
        "--trials",
        "3",
        "--no-heuristic",
        "--seed",
        "0",
        "--no-prune",
    ]
    run_cli(
        "search",
        model,
        "--positive",
        POS,
        "--negative",
        NEG,
        "--no-chat-template",
        *args,
        *extra,
        "--study",
        study,
    )
    return [t.values for t in st.completed(st.open_study(study, None, create=False))]


@pytest.mark.parametrize("base", sorted(RENAMES))
def test_an_architecture_from_one_table_file(tmp_path, base):
    model, table = new_architecture(base, tmp_path)
    mt = f"my_{base}"
    args = ["--positive", POS, "--negative", NEG, "--no-chat-template", "--max-prompts", "6"]
    refused = run_cli("extract", model, *args, "-o", tmp_path / "no.safetensors", expect=1).output
    assert f"model_type '{mt}' is not supported" in refused and "--arch-table" in refused

    # the forward pass: the table's names and kinds give HF's logits for the original checkpoint
    ids, mask = batch()
    ours = StreamedModel(model, arch_table=table).run(ids, mask, logits=True)
    ref = hf_logits(fixture_path(base), ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4 * max(1.0, np.abs(ref).max())

    # extract: the same direction as the built-in architecture extracts from the same weights
    run_cli("extract", model, *args, "-o", tmp_path / "a.safetensors", "--arch-table", table)
    run_cli("extract", fixture_path(base), *args, "-o", tmp_path / "b.safetensors")
    with Checkpoint(tmp_path / "a.safetensors") as a, Checkpoint(tmp_path / "b.safetensors") as b:
        assert np.array_equal(a.array("direction"), b.array("direction"))

    # export: onnxruntime runs the graph built from the table and agrees with the numpy forward (and verify)
    run_cli("export", model, "-o", tmp_path / "e", "--arch-table", table)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, _ = (m := OnnxModel(tmp_path / "e")).step(ids, mask, pos, m.empty_cache(2))
    assert np.abs(logits - ours)[real].max() <= 1e-4 * max(1.0, np.abs(ours).max())
    verify = ["verify", tmp_path / "e", "--reference", model, "--tokens", "2", "--quality-tokens", "0"]
    rep = json.loads(run_cli(*verify, "--no-chat-template", "--json", "--arch-table", table).output)
    assert rep["parity_ok"] and rep["greedy_token_match"]

    # search: the same trials, to the last bit, as on the built-in architecture
    values = search(model, tmp_path / "s.db", "--arch-table", table)
    assert len(values) == 3 and values == search(fixture_path(base), tmp_path / "t.db")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('[forward]\nlayout = "diagonal"', "[forward] layout must be one of pre, sandwich, post, parallel"),
        ("[forward]\nrope_theta = true", "[forward] rope_theta must be a float, got True"),
        ("[forward]\nact_keys = [3]", "[forward] act_keys must be a list of config key names"),
        ("[forward]\nrotary = 1.0", "unknown keys ['rotary'] in [forward]"),
        ('[forward.names]\nquery = "q"', "unknown keys ['query'] in [forward.names]"),
        ('[forward]\nqkv = "fused"', "[forward.names] lacks ['qkv'], which qkv = 'fused' reads"),
        (
            '[forward]\nmlp = "moe"',
            "lacks ['router', 'experts', 'expert_gate', 'expert_up', 'expert_down'], which mlp = 'moe'",
        ),
        ('[forward.sliding]\nlayers = "pattern"', "layers = 'pattern' needs pattern >= 1"),
        ("[forward.rope_layer_types]\nlocal = 5", "[forward.rope_layer_types.local] must be a table"),
        ('forward = "llama"', "forward must be a table ([forward])"),
        ('[gguf]\narch = "llama"\nconfig = { n_ctx = 4 }', "[gguf] config must map config.json keys"),
    ],
)
def test_a_bad_forward_section_is_one_line_naming_the_table(tmp_path, body, fragment):
    table = tmp_path / "t.toml"
    table.write_text(f'model_type = "llama"\nextends = "llama"\n{body}\n')
    res = run_cli("export", fixture_path("llama"), "-o", tmp_path / "e", "--arch-table", table, expect=1)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and str(table) in lines[0] and fragment in lines[0], res.output
    assert not (tmp_path / "e").exists()


def test_a_table_without_forward_edits_but_does_not_run(tmp_path, direction64):
    """A table that describes only the writers (no [forward], no extends) still serves ablate; commands
    that run the model say what is missing."""
    text = (TABLE_DIR / "llama.toml").read_text()
    table = tmp_path / "edits_only.toml"
    table.write_text(text[: text.index("# The forward pass")])
    run_cli("ablate", fixture_path("llama"), "-d", direction64, "-o", tmp_path / "a", "--arch-table", table)
    res = run_cli("export", fixture_path("llama"), "-o", tmp_path / "e", "--arch-table", table, expect=1)
    assert res.output.strip() == f"error: {table}: has no [forward] section: the forward pass needs one " + (
        "(add it, or 'extends' a table that has one, such as llama)"
    )
