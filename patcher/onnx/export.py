"""`patcher export`: build the ONNX graph from the forward description and write a folder that
transformers.js / optimum-style loaders pick up: OUT/onnx/model.onnx (+ model.onnx_data), and the
config, generation config and tokenizer files beside it.

Weights are lazy initializers decoded from the checkpoint one tensor at a time while saving, so
peak memory is about one tensor (the largest, e.g. the embedding) whatever the model size. The
protobuf graph itself is small; the 2 GB protobuf limit does not apply to external data.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import onnx_ir as ir

from patcher import __version__
from patcher.errors import PatcherError
from patcher.io import manifest
from patcher.io.atomic import AtomicOutput
from patcher.io.checkpoint import INDEX_NAME, SIDE_FILES
from patcher.model import forward as fw
from patcher.model.execution import StreamedModel
from patcher.model.opened import Model
from patcher.onnx import selftest, storage
from patcher.onnx.ops import Context, OnnxOps

OPSET = 17
F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


# --dtype -> file (transformers.js's names), matrix storage, activation / KV cache dtype, bits of the
# MatMulNBits blocks (0: plain MatMul). int8 is transformers.js's q8 (`model_quantized.onnx`, WASM's default).
class Variant(TypedDict):
    file: str
    weights: ir.DataType
    act: ir.DataType
    bits: int


VARIANTS: dict[str, Variant] = {
    "fp32": {"file": "model.onnx", "weights": F32, "act": F32, "bits": 0},
    "fp16": {"file": "model_fp16.onnx", "weights": F16, "act": F32, "bits": 0},
    "int4": {"file": "model_q4.onnx", "weights": F32, "act": F32, "bits": 4},
    "q4f16": {"file": "model_q4f16.onnx", "weights": F16, "act": F16, "bits": 4},
    "int8": {"file": "model_quantized.onnx", "weights": F32, "act": F32, "bits": 8},
}
FILES: dict[str, str] = {k: v["file"] for k, v in VARIANTS.items()}


class Quant(TypedDict):
    block: int
    accuracy: int | None
    symmetric: bool


QUANT: Quant = {"block": 32, "accuracy": None, "symmetric": True}  # `patcher export`'s defaults
# a weight counts as edited (and gets orthogonal rounding) when its component along the edit's directions
# is below this share of a generic weight's: |Qᵀw| / (|w| sqrt(k/d)); an ablated bf16 weight has ~1e-2
EDITED_BELOW = 0.1


def kv_shapes(sm: StreamedModel) -> list:
    hp = sm.hp
    if hp.mla:  # latent attention caches the expanded per-head keys and values
        k = (hp.n_heads, hp.mla["qk_nope_head_dim"] + hp.mla["qk_rope_head_dim"])
        return [(k, (hp.n_heads, hp.mla["v_head_dim"]))] * hp.n_layers
    return [((hp.n_kv, hp.head_dim), (hp.n_kv, hp.head_dim))] * hp.n_layers


def _source(sm: StreamedModel) -> dict:
    """Every tensor of the model under the names the description uses (layer and model prefixes
    kept; the forward's top-level names are mapped to the checkpoint's)."""
    src = {}
    for name, info in sm.ck.tensors.items():
        if sm.is_scale(name):
            continue
        src[name] = (info.shape, lambda name=name: _decoded(sm, name))
    top = sm.top_weights().names  # prefix-free -> checkpoint name
    for short, full in top.items():
        src[short] = src[full]
    return src


def _decoded(sm: StreamedModel, name: str):
    """The tensor as float32; its mapped pages then leave the resident set (a 1B bf16 model's fp32 build
    otherwise ends holding the whole 2.5 GB file beside what it writes)."""
    w = selftest.decoded(sm, name)
    sm.ck.release(name)  # a view of an fp32 file stays valid: its pages fault back in when read
    return w


def _views(sm: StreamedModel) -> dict:
    """Zero-copy views of the plainly stored tensors (bf16/fp16/fp32, no block scales): the quantizers
    read them slab by slab, so a quantized export never holds a whole float32 copy of a tensor."""
    plain = {"BF16", "F16", "F32"}
    out = {n: (lambda n=n: sm.ck.array(n)) for n, i in sm.ck.tensors.items() if i.dtype in plain}
    for short, full in sm.top_weights().names.items():
        if full in out:
            out[short] = out[full]
    return out


def _release(sm: StreamedModel):
    """release(name) for Context: the view's checkpoint tensor (a top-level name mapped) leaves the RSS."""
    full = sm.top_weights().names
    return lambda name: sm.ck.release(full.get(name, name))


