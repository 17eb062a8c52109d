"""`patcher export`: build the ONNX graph from the forward description and write a folder that
transformers.js / optimum-style loaders pick up: OUT/onnx/model.onnx (+ model.onnx_data), and the
config, generation config and tokenizer files beside it.

Weights are lazy initializers decoded from the checkpoint one tensor at a time while saving, so
peak memory is about one tensor (the largest, e.g. the embedding) whatever the model size. The
protobuf graph itself is small; the 2 GB protobuf limit does not apply to external data.
"""
import json
import shutil
from pathlib import Path

import onnx_ir as ir

from patcher import __version__
from patcher.io import manifest
from patcher.model import forward as fw
from patcher.io.checkpoint import INDEX_NAME
from patcher.errors import PatcherError
from patcher.model.execution import StreamedModel
from patcher.model.opened import Model, as_model
from patcher.onnx.ops import Context, OnnxOps
from patcher.io.writer import OutputFolder

OPSET = 17
FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int4": "model_q4.onnx"}
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


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
        src[name] = (info.shape, lambda name=name: sm._decode(name))
    top = sm.top_weights().names  # prefix-free -> checkpoint name
    for short, full in top.items():
        src[short] = src[full]
    return src


def build(sm: StreamedModel, weight_dtype=ir.DataType.FLOAT) -> ir.Model:
    ctx = Context(_source(sm), kv_shapes(sm), sm.hp.n_heads, weight_dtype)
    top = OnnxOps(ctx, "")
    x = fw.embed(top, sm.spec, sm.hp, ctx.input_ids, ctx.position_ids)
    for layer in range(sm.n_layers):
        x = fw.block(OnnxOps(ctx, sm.resolved.layer_prefix(layer)), sm.spec, sm.hp, x, layer)
    logits = fw.head(top, sm.spec, sm.hp, x)
    logits.name = "logits"
    vocab = sm.ck.info(sm.top_weights().names[sm.spec.names["embed"] + ".weight"]).shape[0]
    logits.type, logits.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch_size", "sequence_length",
                                                                            vocab])
    outputs = [logits]
    for i, (k, v) in enumerate(ctx.present):
        for kind, val, past in (("key", k, ctx.past[i][0]), ("value", v, ctx.past[i][1])):
            val.name = f"present.{i}.{kind}"
            val.type = ir.TensorType(ir.DataType.FLOAT)
            val.shape = ir.Shape(["batch_size", past.shape[1], "past_sequence_length + sequence_length",
                                  past.shape[3]])
            outputs.append(val)
    graph = ir.Graph(ctx.inputs, outputs, nodes=ctx.tape.nodes, initializers=ctx.tape.initializers,
                     opset_imports={"": OPSET}, name=f"patcher-{sm.model_type}")
    return ir.Model(graph, ir_version=8, producer_name="patcher", producer_version=__version__)


def export(model, out: Path, dtype: str = "fp32", force: bool = False, opset: int = OPSET,
           command: str | None = None, recipe: dict | None = None, int4_block: int = 32,
           int4_accuracy: int | None = None, arch_table=None) -> Path:
    """`model`: a Model or anything Model.open takes (folder, .safetensors file, hub repo id)."""
    if dtype not in FILES:
        raise PatcherError("--dtype", f"must be one of {', '.join(FILES)}")
    if int4_block < 16 or int4_block & (int4_block - 1):
        raise PatcherError("--int4-block", f"block size must be a power of two >= 16, got {int4_block}")
    if opset != OPSET:
        raise PatcherError("--opset", f"only opset {OPSET} is emitted (standard ops, correct with left "
                           f"padding everywhere)")
    if isinstance(model, Model):
        return _export(model, Path(out), dtype, force, command, recipe, int4_block, int4_accuracy)
    with as_model(model, arch_table) as ck:
        return _export(ck, Path(out), dtype, force, command, recipe, int4_block, int4_accuracy)


def _export(ck: Model, out: Path, dtype, force, command, recipe, int4_block, int4_accuracy) -> Path:
    sm = StreamedModel(ck)
    with OutputFolder(out, ck.input_paths, force=force) as tmp:
        (tmp / "onnx").mkdir()
        fp32 = tmp / "onnx" / FILES["fp32"]
        if dtype in ("fp32", "int4"):
            ir.save(build(sm), fp32, external_data=FILES["fp32"] + "_data")
        if dtype == "fp16":
            path = tmp / "onnx" / FILES["fp16"]
            ir.save(build(sm, ir.DataType.FLOAT16), path, external_data=FILES["fp16"] + "_data")
        if dtype == "int4":
            quantize_int4(fp32, tmp / "onnx" / FILES["int4"], int4_block, int4_accuracy)
        for name in SIDE_FILES:
            if (ck.folder / name).is_file():
                shutil.copyfile(ck.folder / name, tmp / name)
        (tmp / "patcher-export.json").write_text(json.dumps({
            "patcher": __version__, "source": str(ck.path), "model_type": ck.model_type, "dtype": dtype,
            "opset": OPSET, "layers": sm.n_layers, "kv_cache": [list(map(list, kv))
                                                                for kv in kv_shapes(sm)][:1],
            "provenance": _provenance(ck)}, indent=2) + "\n")
        outputs = {str(p.relative_to(tmp)): manifest.sha256_file(p) for p in sorted(tmp.rglob("*"))
                   if p.is_file()}
        inputs = {p.name: manifest.sha256_file(p) for p in sorted(ck.folder.iterdir())
                  if p.is_file() and (p.name in ck.files or p.name in SIDE_FILES or p.name == INDEX_NAME)}
        manifest.write(tmp, kind="export", command=command, recipe=recipe, inputs=inputs, outputs=outputs,
                       record={"dtype": dtype, "opset": OPSET, "source": str(ck.path)})
    return out


def _provenance(ck: Model):
    meta = next(iter(ck.files.values())).metadata.get("patcher")
    try:
        return json.loads(meta) if meta else None
    except ValueError:
        return meta


def quantize_int4(src: Path, dst: Path, block_size: int = 32, accuracy_level: int | None = None) -> None:
    """onnxruntime's MatMulNBits quantizer (no torch): every MatMul with a constant weight -> int4.
    It works on an in-memory ModelProto, so this step needs the fp32 model in RAM (the one limit of
    export: int4 of a model larger than memory is not possible this way). accuracy_level 4 lets
    onnxruntime's CPU kernel run on int8 activations (measured ~2x faster decode on AVX-512 CPUs,
    at some accuracy cost: check with `patcher verify --dtype int4`)."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    model = onnx.load(str(src), load_external_data=True)
    q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level)
    q.process()
    onnx.save_model(q.model.model, str(dst), save_as_external_data=True, location=dst.name + "_data",
                    all_tensors_to_one_file=True)
