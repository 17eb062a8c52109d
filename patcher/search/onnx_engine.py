"""The onnxruntime engine: one graph for every trial, the edit fed as graph inputs.

The graph is patcher's export (patcher/onnx: same forward description, KV cache, opset 17) with
each writer's output projected in the graph: `edit_u` [slots, d_model] holds each slot's unit basis
(post-norm corrected, from the trial's Plan) and `edit_s` [slots] its strength, slot 2l for block
l's attn_out, 2l+1 for its mlp_out, 2L for the embeddings and 2L+1 for a tied unembedding that the
embedding edit reaches (the head's input is projected, as for the numpy engine). Strength 0 leaves
a writer exactly as it is, so the original model is the same session with zero strengths.

`dtype` picks the weights' storage as `patcher export --dtype` writes it (same Context, same rounding):
fp32, int4 (MatMulNBits blocks) or int8 (per-channel codes, MatMulInteger). The edit's projection
stays in float32 on the writers' outputs, so a quantized engine scores edits of the quantized model
and strength 0 is the quantized original exactly. Weights are streamed into the graph file one tensor
at a time (quantized from the stored bf16/fp16 arrays in slabs), so a quantized engine never holds the
float32 model.

Norm preservation is not offered here: its per-column / per-row factors depend on each weight and
strength (one vector per writer tensor, MoE experts included) and would have to be fed as inputs
too; trials with norm preservation run on the numpy engine, which applies it exactly.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from patcher import __version__
from patcher.edit.plan import Plan
from patcher.errors import PatcherError
from patcher.io.manifest import folder_identity
from patcher.model import forward as fw
from patcher.model.execution import StreamedModel
from patcher.onnx import storage
from patcher.onnx.export import (
    VARIANTS,
    context,
    opset_imports,
    present_outputs,
    quantized_metadata,
    variant_quant,
)
from patcher.onnx.ops import FLOAT, Context, OnnxOps
from patcher.onnx.runtime import PROVIDERS, available_providers

ROLE_SLOT = {"attn_out": 0, "mlp_out": 1}
GRAPH_VERSION = 3  # part of the cache key: bump when the graph changes
# --engine-dtype: the export variants whose activations are float32 (the edit inputs' dtype)
DTYPES = tuple(d for d in ("fp32", "int4", "int8") if VARIANTS[d]["act"] == FLOAT)


class EditOnnxOps(OnnxOps):
    def __init__(
        self,
        ctx: Context,
        prefix: str,
        slots: dict,
        edit: tuple[ir.Value, ir.Value],
        head_slot: int | None = None,
        head_weight: str | None = None,
    ):
        """`edit`: the graph inputs (u [slots, d], s [slots]) holding each slot's direction and strength."""
        super().__init__(ctx, prefix)
        self.slots, self.head_slot, self.head_weight = slots, head_slot, head_weight
        self.edit_u, self.edit_s = edit

    def _project(self, y, slot: int):
        u = self.op("Gather", [self.edit_u, self.const(slot, np.int64)], axis=0)  # [d]
        s = self.op("Gather", [self.edit_s, self.const(slot, np.int64)], axis=0)  # []
        coef = self.op("MatMul", [y, self.op("Unsqueeze", [u, self.const([1], np.int64)])])  # [B, T, 1]
        return self.op("Sub", [y, self.op("Mul", [self.op("Mul", [coef, s]), u])])

    def embedding(self, name, ids):
        x = super().embedding(name, ids)
        return self._project(x, self.slots[name]) if name in self.slots else x

    def linear(self, x, weight, bias, conv1d=False):
        if weight == self.head_weight and self.head_slot is not None:
            x = self._project(x, self.head_slot)
            return super().linear(x, weight, bias, conv1d)
        if weight not in self.slots:
            return super().linear(x, weight, bias, conv1d)
        slot, bias_edited = self.slots[weight]
        if bias and not bias_edited:
            return self.op(
                "Add", [self._project(super().linear(x, weight, None, conv1d), slot), self._w(bias)]
            )
        return self._project(super().linear(x, weight, bias, conv1d), slot)  # P(Wx + b) = P(Wx) + P(b)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise PatcherError("--engine-dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")