def present_outputs(ctx, dtype) -> list:
    """The graph's present.N.key / present.N.value outputs, named and shaped as onnxruntime-genai and
    transformers.js expect (the past length grows by the new tokens)."""
    outs = []
    for i, (k, v) in enumerate(ctx.present):
        for kind, val, past in (("key", k, ctx.past[i][0]), ("value", v, ctx.past[i][1])):
            val.name = f"present.{i}.{kind}"
            val.type = ir.TensorType(dtype)
            val.shape = ir.Shape(
                ["batch_size", past.shape[1], "past_sequence_length + sequence_length", past.shape[3]]
            )
            outs.append(val)
    return outs


def context(
    sm: StreamedModel,
    weight_dtype=ir.DataType.FLOAT,
    act=ir.DataType.FLOAT,
    quant: dict | None = None,
    ortho=None,
    logits_to_keep: bool = True,
) -> Context:
    """The graph's Context as an export builds it: weights from the checkpoint (quantizers read the
    stored tensors in slabs), the token embedding stored once when the head reuses it."""
    spec, hp = sm.spec, sm.hp
    embed = spec.names["embed"] + ".weight"
    src = _source(sm)
    return Context(
        src,
        kv_shapes(sm),
        hp.n_heads,
        weight_dtype,
        act,
        quant,
        token_embed=embed,
        tied=hp.tied or spec.names["lm_head"] + ".weight" not in src,
        ortho=ortho,
        logits_to_keep=logits_to_keep,
        views=_views(sm) if quant else None,
        release=_release(sm),
    )


def opset_imports(ctx: Context) -> dict[str, int]:
    return {"": OPSET, **({"com.microsoft": 1} if ctx.quant else {})}


def quantized_metadata(sm: StreamedModel, ctx: Context, model: ir.Model) -> None:
    """Checkpoint name -> its quantized initializers, in the model (verify dequantizes them)."""
    if ctx.quantized_meta:
        full = sm.top_weights().names
        model.metadata_props["patcher.quantized"] = json.dumps(
            {full.get(k, k): v for k, v in ctx.quantized_meta.items()}
        )


def build(
    sm: StreamedModel,
    weight_dtype=ir.DataType.FLOAT,
    act=ir.DataType.FLOAT,
    quant: dict | None = None,
    ortho=None,
    logits_to_keep: bool = True,
) -> ir.Model:
    spec, hp = sm.spec, sm.hp
    ctx = context(sm, weight_dtype, act, quant, ortho, logits_to_keep)
    top = OnnxOps(ctx, "")
    x = fw.embed(top, spec, hp, ctx.input_ids, ctx.position_ids)
    for layer in range(sm.n_layers):
        x = fw.block(OnnxOps(ctx, sm.resolved.layer_prefix(layer)), spec, hp, x, layer)
    if ctx.logits_to_keep is not None:  # the head (norm, vocabulary matmul) on the last k positions only
        i64 = lambda v: ctx.const(v, np.int64)  # noqa: E731
        start = ctx.op("Neg", [ctx.op("Unsqueeze", [ctx.logits_to_keep, i64([0])])])
        x = ctx.op("Slice", [x, start, i64([np.iinfo(np.int64).max]), i64([1])])
    logits = fw.head(top, spec, hp, x)
    if act != ir.DataType.FLOAT:
        logits = ctx.op("Cast", [logits], to=ir.DataType.FLOAT)
    logits.name = "logits"
    vocab = ctx.source[ctx.token_embed][0][0]
    seq = "logits_sequence_length" if ctx.logits_to_keep is not None else "sequence_length"
    logits.type, logits.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch_size", seq, vocab])
    outputs = [logits, *present_outputs(ctx, act)]
    graph = ir.Graph(
        ctx.inputs,
        outputs,
        nodes=ctx.tape.nodes,
        initializers=ctx.tape.initializers,
        opset_imports=opset_imports(ctx),
        name=f"patcher-{sm.model_type}",
    )
    model = ir.Model(graph, ir_version=8, producer_name="patcher", producer_version=__version__)
    quantized_metadata(sm, ctx, model)
    return model


