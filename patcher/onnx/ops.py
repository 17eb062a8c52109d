"""The ONNX backend of patcher/forward.py: the same description, emitted as standard ONNX ops
(opset 17) with a KV cache, through onnx_ir. Weights become lazy initializers that are decoded from
the checkpoint one at a time when the model is saved, so export never holds the whole model.
"""
import math

import numpy as np
import onnx_ir as ir

from patcher.model.numpy_ops import rope_inv_freq

FLOAT = ir.DataType.FLOAT
_NEG = float(np.finfo(np.float32).min)


class Context:
    """Graph-wide state: the tape, graph inputs, KV cache values, masks and rotary tables."""

    def __init__(self, weight_source, kv_shapes: list[tuple[tuple[int, int], tuple[int, int]]], n_heads: int,
                 weight_dtype=FLOAT):
        self.tape = ir.tape.Tape()
        self.n_heads = n_heads
        self.source = weight_source  # name -> (shape, loader returning float32 numpy)
        self.weight_dtype = weight_dtype
        self.inits: dict[str, ir.Value] = {}
        self.consts: dict = {}
        self.input_ids = self._input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        self.attention_mask = self._input("attention_mask", ir.DataType.INT64,
                                          ["batch_size", "past_sequence_length + sequence_length"])
        self.position_ids = self._input("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        self.past, self.present = [], []
        for i, ((kh, kd), (vh, vd)) in enumerate(kv_shapes):
            past = "past_sequence_length"
            self.past.append((self._input(f"past_key_values.{i}.key", FLOAT, ["batch_size", kh, past, kd]),
                              self._input(f"past_key_values.{i}.value", FLOAT, ["batch_size", vh, past, vd])))
            self.present.append([None, None])
        self.inputs = [self.input_ids, self.attention_mask, self.position_ids] + [
            v for kv in self.past for v in kv]
        self._masks, self._rope = {}, {}

    @staticmethod
    def _input(name, dtype, dims):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))

    def op(self, op_type, inputs, **attrs):
        return self.tape.op(op_type, inputs, attrs or None)

    def const(self, value, dtype=np.float32):
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            self.consts[key] = self.tape.initializer(ir.tensor(arr), name=f"const_{len(self.consts)}")
        return self.consts[key]

    def weight(self, name: str, transform=None, tag: str = "") -> ir.Value:
        """A checkpoint tensor as a lazy initializer (decoded, transformed, cast only at save time)."""
        key = name + tag
        if key not in self.inits:
            shape, load = self.source[name]
            sample_shape = tuple(shape) if transform is None else transform(np.zeros(shape, np.float32)).shape
            dtype = self.weight_dtype if len(sample_shape) >= 2 else FLOAT  # norms and biases stay float32
            np_dtype = np.float16 if dtype == ir.DataType.FLOAT16 else np.float32

            def produce(load=load, transform=transform, np_dtype=np_dtype):
                arr = load()
                arr = transform(arr) if transform else arr
                return ir.tensor(np.ascontiguousarray(arr, dtype=np_dtype))
            tensor = ir.LazyTensor(produce, dtype=dtype, shape=ir.Shape(sample_shape), name=key)
            value = self.tape.initializer(tensor, name=key)
            self.inits[key] = value if dtype == FLOAT else self.op("Cast", [value], to=FLOAT)
        return self.inits[key]

    # --- shared subgraphs -------------------------------------------------------------------------
    def mask(self, window: int | None) -> ir.Value:
        """Additive attention bias [B, 1, S, T]: causal (offset by the cache), padding, sliding window."""
        if window not in self._masks:
            am = self.attention_mask
            total = self.op("Gather", [self.op("Shape", [am]), self.const(1, np.int64)], axis=0)
            seq = self.op("Gather", [self.op("Shape", [self.input_ids]), self.const(1, np.int64)], axis=0)
            kidx = self.op("Range", [self.const(0, np.int64), total, self.const(1, np.int64)])
            qabs = self.op("Unsqueeze", [self.op("Range", [self.op("Sub", [total, seq]), total,
                                                           self.const(1, np.int64)]),
                                         self.const([1], np.int64)])
            allowed = self.op("LessOrEqual", [kidx, qabs])  # [S, T]
            if window:
                start = self.op("Sub", [qabs, self.const(window, np.int64)])
                allowed = self.op("And", [allowed, self.op("Greater", [kidx, start])])
            pad = self.op("Unsqueeze", [self.op("Cast", [am], to=ir.DataType.BOOL),
                                        self.const([1, 2], np.int64)])
            allowed = self.op("And", [self.op("Unsqueeze", [allowed, self.const([0, 1], np.int64)]), pad])
            self._masks[window] = self.op("Where", [allowed, self.const(0.0), self.const(_NEG)])
        return self._masks[window]

    def cos_sin(self, rope):
        key = (rope.theta, rope.dim, rope.kind)
        if key not in self._rope:
            inv, att = rope_inv_freq(rope)
            pos = self.op("Unsqueeze", [self.op("Cast", [self.position_ids], to=FLOAT),
                                        self.const([1, 3], np.int64)])
            freqs = self.op("Mul", [pos, self.const(inv)])  # [B, 1, S, dim/2]
            cos, sin = self.op("Cos", [freqs]), self.op("Sin", [freqs])
            if att != 1.0:
                cos, sin = self.op("Mul", [cos, self.const(att)]), self.op("Mul", [sin, self.const(att)])
            self._rope[key] = (cos, sin)
        return self._rope[key]


