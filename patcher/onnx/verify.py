"""`patcher verify` and `patcher generate`: onnxruntime against the numpy forward (parity, greedy
agreement), the direction's projection per layer, and behaviour (marker rate, first-token KL)."""

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patcher import __version__
from patcher.errors import PatcherError
from patcher.io.manifest import folder_identity
from patcher.io.paths import read_json_object
from patcher.model.execution import StreamedModel
from patcher.model.prompts import (
    PromptTokenizer,
    check_lengths,
    encode_prompts,
    left_pad,
    load_tokenizer,
    read_prompt_file,
)
from patcher.onnx.export import FILES, variant_file, variants_in  # noqa: F401 (FILES: for the CLI)
from patcher.onnx.quality import QUALITY_PROMPTS, QUALITY_TOKENS, Quality, compare, kl
from patcher.onnx.runtime import OnnxModel

NEUTRAL_PROMPTS = Path(__file__).parents[1] / "data" / "neutral_prompts.txt"
# max |Δ logits| / max(1, max |logits|) allowed per export dtype, against the numpy forward of the weights
# the file stores (quantized variants: their dequantized blocks), so each variant checks its graph, not its
# rounding: fp32 and the fp32-activation quantized variants are exact up to float summation order; fp16
# weights are compared with the exact checkpoint (rounding each weight to 11 bits); q4f16 computes in
# float16; int8 (MatMulInteger, transformers.js's q8) also rounds each matmul's input to 8 bits per tensor
# at run time, which the reference does not: measured 2e-2..2.5e-1 on the tiny random test models (real
# models are far less touchy).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int4": 1e-4, "q4f16": 2e-2, "int8": 0.35}
# refusal-style markers peers count (case-insensitive, straight or curly apostrophes)
MARKERS = [
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "as an ai",
    "i apologize",
    "i'm not able",
    "i am not able",
    "i won't",
    "i will not",
]


def marker_rate(texts: list[str]) -> float:
    norm = [t.lower().replace("\u2019", "'").replace("\u2018", "'") for t in texts]
    return sum(any(m in t for m in MARKERS) for t in norm) / max(len(texts), 1)


def cached_export(model: Path, dtype: str = "fp32", announce=None) -> Path:
    """A safetensors folder's export in the cache (keyed by path, file sizes and mtimes, version)."""
    from patcher.onnx.export import export

    model = Path(model).resolve()
    key = folder_identity(model, __version__, dtype)
    root = Path(os.environ.get("PATCHER_CACHE", Path.home() / ".cache" / "patcher")) / "onnx" / key[:16]
    if dtype not in variants_in(root):  # added beside the variants cached before
        if announce:
            announce(f"exporting {model} ({dtype}) to ONNX in {root} (cached for next time)")
        root.parent.mkdir(parents=True, exist_ok=True)  # the cache is ours: output rules ask for a parent
        export(model, root, dtype=dtype)
    return root


def is_onnx_folder(path: Path) -> bool:
    return (Path(path) / "onnx").is_dir()


@dataclass
class Prompts:
    texts: list[str]
    ids: list[list[int]]
    tokenizer: PromptTokenizer

    def batch(self, rows: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = range(len(self.ids)) if rows is None else rows
        return left_pad([self.ids[i] for i in rows], self.tokenizer.pad_id)


def load_prompts(
    folder: Path, prompts_file, chat_template=True, system=None, limit=None, extra: int = 0, model=None
) -> Prompts:
    """`model`: an opened Model whose tokenizer and config to use (a GGUF has no folder of its own)."""
    tok = model.tokenizer() if model is not None else load_tokenizer(folder)
    texts = read_prompt_file(prompts_file or NEUTRAL_PROMPTS, limit)
    ids = encode_prompts(tok, texts, chat_template=chat_template and tok.has_chat_template, system=system)
    if any(len(i) == 0 for i in ids):
        raise PatcherError(prompts_file or NEUTRAL_PROMPTS, "a prompt tokenizes to nothing")
    config = model.config if model is not None else folder_config(folder)
    check_lengths(ids, config, prompts_file or NEUTRAL_PROMPTS, extra=extra)
    return Prompts(texts, ids, tok)


def folder_config(folder: Path) -> dict:
    """config.json of a model or export folder ({} when absent)."""
    path = Path(folder) / "config.json"
    return read_json_object(path, "config.json") if path.exists() else {}


def greedy_numpy(sm: StreamedModel, ids, mask, n: int) -> np.ndarray:
    """Greedy continuation with the numpy forward (no cache: the reference, not the fast path)."""
    out = []
    for _ in range(n):
        tok = sm.run(ids, mask, logits=True)[:, -1].argmax(-1)
        out.append(tok)
        ids = np.concatenate([ids, tok[:, None]], 1)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], 1)
    return np.stack(out, 1)