def parse_dtypes(dtype) -> list[str]:
    """`fp32,int4` (or a list) -> known variant names, in table order, without repeats."""
    names = [d.strip() for d in (dtype.split(",") if isinstance(dtype, str) else dtype) if d.strip()]
    bad = [d for d in names if d not in FILES]
    if bad or not names:
        raise PatcherError(
            "--dtype",
            f"unknown {', '.join(bad) or 'empty'}: choose from {', '.join(FILES)} "
            "(several separated by commas)",
        )
    return [d for d in FILES if d in names]


@dataclass
class ExportPlan:
    """What one export run writes: the source's input digests, the variants an earlier export of the same
    source in OUT already holds (kept, hard-linked), the ones to write, the config and tokenizer files
    (Storage.side_files: a folder's own, a GGUF's made from its metadata), and the basis quantized
    variants round orthogonally to."""

    inputs: dict
    keep: dict
    todo: list
    side: dict[str, bytes]  # file name -> bytes
    basis: np.ndarray | None


def export(
    model: Path,
    out: Path,
    dtype="fp32",
    force: bool = False,
    opset: int = OPSET,
    command: str | None = None,
    recipe: dict | None = None,
    int4_block: int = QUANT["block"],
    int4_accuracy: int | None = QUANT["accuracy"],
    chunk_bytes: int = storage.CHUNK_BYTES,
    symmetric: bool = QUANT["symmetric"],
    direction=None,
    arch_table=None,
    announce=None,
) -> Path:
    """Write the variants `dtype` names into OUT. Without --force, OUT may be an earlier patcher export
    of the same source (same input digests): the missing variants are added beside the ones there.
    Checks, plan, write, self-test: nothing is published that onnxruntime cannot load and run
    (`announce(line)` says when a variant too large for memory was only graph-checked)."""
    dtypes = _check_options(dtype, opset, int4_block)
    sm = StreamedModel(model, arch_table)  # a folder, file, hub repo id or open Model: opened once
    selftest.check_source(sm)
    plan = _plan(sm, Path(out), dtypes, force, direction)
    quant = {"block": int4_block, "accuracy": int4_accuracy, "symmetric": symmetric}
    with AtomicOutput(out, "folder", inputs=[sm.ck.path], force=force or bool(plan.keep)) as tmp:
        _write(sm, plan, Path(out), tmp, chunk_bytes, quant, command, recipe, announce)
    return out


def _check_options(dtype, opset: int, int4_block: int) -> list[str]:
    dtypes = parse_dtypes(dtype)
    if int4_block < 16 or int4_block & (int4_block - 1):
        raise PatcherError("--int4-block", f"block size must be a power of two >= 16, got {int4_block}")
    if opset != OPSET:
        raise PatcherError(
            "--opset", f"only opset {OPSET} is emitted (standard ops, correct with left padding everywhere)"
        )
    return dtypes