def build(sm: StreamedModel, dtype: str = "fp32") -> ir.Model:
    """The search graph with the weights of export variant `dtype` (plain rounding: a search starts
    from an original model, which has no ablation for orthogonal rounding to keep)."""
    check_dtype(dtype)
    res, L = sm.resolved, sm.n_layers
    v = VARIANTS[dtype]
    # it has its own last_n, not num_logits_to_keep
    ctx = context(sm, v["weights"], v["act"], variant_quant(dtype), logits_to_keep=False)
    d = sm.hp.d_model
    edit_u = ir.Value(name="edit_u", type=ir.TensorType(FLOAT), shape=ir.Shape([2 * L + 2, d]))
    edit_s = ir.Value(name="edit_s", type=ir.TensorType(FLOAT), shape=ir.Shape([2 * L + 2]))
    edit = (edit_u, edit_s)
    # logits only for the last `last_n` positions: a prefill of long prompts would otherwise pay the
    # unembedding (d_model x vocab) for every prompt token
    last_n = ir.Value(name="last_n", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    ctx.inputs += [edit_u, edit_s, last_n]
    per_layer: list[dict[str, tuple[int, bool]]] = [{} for _ in range(L)]
    top: dict[str, int] = {}
    for t in res.targets:
        if t.layer is None:
            top[t.weight[len(res.prefix) :]] = 2 * L
        else:
            rel = t.weight[len(res.layer_prefix(t.layer)) :]
            bias_rel = t.bias[len(res.layer_prefix(t.layer)) :] if t.bias else None
            per_layer[t.layer][rel] = (2 * t.layer + ROLE_SLOT[t.role], bias_rel is not None)
    head_weight = ctx.token_embed if ctx.tied else None
    x = fw.embed(EditOnnxOps(ctx, "", top, edit), sm.spec, sm.hp, ctx.input_ids, ctx.position_ids)
    for layer in range(L):
        x = fw.block(
            EditOnnxOps(ctx, res.layer_prefix(layer), per_layer[layer], edit), sm.spec, sm.hp, x, layer
        )
    x = ctx.op("Slice", [x, ctx.op("Neg", [last_n]), ctx.const([2**62], np.int64), ctx.const([1], np.int64)])
    logits = fw.head(EditOnnxOps(ctx, "", {}, edit, 2 * L + 1, head_weight), sm.spec, sm.hp, x)
    logits.name = "logits"
    logits.type = ir.TensorType(FLOAT)
    outputs = [logits, *present_outputs(ctx, FLOAT)]
    graph = ir.Graph(
        ctx.inputs,
        outputs,
        nodes=ctx.tape.nodes,
        initializers=ctx.tape.initializers,
        opset_imports=opset_imports(ctx),
        name=f"patcher-search-{sm.model_type}",
    )
    model = ir.Model(graph, ir_version=8, producer_name="patcher", producer_version=__version__)
    quantized_metadata(sm, ctx, model)
    return model


def graph_key(sm: StreamedModel, dtype: str = "fp32") -> str:
    """The cache folder's name: the model's identity, patcher's version, the graph's and the weights'."""
    return folder_identity(sm.ck.folder, __version__, "search-graph", GRAPH_VERSION, dtype)[:16]


def cached_graph(sm: StreamedModel, dtype: str = "fp32", announce=None) -> Path:
    """The search graph's file under ~/.cache/patcher/search/KEY (PATCHER_CACHE moves it), built once:
    in a folder of its own, renamed into place when complete (an interrupted build leaves no graph)."""
    cache = Path(os.environ.get("PATCHER_CACHE", Path.home() / ".cache" / "patcher")) / "search"
    root = cache / graph_key(sm, dtype)
    path = root / "model.onnx"
    if not path.is_file():
        if announce:
            announce(f"building the {dtype} search graph in {root} (cached for next time)")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"{root.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            storage.write_model(build(sm, dtype), tmp / "model.onnx")
            if not path.is_file():  # else another process built it meanwhile
                shutil.rmtree(root, ignore_errors=True)  # a folder left without its graph
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


class OnnxEngine:
    """Same interface as the numpy engine's ResidentModel (edits, forward, new_cache, select, vocab)."""

    shares_prefix = False  # the graph's sliding-window mask counts columns, not positions

    def __init__(self, sm: StreamedModel, provider: str = "cpu", announce=None, dtype: str = "fp32"):
        import onnxruntime as ort

        check_dtype(dtype)
        if provider not in available_providers():
            raise PatcherError(
                "--provider",
                f"{provider} is not available in this onnxruntime "
                f"(available: {', '.join(available_providers())})",
            )
        self.sm, self.resolved, self.n_layers, self.dtype = sm, sm.resolved, sm.n_layers, dtype
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(cached_graph(sm, dtype, announce)), opts, providers=PROVIDERS[provider]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        embed = sm.top_weights().names[sm.spec.names["embed"] + ".weight"]
        self.vocab = sm.ck.info(embed).shape[0]
        self.d = sm.hp.d_model
        self._zero = (
            np.zeros((2 * self.n_layers + 2, self.d), np.float32),
            np.zeros(2 * self.n_layers + 2, np.float32),
        )

    def edits(self, plan: Plan):
        u, s = (a.copy() for a in self._zero)
        L = self.n_layers
        untied = any(e.op == "copy_of" for e in plan.all())
        for e in plan.edits.values():
            if e.op != "project":
                continue
            if e.preserve:
                raise PatcherError(
                    "--engine onnx",
                    "norm preservation runs on the numpy engine only "
                    "(use --engine numpy, or --space norm_preserve=none)",
                )
            slot = 2 * L if e.layer is None else 2 * e.layer + ROLE_SLOT[e.role]
            u[slot], s[slot] = np.asarray(e.q, np.float64)[:, 0], e.scale
            if (
                e.layer is None
                and e.name == self.resolved.prefix + self.resolved.arch.embeds[0].weight
                and self.resolved.tied
                and not untied
            ):
                u[2 * L + 1], s[2 * L + 1] = u[slot], s[slot]
        return u, s

    def new_cache(self, batch: int) -> dict:
        return {
            n: np.zeros((batch, self.inputs[n].shape[1], 0, self.inputs[n].shape[3]), np.float32)
            for n in self.past_names
        }

    @staticmethod
    def select(cache: dict, rows) -> None:
        for n in cache:
            cache[n] = cache[n][rows]

    def forward(self, ids, mask, pos, cache, edits, last: int | None = 1):
        u, s = edits if edits is not None else self._zero
        past = cache if cache is not None else self.new_cache(ids.shape[0])
        ids = np.asarray(ids, np.int64)
        n = ids.shape[1] if last is None else min(last, ids.shape[1])
        feeds = {
            "input_ids": ids,
            "attention_mask": np.asarray(mask, np.int64),
            "position_ids": np.asarray(pos, np.int64),
            "edit_u": u,
            "edit_s": s,
            "last_n": np.array([n], np.int64),
            **past,
        }
        outs = dict(zip(self.output_names, self.session.run(None, feeds)))
        if cache is not None:
            cache.update(
                {
                    n.replace("present.", "past_key_values."): v
                    for n, v in outs.items()
                    if n.startswith("present.")
                }
            )
        return outs["logits"]