def stored_weights(folder: Path, dtype: str) -> dict[str, np.ndarray]:
    """The matrices a quantized variant stores, dequantized (float64, the checkpoint's layout), by
    checkpoint tensor name. {} for unquantized variants."""
    import json

    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor

    from patcher.onnx.quant import Quantized, dequantize

    path = Path(folder) / "onnx" / variant_file(folder, dtype)
    model = onnx.load(str(path), load_external_data=False)
    meta = json.loads({p.key: p.value for p in model.metadata_props}.get("patcher.quantized", "{}"))
    if not meta:
        return {}
    inits = {t.name: t for t in model.graph.initializer}

    def arr(name):
        t = inits.get(name)
        if t is None:
            return None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(path.parent))
        return numpy_helper.to_array(t)

    out = {}
    for name, m in meta.items():
        if m.get("format") == "int8-channel":
            codes = arr(m["init"] + ".codes").astype(np.float64)
            w = (codes.T if m["transposed"] else codes) * arr(m["init"] + ".scales").astype(np.float64)[
                :, None
            ]
            out[name] = w.T if m["conv1d"] else w
            continue
        qt = Quantized(
            arr(m["init"] + ".packed"),
            arr(m["init"] + ".scales").astype(np.float32),
            arr(m["init"] + ".zero_points"),
            m["bits"],
            m["block"],
            m["k"],
        )
        w = dequantize(qt)
        out[name] = w.T if m["conv1d"] else w
    return out


class StoredModel(StreamedModel):
    """The numpy forward with some tensors replaced (by what an export stores)."""

    def __init__(self, model, replaced: dict, arch_table=None):
        super().__init__(model, arch_table)
        self.replaced = replaced

    def top_weights(self):
        top = super().top_weights()
        for short, full in top.names.items():  # embedding rows are read from the table itself otherwise
            if full in self.replaced and not dict.__contains__(top, short):
                top[short] = self.replaced[full].astype(np.float32)
        return top

    def _decode(self, name):
        if name in self.replaced:
            return self.replaced[name].astype(np.float32)
        return super()._decode(name)


def leakage(stored: dict, exact: StreamedModel, original: StreamedModel | None, q: np.ndarray) -> dict:
    """For every stored matrix the edit made orthogonal to Q: |QᵀW_stored| relative to |QᵀW_original|
    (with the original model) and to a generic weight's share |W| sqrt(k/d); also the exact checkpoint's."""
    from patcher.onnx.export import orthogonal_plan

    plan = orthogonal_plan(q)
    d, k = q.shape
    rows = []
    for name, w in stored.items():
        x = exact._decode(name)
        p = plan(name, x)  # both in the checkpoint's layout
        if p is None:
            continue
        axis = p[1]
        proj = (lambda a: q.T @ a) if axis == 0 else (lambda a: a @ q)
        row = {
            "tensor": name,
            "axis": axis,
            "stored_generic": float(np.linalg.norm(proj(w)) / (np.linalg.norm(w) * np.sqrt(k / d))),
            "exact_generic": float(
                np.linalg.norm(proj(x.astype(np.float64))) / (np.linalg.norm(x) * np.sqrt(k / d))
            ),
        }
        if original is not None:
            base = np.linalg.norm(proj(original._decode(name).astype(np.float64)))
            row["stored_of_original"] = float(np.linalg.norm(proj(w)) / base) if base else None
            row["exact_of_original"] = (
                float(np.linalg.norm(proj(x.astype(np.float64))) / base) if base else None
            )
        rows.append(row)
    summary = {"tensors": len(rows)}
    for key in ("stored_generic", "exact_generic", "stored_of_original", "exact_of_original"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            summary[key + "_max"] = max(vals)
    return {"summary": summary, "tensors": rows}


def stop_tokens(folder: Path, tok: PromptTokenizer) -> list[int]:
    """The token ids generation stops at: the tokenizer's eos and generation_config.json's eos_token_id."""
    ids = {tok.eos_id} if tok.eos_id is not None else set()
    gen = Path(folder) / "generation_config.json"
    if gen.exists():
        data = read_json_object(gen, "generation config")
        e = data.get("eos_token_id")
        e = e if isinstance(e, list) else [e] if e is not None else []
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in e):
            raise PatcherError(
                gen, f"eos_token_id must be a token id or a list of them, got {data['eos_token_id']!r}"
            )
        ids |= set(e)
    return sorted(i for i in ids if i is not None)


