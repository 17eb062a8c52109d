"""The ONNX backend of patcher/forward.py: the same description, emitted as standard ONNX ops
(opset 17) with a KV cache, through onnx_ir. Weights become lazy initializers that are decoded from
the checkpoint one at a time when the model is saved, so export never holds the whole model.
"""

import math
from functools import partial

import numpy as np
import onnx_ir as ir

from patcher.model.numpy_ops import rope_inv_freq

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
NP: dict[ir.DataType, type[np.floating]] = {FLOAT: np.float32, FLOAT16: np.float16}


class Context:
    """Graph-wide state: the tape, graph inputs, KV cache values, masks and rotary tables."""

    def __init__(
        self,
        weight_source,
        kv_shapes: list[tuple[tuple[int, int], tuple[int, int]]],
        n_heads: int,
        weight_dtype=FLOAT,
        act=FLOAT,
        quant=None,
        token_embed: str | None = None,
        tied: bool = False,
        ortho=None,
        logits_to_keep: bool = True,
        views: dict | None = None,
        release=None,
    ):
        """weight_dtype: storage of unquantized matrices (FLOAT or FLOAT16). act: activation and KV
        cache dtype. quant: {"bits", "block", "symmetric", "accuracy"} to store every linear weight
        (and the token embedding) as MatMulNBits blocks. token_embed / tied: the embedding's name and
        whether the head reuses it (then it is stored once). ortho(name, w) -> (q, axis) or None picks
        orthogonal rounding for an edited weight. views: name -> zero-copy view of the stored tensor
        (quantizers read it in slabs); release(name) drops a view's pages from the resident set once
        its tensor is quantized (they stay in the page cache)."""
        self.tape = ir.tape.Tape()
        self.n_heads = n_heads
        self.source = weight_source  # name -> (shape, loader returning float32 numpy)
        self.weight_dtype, self.act, self.np_act = weight_dtype, act, NP[act]
        self.quant, self.ortho = quant, ortho
        self.views, self.release = views or {}, release
        self.token_embed, self.tied = token_embed, tied
        self.neg = float(np.finfo(self.np_act).min)
        self.inits: dict[str, dict[ir.DataType, ir.Value]] = {}  # name -> its value in each dtype asked
        # MatMulNBits parts by name; int8-per-channel parts by (name, transposed)
        self.quantized_inits: dict[str | tuple[str, bool], tuple] = {}
        self.quantized_meta: dict[
            str, dict
        ] = {}  # recorded in the model so verify can read the stored weights
        self.consts: dict = {}
        self.input_ids = self._input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        self.attention_mask = self._input(
            "attention_mask", ir.DataType.INT64, ["batch_size", "past_sequence_length + sequence_length"]
        )
        self.position_ids = self._input("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        self.past, self.present = [], []
        for i, ((kh, kd), (vh, vd)) in enumerate(kv_shapes):
            self.past.append(
                (
                    self._input(
                        f"past_key_values.{i}.key", act, ["batch_size", kh, "past_sequence_length", kd]
                    ),
                    self._input(
                        f"past_key_values.{i}.value", act, ["batch_size", vh, "past_sequence_length", vd]
                    ),
                )
            )
            self.present.append([None, None])
        self.inputs = [self.input_ids, self.attention_mask, self.position_ids] + [
            v for kv in self.past for v in kv
        ]
        # how many trailing positions get logits (0: all), as transformers.js >= 4 and optimum pass it
        self.logits_to_keep = (
            self._input("num_logits_to_keep", ir.DataType.INT64, []) if logits_to_keep else None
        )
        if self.logits_to_keep is not None:
            self.inputs.append(self.logits_to_keep)
        self._masks: dict[int | None, ir.Value] = {}
        self._rope: dict[tuple, tuple[ir.Value, ir.Value]] = {}

    @staticmethod
    def _input(name, dtype, dims):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))

    def op(self, op_type, inputs, **attrs):
        return self.tape.op(op_type, inputs, attrs or None)

    def const(self, value, dtype=None):
        arr = np.asarray(value, dtype=dtype or self.np_act)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            self.consts[key] = self.tape.initializer(ir.tensor(arr), name=f"const_{len(self.consts)}")
        return self.consts[key]

    def cast(self, x, to):
        return x if to is None else self.op("Cast", [x], to=to)

    def weight(self, name: str, transform=None, tag: str = "", dtype=None) -> ir.Value:
        """A checkpoint tensor as a lazy initializer (decoded, transformed, cast only at save time),
        as a value of `dtype` (default: the activation dtype)."""
        dtype = dtype or self.act
        key = name + tag
        if key not in self.inits:
            shape, load = self.source[name]
            sample_shape = tuple(shape) if transform is None else transform(np.zeros(shape, np.float32)).shape
            stored = self.weight_dtype if len(sample_shape) >= 2 else FLOAT  # norms and biases stay float32

            def produce(load=load, transform=transform, np_dtype=NP[stored]):
                arr = load()
                arr = transform(arr) if transform else arr
                return ir.tensor(np.ascontiguousarray(arr, dtype=np_dtype))

            tensor = ir.LazyTensor(produce, dtype=stored, shape=ir.Shape(sample_shape), name=key)
            self.inits[key] = {stored: self.tape.initializer(tensor, name=key)}
        views = self.inits[key]
        if dtype not in views:
            views[dtype] = self.op("Cast", [next(iter(views.values()))], to=dtype)
        return views[dtype]

    def quantized(self, name: str, conv1d: bool = False):
        """MatMulNBits tensors of the matrix `name` as [N, K] (HF Linear layout; a Conv1D weight is
        transposed first): B, scales, zero points (None when symmetric) and (K, N). The three lazy
        tensors share one quantization, computed when the first is written and dropped after the last."""
        if name not in self.quantized_inits:
            qo = self.quant
            shape, load = self.source[name]
            n, k = (shape[1], shape[0]) if conv1d else (shape[0], shape[1])
            kb = -(-k // qo["block"])
            memo: dict = {}
            parts = ["packed", "scales"] + ([] if qo["symmetric"] else ["zero_points"])

            def compute():
                from patcher.onnx.quant import quantize

                w = self.views[name]() if name in self.views else load()
                w = w.T if conv1d else w
                plan = self.ortho(name, w) if self.ortho else None
                q, axis = plan if plan else (None, 0)
                out = quantize(w, qo["bits"], qo["block"], qo["symmetric"], q, axis, self.np_act)
                self._viewed(name)
                return out

            def produce(part, np_dtype):
                if "q" not in memo:
                    memo["q"], memo["left"] = compute(), set(parts)
                arr = getattr(memo["q"], part)
                memo["left"].discard(part)
                if not memo["left"]:
                    memo.clear()  # all three written: release the tensor
                return ir.tensor(np.ascontiguousarray(arr, dtype=np_dtype))

            dims = {
                "packed": ((n, kb, qo["block"] * qo["bits"] // 8), ir.DataType.UINT8),
                "scales": ((n, kb), self.act),
                "zero_points": ((n, -(-kb * qo["bits"] // 8)), ir.DataType.UINT8),
            }
            vals = {}
            for part in parts:
                shp, dt = dims[part]
                t = ir.LazyTensor(
                    partial(produce, part, NP.get(dt, np.uint8)),
                    dtype=dt,
                    shape=ir.Shape(shp),
                    name=f"{name}.{part}",
                )
                vals[part] = self.tape.initializer(t, name=f"{name}.q{qo['bits']}.{part}")
            self.quantized_inits[name] = (vals["packed"], vals["scales"], vals.get("zero_points"), k, n)
            self.quantized_meta[name] = {
                "init": f"{name}.q{qo['bits']}",
                "conv1d": conv1d,
                "bits": qo["bits"],
                "block": qo["block"],
                "k": k,
            }
        return self.quantized_inits[name]

    def _viewed(self, name: str) -> None:
        """A view has been read through: without this a quantized build of a model mapped from disk
        ends with the whole file in its resident set (1B bf16: 2.5 GB of RssFile beside 0.7 GB anon)."""
        if name in self.views and self.release is not None:
            self.release(name)

    def channelwise(self, name: str, conv1d: bool = False, transposed: bool = True):
        """int8 codes and per-output-channel scales of the matrix `name` seen as [N, K]: codes stored [K, N]
        (MatMulInteger's B; `transposed`=False keeps [N, K], for an embedding read by rows)."""
        key = (name, transposed)
        if key not in self.quantized_inits:
            shape, load = self.source[name]
            n, k = (shape[1], shape[0]) if conv1d else (shape[0], shape[1])
            memo: dict = {}

            def produce(part):
                if "q" not in memo:
                    from patcher.onnx.quant import quantize_channels

                    w = self.views[name]() if name in self.views else load()
                    w = w.T if conv1d else w
                    plan = self.ortho(name, w) if self.ortho else None
                    q, axis = plan if plan else (None, 0)
                    memo["q"], memo["left"] = quantize_channels(w, q, axis), {"codes", "scales"}
                    self._viewed(name)
                qc = memo["q"]
                arr = (qc.codes.T if transposed else qc.codes) if part == "codes" else qc.scales
                memo["left"].discard(part)
                if not memo["left"]:
                    memo.clear()
                return ir.tensor(np.ascontiguousarray(arr))

            tag = f"{name}.q8c" + ("" if transposed else ".rows")
            codes = self.tape.initializer(
                ir.LazyTensor(
                    lambda: produce("codes"),
                    dtype=ir.DataType.INT8,
                    shape=ir.Shape((k, n) if transposed else (n, k)),
                    name=tag + ".codes",
                ),
                name=tag + ".codes",
            )
            scales = self.tape.initializer(
                ir.LazyTensor(
                    lambda: produce("scales"), dtype=FLOAT, shape=ir.Shape((n,)), name=tag + ".scales"
                ),
                name=tag + ".scales",
            )
            self.quantized_inits[key] = (codes, scales, k, n)
            self.quantized_meta.setdefault(
                name, {"init": tag, "conv1d": conv1d, "format": "int8-channel", "transposed": transposed}
            )
        return self.quantized_inits[key]

    def _matmul_integer(self, x, name, conv1d):
        """int8 weights, activations rounded to 8 bits at run time, int32 accumulation, both scales applied
        after. One activation scale per row (token), max|x|/127, not onnxruntime's one per tensor
        (DynamicQuantizeLinear): on SmolLM2-135M (64 prompts) a tensor-wide scale set by one outlier token
        took the first-token KL vs fp32 to 0.65 and top-1 agreement to 51 %; per row 0.064 and 90 %. The codes
        are
        offset by a fixed zero point 128 so MatMulInteger keeps its fast uint8 x int8 kernel (int8 x int8
        runs ~40x slower in onnxruntime's CPU build, measured)."""
        codes, scales, _, _ = self.channelwise(name, conv1d)
        f32 = lambda v: self.const(v, np.float32)  # noqa: E731
        x = self.cast(x, FLOAT if self.act != FLOAT else None)
        top = self.op("ReduceMax", [self.op("Abs", [x])], axes=[-1], keepdims=1)
        xs = self.op("Div", [self.op("Max", [top, f32(1e-30)]), f32(127.0)])  # an all-zero row: codes 128
        rounded = self.op("Round", [self.op("Div", [x, xs])])  # in [-127, 127]: no clipping needed
        xq = self.op("Cast", [self.op("Add", [rounded, f32(128.0)])], to=ir.DataType.UINT8)
        xz = self.const(128, np.uint8)
        acc = self.op("Cast", [self.op("MatMulInteger", [xq, codes, xz])], to=FLOAT)
        # weight scales first: Mul(acc, Mul(xs, scales)) is matched by onnxruntime's MatMulIntegerToFloat
        # fusion, which then computes wrong logits (|Δ| ~ the logits themselves on the gpt2 fixture)
        y = self.op("Mul", [self.op("Mul", [acc, scales]), xs])
        return self.cast(y, self.act if self.act != FLOAT else None)

    def matmul(self, x, name: str, conv1d: bool = False):
        """x @ Wᵀ for an HF Linear weight W [out, in] (x @ W for a Conv1D one)."""
        if self.quant and self.quant.get("format") == "int8-channel":
            return self._matmul_integer(x, name, conv1d)
        if self.quant:
            b, s, z, k, n = self.quantized(name, conv1d)
            attrs = {"K": k, "N": n, "bits": self.quant["bits"], "block_size": self.quant["block"]}
            if self.quant.get("accuracy") is not None:
                attrs["accuracy_level"] = self.quant["accuracy"]
            return self.tape.op(
                "MatMulNBits", [x, b, s] + ([z] if z is not None else []), attrs, domain="com.microsoft"
            )
        if conv1d:
            return self.op("MatMul", [x, self.weight(name)])
        return self.op("MatMul", [x, self.weight(name, lambda a: a.T, tag=".T")])  # MatMul wants [in, out]

    def gather_rows(self, name: str, ids):
        """Embedding rows for `ids` [B, S] -> [B, S, d]. The tied embedding is stored once: transposed
        ([d, vocab], the head's MatMul layout; rows gathered along axis 1) or as the head's MatMulNBits
        blocks (rows gathered and dequantized with standard ops, the operator's own formula)."""
        if self.quant and self.quant.get("format") == "int8-channel":
            if self.tied:  # the head's [d, vocab] codes: columns gathered, each times its token's scale
                codes, scales, _, _ = self.channelwise(name)
                cols = self.op(
                    "Transpose",
                    [self.op("Cast", [self.op("Gather", [codes, ids], axis=1)], to=FLOAT)],
                    perm=[1, 2, 0],
                )
            else:
                codes, scales, _, _ = self.channelwise(name, transposed=False)
                cols = self.op("Cast", [self.op("Gather", [codes, ids], axis=0)], to=FLOAT)
            rows = self.op(
                "Mul",
                [
                    cols,
                    self.op(
                        "Unsqueeze", [self.op("Gather", [scales, ids], axis=0), self.const([2], np.int64)]
                    ),
                ],
            )
            return self.cast(rows, self.act if self.act != FLOAT else None)
        if self.quant:
            return self._gather_quantized(name, ids)
        if name == self.token_embed and self.tied:
            cols = self.op("Gather", [self.weight(name, lambda a: a.T, tag=".T"), ids], axis=1)  # [d, B, S]
            return self.op("Transpose", [cols], perm=[1, 2, 0])
        return self.op("Gather", [self.weight(name), ids], axis=0)

    def _gather_quantized(self, name, ids):
        b, s, z, k, _ = self.quantized(name)
        bits, block = self.quant["bits"], self.quant["block"]
        i64 = lambda v: self.const(v, np.int64)  # noqa: E731
        f32 = lambda v: self.const(v, np.float32)  # noqa: E731
        codes = self.op("Cast", [self.op("Gather", [b, ids], axis=0)], to=FLOAT)  # [B, S, kb, blob]
        if bits == 4:  # unpack nibbles with float ops (exact on 0..255; BitwiseAnd is opset 18)
            codes = self._nibbles(codes, 4)
        codes = self.op("Reshape", [codes, i64([0, 0, -1, block])])  # [B, S, kb, block]
        if z is None:
            zero = f32(float(1 << (bits - 1)))
        else:
            zero = self.op("Cast", [self.op("Gather", [z, ids], axis=0)], to=FLOAT)  # [B, S, zbytes]
            if bits == 4:
                zero = self._nibbles(zero, 3)
            kb = -(-k // block)
            zero = self.op("Unsqueeze", [self.op("Slice", [zero, i64([0]), i64([kb]), i64([2])]), i64([3])])
        scale = self.op(
            "Unsqueeze",
            [self.cast(self.op("Gather", [s, ids], axis=0), FLOAT if self.act != FLOAT else None), i64([3])],
        )
        w = self.op("Mul", [self.op("Sub", [codes, zero]), scale])
        w = self.op("Reshape", [w, i64([0, 0, -1])])
        if k % block:
            w = self.op("Slice", [w, i64([0]), i64([k]), i64([2])])
        return self.cast(w, self.act if self.act != FLOAT else None)

    def _nibbles(self, x, rank):
        """[..., m] float codes of packed bytes (`rank` dims) -> [..., 2m], low nibble first."""
        f32 = lambda v: self.const(v, np.float32)  # noqa: E731
        hi = self.op("Floor", [self.op("Div", [x, f32(16.0)])])
        lo = self.op("Sub", [x, self.op("Mul", [hi, f32(16.0)])])
        ax = self.const([-1], np.int64)
        pair = self.op("Concat", [self.op("Unsqueeze", [lo, ax]), self.op("Unsqueeze", [hi, ax])], axis=-1)
        return self.op("Reshape", [pair, self.const([0] * (rank - 1) + [-1], np.int64)])

    # --- shared subgraphs -------------------------------------------------------------------------
    def mask(self, window: int | None) -> ir.Value:
        """Additive attention bias [B, 1, S, T]: causal (offset by the cache), padding, sliding window."""
        if window not in self._masks:
            am = self.attention_mask
            total = self.op("Gather", [self.op("Shape", [am]), self.const(1, np.int64)], axis=0)
            seq = self.op("Gather", [self.op("Shape", [self.input_ids]), self.const(1, np.int64)], axis=0)
            kidx = self.op("Range", [self.const(0, np.int64), total, self.const(1, np.int64)])
            qabs = self.op(
                "Unsqueeze",
                [
                    self.op("Range", [self.op("Sub", [total, seq]), total, self.const(1, np.int64)]),
                    self.const([1], np.int64),
                ],
            )
            allowed = self.op("LessOrEqual", [kidx, qabs])  # [S, T]
            if window:
                allowed = self.op(
                    "And",
                    [
                        allowed,
                        self.op("Greater", [kidx, self.op("Sub", [qabs, self.const(window, np.int64)])]),
                    ],
                )
            pad = self.op(
                "Unsqueeze", [self.op("Cast", [am], to=ir.DataType.BOOL), self.const([1, 2], np.int64)]
            )
            allowed = self.op("And", [self.op("Unsqueeze", [allowed, self.const([0, 1], np.int64)]), pad])
            self._masks[window] = self.op("Where", [allowed, self.const(0.0), self.const(self.neg)])
        return self._masks[window]

    def cos_sin(self, rope):
        key = (rope.theta, rope.dim, rope.kind)
        if key not in self._rope:
            inv, att = rope_inv_freq(rope)
            pos = self.op(
                "Unsqueeze", [self.op("Cast", [self.position_ids], to=FLOAT), self.const([1, 3], np.int64)]
            )
            freqs = self.op("Mul", [pos, self.const(inv, np.float32)])  # [B, 1, S, dim/2]
            cos, sin = self.op("Cos", [freqs]), self.op("Sin", [freqs])
            if att != 1.0:
                cos, sin = (self.op("Mul", [v, self.const(att, np.float32)]) for v in (cos, sin))
            to = None if self.act == FLOAT else self.act
            self._rope[key] = (self.cast(cos, to), self.cast(sin, to))
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

    def _w(self, name, transform=None, tag="", dtype=None):
        return self.ctx.weight(self.prefix + name, transform, tag, dtype)

    def _f32(self, x):
        """Into float32 for a reduction that float16 would overflow (x² in a norm, softmax sums)."""
        return x if self.ctx.act == FLOAT else self.op("Cast", [x], to=FLOAT)

    def _back(self, x):
        return x if self.ctx.act == FLOAT else self.op("Cast", [x], to=self.ctx.act)

    # elementwise
    def add(self, a, b):
        return self.op("Add", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def scale(self, x, s: float):
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
            return self.op(
                "Mul", [self.op("Mul", [x, self.const(0.5)]), self.op("Add", [erf, self.const(1.0)])]
            )
        if kind in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"):
            cube = self.op("Mul", [self.op("Mul", [x, x]), x])
            inner = self.op(
                "Mul",
                [
                    self.op("Add", [x, self.op("Mul", [cube, self.const(0.044715)])]),
                    self.const(math.sqrt(2 / math.pi)),
                ],
            )
            return self.op(
                "Mul",
                [
                    self.op("Mul", [x, self.const(0.5)]),
                    self.op("Add", [self.op("Tanh", [inner]), self.const(1.0)]),
                ],
            )
        if kind == "relu":
            return self.op("Relu", [x])
        raise NotImplementedError(f"activation {kind!r}")

    # layers
    def embedding(self, name, ids):
        full = self.prefix + name
        if full == self.ctx.token_embed:
            return self.ctx.gather_rows(full, ids)
        return self.op("Gather", [self._w(name), ids], axis=0)

    def linear(self, x, weight, bias, conv1d=False):
        y = self.ctx.matmul(x, self.prefix + weight, conv1d)
        return self.op("Add", [y, self._w(bias)]) if bias else y

    def rms_norm(self, x, weight, eps, offset=0.0):
        # Pow(x, 2) (not Mul(x, x)) is the pattern onnxruntime fuses into one normalization kernel
        x = self._f32(x)
        f = np.float32
        var = self.op("ReduceMean", [self.op("Pow", [x, self.const(2.0, f)])], axes=[-1], keepdims=1)
        normed = self.op("Div", [x, self.op("Sqrt", [self.op("Add", [var, self.const(eps, f)])])])
        gain = self._w(
            weight,
            (lambda a: a + np.float32(offset)) if offset else None,
            tag="+1" if offset else "",
            dtype=FLOAT,
        )
        return self._back(self.op("Mul", [normed, gain]))

    def layer_norm(self, x, weight, bias, eps):
        return self._back(
            self.op(
                "LayerNormalization",
                [self._f32(x), self._w(weight, dtype=FLOAT), self._w(bias, dtype=FLOAT)],
                axis=-1,
                epsilon=float(eps),
            )
        )

    # attention
    def split(self, x, sizes):
        if isinstance(sizes, int):
            return self._split_equal(x, sizes)
        return self.ctx.tape.op_multi_out(
            "Split", [x, self.const(sizes, np.int64)], {"axis": -1}, num_outputs=len(sizes)
        )

    def _split_equal(self, x, parts):
        # opset 17 Split needs sizes: take the last dim at run time
        last = self.op("Gather", [self.op("Shape", [x]), self.const(-1, np.int64)], axis=0)
        each = self.op("Div", [last, self.const(parts, np.int64)])
        sizes = self.op("Concat", [self.op("Unsqueeze", [each, self.const([0], np.int64)])] * parts, axis=0)
        return self.ctx.tape.op_multi_out("Split", [x, sizes], {"axis": -1}, num_outputs=parts)

    def split_per_head(self, x, heads, parts, head_dim):
        y = self.op("Reshape", [x, self.const([0, 0, heads, parts * head_dim], np.int64)])
        outs = self.ctx.tape.op_multi_out(
            "Split", [y, self.const([head_dim] * parts, np.int64)], {"axis": -1}, num_outputs=parts
        )
        return [self.op("Reshape", [o, self.const([0, 0, heads * head_dim], np.int64)]) for o in outs]

    def heads(self, x, n, head_dim):
        return self.op(
            "Transpose",
            [self.op("Reshape", [x, self.const([0, 0, n, head_dim], np.int64)])],
            perm=[0, 2, 1, 3],
        )

    def merge_heads(self, x):
        return self.op(
            "Reshape", [self.op("Transpose", [x], perm=[0, 2, 1, 3]), self.const([0, 0, -1], np.int64)]
        )

    def concat(self, xs, axis=-1):
        return self.op("Concat", list(xs), axis=axis)

    def expand_heads(self, x, n):
        return self.op("Expand", [x, self.const([1, n, 1, 1], np.int64)])

    def rope(self, x, rope):
        cos, sin = self.ctx.cos_sin(rope)
        ax = self.const([3], np.int64)

        def sl(a, b, step=1):
            return self.op(
                "Slice",
                [
                    x,
                    self.const([a], np.int64),
                    self.const([b], np.int64),
                    ax,
                    self.const([step], np.int64),
                ],
            )

        half = rope.dim // 2
        x1, x2 = (
            (sl(0, rope.dim, 2), sl(1, rope.dim, 2))
            if rope.interleaved
            else (sl(0, half), sl(half, rope.dim))
        )
        parts = [
            self.op("Sub", [self.op("Mul", [x1, cos]), self.op("Mul", [x2, sin])]),
            self.op("Add", [self.op("Mul", [x2, cos]), self.op("Mul", [x1, sin])]),
        ]
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
        scores = self.op(
            "Mul", [self.op("Reshape", [scores, self.const([0, heads, -1, 0], np.int64)]), self.const(scale)]
        )
        if softcap:
            scores = self.softcap(scores, softcap)
        probs = self._back(
            self.op("Softmax", [self._f32(self.op("Add", [scores, ctx.mask(window)]))], axis=-1)
        )
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
        values_idx = self.ctx.tape.op_multi_out(
            "TopK", [choice, self.const([top_k], np.int64)], {"axis": -1}, num_outputs=2
        )
        top = values_idx[1]
        weights = self.op("GatherElements", [probs, top], axis=-1)
        if normalize:
            denom = self.op("ReduceSum", [weights, self.const([-1], np.int64)], keepdims=1)
            if grouped is not None:
                denom = self.op("Add", [denom, self.const(1e-20)])
            weights = self.op("Div", [weights, denom])
        if grouped is not None:
            weights = self.op("Mul", [weights, self.const(grouped["scaling"])])
        dense = self.op(
            "ScatterElements", [self.op("Mul", [logits, self.const(0.0)]), top, weights], axis=-1
        )  # [B,S,E]
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
        top2 = self.ctx.tape.op_multi_out(
            "TopK", [g, self.const([2], np.int64)], {"axis": -1}, num_outputs=2
        )[0]
        group_scores = self.op("ReduceSum", [top2, self.const([-1], np.int64)], keepdims=0)  # [B, S, G]
        kth = self.ctx.tape.op_multi_out(
            "TopK", [group_scores, self.const([keep], np.int64)], {"axis": -1}, num_outputs=2
        )[0]
        threshold = self.op("ReduceMin", [kth], axes=[-1], keepdims=1)
        ok = self.op("GreaterOrEqual", [group_scores, threshold])  # [B, S, G]
        ok = self.op("Unsqueeze", [ok, self.const([3], np.int64)])
        masked = self.op("Where", [ok, g, self.const(float("-inf"))])
        return self.op("Reshape", [masked, self.const([0, 0, -1], np.int64)])


def _kv_dims(past_k, past_v):
    ks, vs = past_k.shape, past_v.shape
    return (int(ks[1]), int(ks[3])), (int(vs[1]), int(vs[3]))