def _plan(sm: StreamedModel, out: Path, dtypes: list[str], force: bool, direction) -> ExportPlan:
    ck = sm.model
    cache = manifest.DigestCache()
    inputs = {
        p.name: cache.sha256(p)
        for p in ck.storage.input_files()
        if p.name in ck.files or p.name in SIDE_FILES or p.name == INDEX_NAME
    }
    cache.save()
    keep = {} if force else _existing_export(out, inputs)
    # a GGUF's side files are made from its metadata: a vocabulary it cannot read fails here
    side = ck.storage.side_files()
    todo = [d for d in dtypes if d not in keep]
    basis = edit_basis(ck, direction) if any(VARIANTS[d]["bits"] for d in todo) else None
    return ExportPlan(inputs, keep, todo, side, basis)


def _write(
    sm: StreamedModel,
    plan: ExportPlan,
    out: Path,
    tmp: Path,
    chunk_bytes: int,
    quant: dict,
    command: str | None,
    recipe: dict | None,
    announce=None,
) -> None:
    """Fill the temporary folder AtomicOutput publishes: each new variant written and self-tested, the
    kept ones linked, side files, config, patcher-export.json and the manifest."""
    ck = sm.model
    (tmp / "onnx").mkdir()
    for files in plan.keep.values():  # hard links: adding a variant does not copy the others' bytes
        for f in files:
            os.link(out / "onnx" / f, tmp / "onnx" / f)
    chunks = {d: files[1:] for d, files in plan.keep.items()}
    vocab = ck.info(sm.top_weights().names[sm.spec.names["embed"] + ".weight"]).shape[0]
    for d in plan.todo:
        chunks[d] = _write_variant(sm, d, tmp / "onnx", chunk_bytes, quant, orthogonal_plan(plan.basis))
        selftest.check_graph(tmp / "onnx" / FILES[d], ck.path)  # never "wrote" what onnxruntime cannot load
        skipped = selftest.self_test(tmp, [FILES[d], *chunks[d]], ck.path, vocab)
        if skipped and announce:
            announce(skipped)
    variants = [d for d in FILES if d in chunks]
    for name, data in plan.side.items():
        (tmp / name).write_bytes(data)
    _write_config(ck, tmp / "config.json", {d: len(chunks[d]) for d in variants})
    _write_export_info(sm, tmp / "patcher-export.json", variants, chunks)
    storage.make_readable(tmp)
    _write_manifest(ck, plan, out, tmp, variants, command, recipe)
    storage.make_readable(tmp)


def _write_export_info(sm: StreamedModel, path: Path, variants: list[str], chunks: dict) -> None:
    ck = sm.model
    info = {
        "patcher": __version__,
        "source": str(ck.path),
        "model_type": ck.model_type,
        "dtype": variants[0],
        "dtypes": variants,
        "files": {d: [FILES[d], *chunks[d]] for d in variants},
        "opset": OPSET,
        "layers": sm.n_layers,
        "kv_cache": [list(map(list, kv)) for kv in kv_shapes(sm)][:1],
        "provenance": _provenance(ck),
    }
    path.write_text(json.dumps(info, indent=2) + "\n")


def _write_manifest(ck, plan: ExportPlan, out: Path, tmp: Path, variants, command, recipe) -> None:
    """The manifest lists every file; the kept variants' digests come from the earlier manifest (their
    bytes are not read again)."""
    known = (manifest.read(out) or {}).get("outputs", {}) if plan.keep else {}
    kept = {"onnx/" + f for files in plan.keep.values() for f in files}
    outputs = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(tmp))
            outputs[rel] = (known.get(rel) if rel in kept else None) or manifest.sha256_file(p)
    manifest.write(
        tmp,
        kind="export",
        command=command,
        recipe=recipe,
        inputs=plan.inputs,
        outputs=outputs,
        record={
            "dtype": variants[0],
            "dtypes": variants,
            "added": plan.todo,
            "opset": OPSET,
            "source": str(ck.path),
        },
    )


