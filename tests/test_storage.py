"""The storage interface and the layers: every format implements patcher.io.storage.Storage and its verbs
agree with an independent reader (the gguf package, the fixture's own safetensors bytes); every format has
a writer with the same four names; and no module imports a layer above its own."""

import ast
import importlib
import sys

import numpy as np
import pytest
from conftest import ROOT, fixture_path

from patcher.edit.executor import WRITERS
from patcher.io.checkpoint import Checkpoint
from patcher.io.storage import Storage, missing_members
from patcher.model.opened import BACKENDS, Model

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(ROOT / "scripts"))
import make_gguf_fixtures as mk  # noqa: E402

from patcher.model.gguf import GGUFStorage, HFView  # noqa: E402

# the layers, lowest first (README "Layout"); a module may import its own layer and those below it
LAYERS = {
    "patcher_kernels": 0,
    "patcher": 1,  # the package itself (__version__), errors, validate
    "patcher.errors": 1,
    "patcher.validate": 1,
    "patcher.io": 2,
    "patcher.model": 3,
    "patcher.edit": 4,
    "patcher.onnx": 5,
    "patcher.search": 6,  # runs candidates through onnx
    "patcher.pipelines": 7,
    "patcher.web": 7,
    "patcher.cli": 8,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def _module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts[0] = "patcher_kernels"
    return ".".join(p for p in parts if p != "__init__")


def upward_imports() -> list[str]:
    found = []
    for path in sorted([*(ROOT / "patcher").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        own = _layer(_module_name(path))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                other = _layer(name)
                if other is not None and own is not None and other > own:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    return found


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check above can fail: an io module importing the model layer is reported."""
    bad = ROOT / "patcher" / "io" / "_upward_probe.py"
    bad.write_text("from patcher.model.opened import Model\n", encoding="utf-8")
    try:
        assert upward_imports() == ["patcher/io/_upward_probe.py:1 imports patcher.model.opened"]
    finally:
        bad.unlink()


# --- the Storage protocol -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    f32 = GGUFStorage(mk.convert("llama", root / "f32.gguf", "F32"))
    q8 = GGUFStorage(mk.convert("llama", root / "q8.gguf", "Q8_0"))
    st = Checkpoint(fixture_path("llama"))
    view = HFView(f32)
    yield {"safetensors": st, "gguf": q8, "gguf-f32": f32, "gguf-hf": view}
    for s in (st, q8, f32):
        s.close()


def test_every_format_implements_storage(stores):
    for name, s in stores.items():
        assert missing_members(s) == [], name
        assert isinstance(s, Storage), name
        assert s.format in ("safetensors", "gguf", "gguf-hf") and s.names in ("hf", "gguf"), name


def test_missing_members_names_what_a_format_lacks(stores):
    class Half:  # a format that forgot two verbs
        def __init__(self, s):
            for n in missing_members(object()):
                if n not in ("rows", "side_files"):
                    setattr(self, n, getattr(s, n))

    assert missing_members(Half(stores["safetensors"])) == ["side_files", "rows"]


def test_every_backend_has_a_writer():
    assert sorted(b.name for b in BACKENDS) == sorted(WRITERS)
    for module in map(importlib.import_module, WRITERS.values()):
        assert module.KIND in ("folder", "file")
        for verb in ("prepare", "progress_total", "execute"):
            assert callable(getattr(module, verb)), (module.__name__, verb)


def test_gguf_verbs_match_the_gguf_package(stores):
    """array, read_rows and rows dequantize as gguf.GGUFReader does; a block type has a rounding floor."""
    g = stores["gguf"]
    reader = gguf.GGUFReader(g.path)
    ids = np.array([[5, 17, 5], [200, 0, 9]])
    for t in reader.tensors:
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        np.testing.assert_array_equal(g.array(t.name), want.reshape(g.info(t.name).shape))
        if t.name == "token_embd.weight":
            np.testing.assert_array_equal(g.rows(t.name, ids), want[ids])
            np.testing.assert_array_equal(g.read_rows(t.name, 3, 7), want[3:7])
    assert g.info("blk.0.attn_q.weight").dtype == "Q8_0"
    assert g.quant_floor("blk.0.attn_q.weight", g.array("blk.0.attn_q.weight")) > 0
    assert stores["safetensors"].quant_floor("model.norm.weight", np.ones(64)) is None
    assert g.input_files() == [g.path] and g.input_paths == [g.path]


def test_hf_view_reads_the_checkpoint_it_was_converted_from(stores):
    """A float32 GGUF seen under HF names holds the original safetensors values, transforms undone."""
    st, view = Model(stores["safetensors"]), stores["gguf-hf"]
    assert set(view.tensors) <= set(st.tensors) and len(view.tensors) >= len(st.tensors) - 1
    for name in view.tensors:
        np.testing.assert_array_equal(view.array(name), st.decode(name), err_msg=name)
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(
        view.rows("model.embed_tokens.weight", ids), st.decode("model.embed_tokens.weight")[ids]
    )


def test_side_files_and_description(stores):
    st, g = stores["safetensors"], stores["gguf"]
    folder = fixture_path("llama")
    assert st.side_files()["config.json"] == (folder / "config.json").read_bytes()
    assert set(st.side_files()) == {p.name for p in folder.iterdir() if p.name in st.side_files()}
    assert folder / "config.json" in st.input_files()
    made = g.side_files()  # made from the metadata, as `patcher convert` writes them
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(made)
    assert b'"model_type": "llama"' in made["config.json"]
    facts = g.describe({"attn_out": ["blk.0.attn_output.weight", "blk.1.attn_output.weight"]})
    assert facts["format"] == "gguf" and facts["gguf_architecture"] == "llama"
    assert facts["quant_types_per_role"] == {"attn_out": {"Q8_0": 2}}
    assert "format" not in st.describe()