PARITY_CHUNK = 8  # prompts per numpy forward: memory holds one chunk's logits, whatever the prompt count


def _chunks(n: int, size: int = PARITY_CHUNK):
    return (range(i, min(i + size, n)) for i in range(0, n, size))


@dataclass
class VerifyReport:
    dtype: str
    tolerance: float
    max_abs_diff: float = 0.0
    max_abs_logit: float = 0.0
    top1_agreement: float = 0.0  # the graph against numpy on the weights the file stores
    generation_match: float = 0.0
    tokens_compared: int = 0
    projections: list = field(default_factory=list)  # per layer {"layer", "edited", "original"}
    marker_rate: dict = field(default_factory=dict)
    first_token_kl: float | None = None
    completions: dict = field(default_factory=dict)
    quality: Quality | None = None  # the variant's answers against the fp32 model's
    leakage: dict = field(default_factory=dict)

    @property
    def parity_ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance * max(1.0, self.max_abs_logit)

    def as_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "parity_ok": self.parity_ok,
            "max_abs_logit_diff": self.max_abs_diff,
            "max_abs_logit": self.max_abs_logit,
            "top1_agreement": self.top1_agreement,
            "greedy_token_match": self.generation_match,
            "greedy_tokens_compared": self.tokens_compared,
            "projections": self.projections,
            "marker_rate": self.marker_rate,
            "first_token_kl": self.first_token_kl,
            "completions": self.completions,
            "quality": self.quality.as_dict() if self.quality else None,
            "leakage": self.leakage,
        }