def variants_in(folder: Path) -> dict[str, list[str]]:
    """The variants an export folder holds: dtype -> [model file, its external data chunks]."""
    info = Path(folder) / "patcher-export.json"
    try:
        files = json.loads(info.read_text()).get("files")
    except (OSError, ValueError):
        files = None
    if isinstance(files, dict):
        return {d: f for d, f in files.items() if d in FILES and (Path(folder) / "onnx" / f[0]).is_file()}
    return {
        d: [f] for d, f in FILES.items() if (Path(folder) / "onnx" / f).is_file()
    }  # any other ONNX folder


def variant_file(folder: Path, dtype: str) -> str:
    """The ONNX file of variant `dtype` in an export folder, or a clear error naming the ones it has
    (never another variant in its place)."""
    if dtype not in FILES:
        raise PatcherError("--dtype", f"must be one of {', '.join(FILES)}")
    have = variants_in(folder)
    if dtype not in have:
        listed = ", ".join(have) or "none"
        raise PatcherError(
            folder,
            f"has no {dtype} variant (onnx/{FILES[dtype]}); it holds: {listed}. Add it with "
            f"`patcher export SOURCE -o {folder} --dtype {dtype}`",
        )
    return have[dtype][0]


def _existing_export(out: Path, inputs: dict) -> dict:
    """An earlier export of the same source in OUT: its variants (to keep); {} when OUT is empty or
    absent; an error when OUT holds anything else (AtomicOutput then asks for --force)."""
    if not out.is_dir() or not any(out.iterdir()):
        return {}
    old = manifest.read(out)
    if not old or old.get("kind") != "export" or not (out / "patcher-export.json").is_file():
        return {}  # not an export: AtomicOutput refuses without --force
    if old.get("inputs") != inputs:
        raise PatcherError(
            out,
            "is a patcher export of a different source (its manifest's input digests differ); "
            "pass --force to replace it, or choose another folder",
        )
    return variants_in(out)


def variant_quant(dtype: str, quant: dict | None = None) -> dict | None:
    """Context's `quant` for variant `dtype` (None: plain matrices); `quant` as export's options
    (block, accuracy, symmetric; default QUANT)."""
    bits = VARIANTS[dtype]["bits"]
    if not bits:
        return None
    q = {**(quant or QUANT), "bits": bits}
    if bits == 8:  # MatMulNBits 8-bit has no fast kernel without accuracy_level 4 (80 ms vs 0.2 ms for
        q["format"] = "int8-channel"  # a 1024x2816 product; WASM ignores that level): MatMulInteger instead
    return q


def _write_variant(
    sm: StreamedModel, dtype: str, folder: Path, chunk_bytes: int, quant: dict, ortho
) -> list[str]:
    v = VARIANTS[dtype]
    q = variant_quant(dtype, quant)
    return storage.write_model(
        build(sm, v["weights"], v["act"], q, ortho if q else None), folder / v["file"], chunk_bytes
    )


def edit_basis(ck: Model, direction=None):
    """Q [d_model, k] of the directions an ablation removed from this checkpoint (from its provenance, or
    `direction` given explicitly), or None when it records no ablation."""
    from patcher_kernels.project import orthonormalize

    from patcher.edit.directions import load_direction

    d_model = int(ck.config.get("hidden_size") or ck.config.get("n_embd") or 0) or None
    if direction is not None:
        d = direction if hasattr(direction, "vectors") else load_direction(str(direction), d_model)
        return orthonormalize(d.vectors)
    prov = _provenance(ck)
    if not isinstance(prov, dict) or prov.get("op") != "ablate":
        return None
    src, sha = prov.get("direction"), prov.get("direction_sha256")
    try:
        d = load_direction(str(src), d_model)
    except (PatcherError, OSError, ValueError):
        d = None
    if d is None or (sha and d.sha256 != sha):
        raise PatcherError(
            ck.path,
            f"was ablated along {src}, which is {'missing' if d is None else 'changed'}: "
            "a quantized export rounds against it; pass --direction FILE",
        )
    return orthonormalize(d.vectors)