class OnnxOps:
    """One block's (or the top level's) view: weight names are relative to `prefix`."""

    def __init__(self, ctx: Context, prefix: str = ""):
        self.ctx, self.prefix = ctx, prefix
        self.op, self.const = ctx.op, ctx.const

    def has(self, name):
        return self.prefix + name in self.ctx.source

    def w(self, name):
        return self._w(name)

    def _w(self, name, transform=None, tag=""):
        return self.ctx.weight(self.prefix + name, transform, tag)

    # elementwise
    def add(self, a, b):
        return self.op("Add", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def scale(self, x, s, round_to_dtype=False):
        return self.op("Mul", [x, self.const(s)])

    def sigmoid(self, x):
        return self.op("Sigmoid", [x])

    def softcap(self, x, cap):
        return self.op("Mul", [self.op("Tanh", [self.op("Div", [x, self.const(cap)])]), self.const(cap)])

    def act(self, x, kind):
        if kind in ("silu", "swish"):
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        if kind == "gelu":
            erf = self.op("Erf", [self.op("Mul", [x, self.const(1 / math.sqrt(2))])])
            return self.op("Mul", [self.op("Mul", [x, self.const(0.5)]),
                                   self.op("Add", [erf, self.const(1.0)])])
        if kind in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"):
            cube = self.op("Mul", [self.op("Mul", [x, x]), x])
            inner = self.op("Mul", [self.op("Add", [x, self.op("Mul", [cube, self.const(0.044715)])]),
                                    self.const(math.sqrt(2 / math.pi))])
            return self.op("Mul", [self.op("Mul", [x, self.const(0.5)]),
                                   self.op("Add", [self.op("Tanh", [inner]), self.const(1.0)])])
        if kind == "relu":
            return self.op("Relu", [x])
        raise NotImplementedError(f"activation {kind!r}")

    # layers
    def embedding(self, name, ids):
        return self.op("Gather", [self._w(name), ids], axis=0)

    def linear(self, x, weight, bias, conv1d=False):
        w = self._w(weight) if conv1d else self._w(weight, lambda a: a.T, tag=".T")  # MatMul wants [in, out]
        y = self.op("MatMul", [x, w])
        return self.op("Add", [y, self._w(bias)]) if bias else y

    def rms_norm(self, x, weight, eps, offset=0.0):
        # Pow(x, 2) (not Mul(x, x)) is the pattern onnxruntime fuses into one normalization kernel
        var = self.op("ReduceMean", [self.op("Pow", [x, self.const(2.0)])], axes=[-1], keepdims=1)
        normed = self.op("Div", [x, self.op("Sqrt", [self.op("Add", [var, self.const(eps)])])])
        gain = self._w(weight, (lambda a: a + np.float32(offset)) if offset else None,
                       tag="+1" if offset else "")
        return self.op("Mul", [normed, gain])

    def layer_norm(self, x, weight, bias, eps):
        return self.op("LayerNormalization", [x, self._w(weight), self._w(bias)], axis=-1, epsilon=float(eps))

    # attention
    def split(self, x, sizes):
        if isinstance(sizes, int):
            return self._split_equal(x, sizes)
        return self.ctx.tape.op_multi_out("Split", [x, self.const(sizes, np.int64)], {"axis": -1},
                                          num_outputs=len(sizes))

    def _split_equal(self, x, parts):
        # opset 17 Split needs sizes: take the last dim at run time
        last = self.op("Gather", [self.op("Shape", [x]), self.const(-1, np.int64)], axis=0)
        each = self.op("Div", [last, self.const(parts, np.int64)])
        sizes = self.op("Concat", [self.op("Unsqueeze", [each, self.const([0], np.int64)])] * parts, axis=0)
        return self.ctx.tape.op_multi_out("Split", [x, sizes], {"axis": -1}, num_outputs=parts)

    def split_per_head(self, x, heads, parts, head_dim):
        y = self.op("Reshape", [x, self.const([0, 0, heads, parts * head_dim], np.int64)])
        outs = self.ctx.tape.op_multi_out("Split", [y, self.const([head_dim] * parts, np.int64)],
                                          {"axis": -1}, num_outputs=parts)
        return [self.op("Reshape", [o, self.const([0, 0, heads * head_dim], np.int64)]) for o in outs]

    def heads(self, x, n, head_dim):
        return self.op("Transpose", [self.op("Reshape", [x, self.const([0, 0, n, head_dim], np.int64)])],
                       perm=[0, 2, 1, 3])

    def merge_heads(self, x):
        return self.op("Reshape", [self.op("Transpose", [x], perm=[0, 2, 1, 3]),
                                   self.const([0, 0, -1], np.int64)])

    def concat(self, xs, axis=-1):
        return self.op("Concat", list(xs), axis=axis)

    def expand_heads(self, x, n):
        return self.op("Expand", [x, self.const([1, n, 1, 1], np.int64)])

    def rope(self, x, rope):
        cos, sin = self.ctx.cos_sin(rope)
        ax = self.const([3], np.int64)
        sl = lambda a, b, step=1: self.op("Slice", [  # noqa: E731
            x, self.const([a], np.int64), self.const([b], np.int64), ax, self.const([step], np.int64)])
        half = rope.dim // 2
        x1, x2 = ((sl(0, rope.dim, 2), sl(1, rope.dim, 2)) if rope.interleaved
                  else (sl(0, half), sl(half, rope.dim)))
        parts = [self.op("Sub", [self.op("Mul", [x1, cos]), self.op("Mul", [x2, sin])]),
                 self.op("Add", [self.op("Mul", [x2, cos]), self.op("Mul", [x1, sin])])]
        if rope.dim:
            parts.append(sl(rope.dim, 1 << 30))
        return self.op("Concat", parts, axis=-1)

    def attend(self, q, k, v, layer, scale, softcap, window):
        ctx = self.ctx
        past_k, past_v = ctx.past[layer]
        k = self.op("Concat", [past_k, k], axis=2)
        v = self.op("Concat", [past_v, v], axis=2)
        ctx.present[layer] = [k, v]
        (kh, _), (_, vd) = _kv_dims(past_k, past_v)  # dims come from the cache declaration
        heads = ctx.n_heads
        qg = self.op("Reshape", [q, self.const([0, kh, -1, 0], np.int64)])  # [B, kv, G*S, hd]
        scores = self.op("MatMul", [qg, self.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = self.op("Mul", [self.op("Reshape", [scores, self.const([0, heads, -1, 0], np.int64)]),
                                 self.const(scale)])
        if softcap:
            scores = self.softcap(scores, softcap)
        probs = self.op("Softmax", [self.op("Add", [scores, ctx.mask(window)])], axis=-1)
        out = self.op("MatMul", [self.op("Reshape", [probs, self.const([0, kh, -1, 0], np.int64)]), v])
        return self.op("Reshape", [out, self.const([0, heads, -1, vd], np.int64)])

    def moe(self, x, router, top_k, normalize, experts, grouped=None):
        """Dense MoE: every expert runs on every token and is weighted by its routing weight (zero
        when not chosen). Exact, simple, and standard-op only; it costs all experts' compute."""
        logits = self.op("MatMul", [x, self._w(router, lambda a: a.T, tag=".T")])  # [B, S, E]
        if grouped is None:
            probs = self.op("Softmax", [logits], axis=-1)
            choice = probs
        else:
            probs = self.op("Sigmoid", [logits])
            choice = self.op("Add", [probs, self._w(grouped["bias"])]) if self.has(grouped["bias"]) else probs
            choice = self._group_limit(choice, grouped)
        values_idx = self.ctx.tape.op_multi_out("TopK", [choice, self.const([top_k], np.int64)], {"axis": -1},
                                                num_outputs=2)
        top = values_idx[1]
        weights = self.op("GatherElements", [probs, top], axis=-1)
        if normalize:
            denom = self.op("ReduceSum", [weights, self.const([-1], np.int64)], keepdims=1)
            if grouped is not None:
                denom = self.op("Add", [denom, self.const(1e-20)])
            weights = self.op("Div", [weights, denom])
        if grouped is not None:
            weights = self.op("Mul", [weights, self.const(grouped["scaling"])])
        dense = self.op("ScatterElements", [self.op("Mul", [logits, self.const(0.0)]), top, weights],
                        axis=-1)  # [B,S,E]
        out = None
        for e, expert in enumerate(experts):
            w_e = self.op("Gather", [dense, self.const([e], np.int64)], axis=-1)  # [B, S, 1]
            y = self.op("Mul", [expert(x), w_e])
            out = y if out is None else self.op("Add", [out, y])
        return out

    def _group_limit(self, choice, grouped):
        G, keep = grouped["n_group"], grouped["topk_group"]
        if G <= 1:
            return choice
        g = self.op("Reshape", [choice, self.const([0, 0, G, -1], np.int64)])  # [B, S, G, E/G]
        top2 = self.ctx.tape.op_multi_out("TopK", [g, self.const([2], np.int64)], {"axis": -1},
                                          num_outputs=2)[0]
        group_scores = self.op("ReduceSum", [top2, self.const([-1], np.int64)], keepdims=0)  # [B, S, G]
        kth = self.ctx.tape.op_multi_out("TopK", [group_scores, self.const([keep], np.int64)], {"axis": -1},
                                         num_outputs=2)[0]
        threshold = self.op("ReduceMin", [kth], axes=[-1], keepdims=1)
        ok = self.op("GreaterOrEqual", [group_scores, threshold])  # [B, S, G]
        ok = self.op("Unsqueeze", [ok, self.const([3], np.int64)])
        masked = self.op("Where", [ok, g, self.const(float("-inf"))])
        return self.op("Reshape", [masked, self.const([0, 0, -1], np.int64)])


def _kv_dims(past_k, past_v):
    ks, vs = past_k.shape, past_v.shape
    return (int(ks[1]), int(ks[3])), (int(vs[1]), int(vs[3]))