def verify(
    onnx_dir: Path,
    reference: Path,
    *,
    dtype: str = "fp32",
    prompts=None,
    original: Path | None = None,
    direction=None,
    tokens: int = 8,
    provider: str = "cpu",
    chat_template: bool = True,
    behaviour_tokens: int = 24,
    quality_tokens: int = QUALITY_TOKENS,
    announce=None,
    arch_table=None,
) -> VerifyReport:
    """Parity of the graph with numpy on the stored weights (`prompts`, default the 8 neutral ones), the
    variant's quality against the fp32 model (`prompts`, default the 64 quality prompts; none for fp32
    itself or with quality_tokens 0), leakage and projections along `direction`, behaviour against
    `original`. Every pass goes prompt chunk by prompt chunk: memory does not grow with their number."""
    rep = VerifyReport(dtype, TOLERANCE[dtype])
    onnx_model = OnnxModel(onnx_dir, variant_file(onnx_dir, dtype), provider)
    exact = StreamedModel(reference, arch_table)
    if original is not None:
        same_model_shape(exact, StreamedModel(original, arch_table), original)
    stored = stored_weights(onnx_dir, dtype)
    ref = StoredModel(reference, stored, arch_table) if stored else exact
    p = load_prompts(reference, prompts, chat_template, model=exact.model)
    agree = positions = same = 0
    for rows in _chunks(len(p.ids)):
        ids, mask = p.batch(rows)
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        got, _ = onnx_model.step(ids, mask, pos, onnx_model.empty_cache(ids.shape[0]))
        want = ref.run(ids, mask, logits=True)
        real = mask.astype(bool)
        rep.max_abs_diff = max(rep.max_abs_diff, float(np.abs(got - want)[real].max()))
        rep.max_abs_logit = max(rep.max_abs_logit, float(np.abs(want)[real].max()))
        agree += int((got.argmax(-1) == want.argmax(-1))[real].sum())
        positions += int(real.sum())
        del got, want
        if tokens:
            a, b = onnx_model.generate(ids, mask, tokens), greedy_numpy(ref, ids, mask, tokens)
            same, rep.tokens_compared = same + int((a == b).sum()), rep.tokens_compared + int(a.size)
    rep.top1_agreement = agree / max(positions, 1)
    rep.generation_match = same / rep.tokens_compared if rep.tokens_compared else 0.0
    if dtype != "fp32" and quality_tokens:
        qp = load_prompts(
            reference, prompts or QUALITY_PROMPTS, chat_template, extra=quality_tokens, model=exact.model
        )
        fp32_dir = onnx_dir if "fp32" in variants_in(onnx_dir) else cached_export(reference, "fp32", announce)
        rep.quality = compare(
            OnnxModel(fp32_dir, variant_file(fp32_dir, "fp32"), provider),
            onnx_model,
            qp.ids,
            quality_tokens,
            stop_tokens(reference, qp.tokenizer),
        )
    if stored and direction is not None:
        from patcher_kernels.project import orthonormalize

        orig_sm = StreamedModel(original, arch_table) if original else None
        rep.leakage = leakage(stored, exact, orig_sm, orthonormalize(direction.vectors))
    ids, mask = p.batch()
    if direction is not None:
        rep.projections = projections(
            exact, StreamedModel(original, arch_table) if original else None, ids, mask, direction
        )
    if original is not None and prompts is not None:
        orig_dir = cached_export(original, "fp32", announce)
        eos = stop_tokens(reference, p.tokenizer)
        texts: dict[str, list[str]] = {}
        for label, folder in (("original", orig_dir), ("edited", onnx_dir)):
            m = OnnxModel(folder, variant_file(folder, "fp32" if label == "original" else dtype), provider)
            texts[label] = []
            for rows in _chunks(len(p.ids)):
                new = m.generate(*p.batch(rows), behaviour_tokens, eos_ids=eos)
                texts[label] += [
                    p.tokenizer.decode(until_eos(row, eos), skip_special_tokens=True) for row in new
                ]
            rep.marker_rate[label] = marker_rate(texts[label])
        rep.completions = texts
        orig, kls = StreamedModel(original, arch_table), []
        for rows in _chunks(len(p.ids)):
            ids, mask = p.batch(rows)
            kls += list(kl(orig.run(ids, mask, logits=True)[:, -1], exact.run(ids, mask, logits=True)[:, -1]))
        rep.first_token_kl = float(np.mean(kls))
    return rep


def until_eos(row: np.ndarray, eos: Iterable[int]) -> list[int]:
    """A generated row's tokens before the first stop token."""
    out = []
    for t in row.tolist():
        if t in eos:
            break
        out.append(t)
    return out


# what an edit never changes: a --original that differs in any of these is another model
SHAPE = ("d_model", "n_layers", "n_heads", "n_kv", "head_dim")


def same_model_shape(edited: StreamedModel, original: StreamedModel, where) -> None:
    """Refuse an --original that cannot be the edited model's base: its numbers would look plausible."""
    pairs = {
        "model_type": (edited.model_type, original.model_type),
        **{k: (getattr(edited.hp, k), getattr(original.hp, k)) for k in SHAPE},
        "vocab_size": (edited.model.config.get("vocab_size"), original.model.config.get("vocab_size")),
    }
    differ = [f"{k} {a} vs {b}" for k, (a, b) in pairs.items() if a != b]
    if differ:
        raise PatcherError(where, f"is not the edited model's original ({', '.join(differ)}: edited vs this)")


def projections(edited: StreamedModel, original: StreamedModel | None, ids, mask, direction) -> list[dict]:
    """Mean |r̂ · resid_pre[l]| / |resid_pre[l]| over real tokens, per layer, for each model."""
    r = direction.unit[0]
    real = mask.astype(bool)
    rows: dict[int, dict] = {}  # layer -> its row
    for label, sm in (("edited", edited), ("original", original)):
        if sm is None:
            continue

        def grab(l, x, label=label):
            v = x[real].astype(np.float64)
            rows.setdefault(l, {"layer": l})[label] = float(
                np.mean(np.abs(v @ r) / np.linalg.norm(v, axis=-1))
            )

        sm.run(ids, mask, on_resid=grab)
    return [rows[l] for l in sorted(rows)]