def orthogonal_plan(q):
    """ortho(name, w[N, K]) for Context: (q, axis) where the weight is already orthogonal to Q along an
    axis of size d_model (the ablated writers along N, the embedding along K), else None."""
    if q is None:
        return None
    d, k = q.shape

    def plan(name, w):
        for axis in (0, 1):
            if w.shape[axis] != d:
                continue
            total, acc, comp = 0.0, np.zeros((k, w.shape[1])), 0.0
            for r in range(0, w.shape[0], 1024):  # row blocks: w may be a view of the stored file
                x = np.asarray(w[r : r + 1024], np.float64)
                total += float(np.sum(x * x))
                if axis == 0:
                    acc += q[r : r + 1024].T @ x  # Qᵀw accumulates over row blocks
                else:
                    comp += float(np.sum(np.square(x @ q)))
            comp = float(np.sum(acc * acc)) if axis == 0 else comp
            if np.sqrt(comp) < EDITED_BELOW * np.sqrt(total) * np.sqrt(k / d):
                return q, axis
        return None

    return plan


# transformers.js dtype names (its file suffixes: "" fp32, _fp16, _q4, _q4f16, _quantized = q8)
TJS_DTYPE = {"fp32": "fp32", "fp16": "fp16", "int4": "q4", "q4f16": "q4f16", "int8": "q8"}
# The variant transformers.js loads on each device when the page names none: the first of these the export
# holds. Quality first: on SmolLM2-135M-Instruct only fp16 and fp32 keep the fp32 model's answers within the
# fit-to-ship thresholds of docs/onnx.md (first-token KL <= 0.1, top-1 >= 90 %, greedy >= 80 %; table in
# BENCHMARKS.md); speed second: fp16 runs 1.35x fp32 on WASM and is half the download. The quantized
# variants follow, best measured quality first (an export holding only those still gets a default).
DEVICE_DEFAULTS = {
    "wasm": ("fp16", "fp32", "int8", "int4", "q4f16"),
    "webgpu": ("fp16", "fp32", "int8", "q4f16", "int4"),
}
KV_FP16 = tuple(d for d, v in VARIANTS.items() if v["act"] == F16)  # float16 KV cache inputs


def default_variants(have) -> dict[str, str]:
    """device -> the variant (patcher's name) transformers.js should load there, among `have`."""
    return {dev: next(d for d in order if d in have) for dev, order in DEVICE_DEFAULTS.items()}


def transformers_js_config(chunks: dict[str, int]) -> dict:
    chosen = default_variants(chunks)
    cfg = {
        "use_external_data_format": {FILES[d]: n for d, n in chunks.items() if n},
        "dtype": TJS_DTYPE[chosen["wasm"]],  # any device without its own entry (Node's cpu) as on WASM
        "device_config": {dev: {"dtype": TJS_DTYPE[d]} for dev, d in chosen.items()},
    }
    kv = {TJS_DTYPE[d]: "float16" for d in KV_FP16 if d in chunks}
    if kv:
        cfg["kv_cache_dtype"] = kv
    return cfg


def _write_config(ck: Model, path: Path, chunks: dict[str, int]) -> None:
    """The model's config.json plus `transformers.js_config`, so transformers.js loads the folder as is."""
    # the config.json already copied into the export, else a minimal one
    cfg: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"model_type": ck.model_type}
    cfg["transformers.js_config"] = {
        **cfg.get("transformers.js_config", {}),
        **transformers_js_config(chunks),
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _provenance(ck: Model):
    meta = next(iter(ck.files.values())).metadata.get("patcher")
    try:
        return json.loads(meta) if meta else None
    except ValueError:
        return meta
