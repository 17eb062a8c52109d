"""`patcher convert`: a GGUF as a Hugging Face safetensors folder, and an HF safetensors model as a GGUF.

GGUF -> HF: the tensors are the GGUF's HF view (patcher.io.gguf.HFView: HF names and shapes, llama.cpp's
converter transforms undone, as `extract` reads a GGUF), written one tensor at a time (row blocks where
no transform mixes rows) in bf16, fp16 or fp32; config.json, generation_config.json, tokenizer.json and
tokenizer_config.json (with the chat template) come from the GGUF metadata.

HF -> GGUF: what llama.cpp's convert_hf_to_gguf writes, from patcher's architecture table: GGUF names
(the gguf package's TensorNameMap), q/k rows permuted for llama.cpp's rope, norm gains + 1 (Gemma),
GPT-2 Conv1D weights transposed, per-expert weights stacked into `_exps` tensors; 1-D tensors F32, the
others the requested type (F32, F16, BF16, Q8_0; a matrix whose rows do not hold whole Q8_0 blocks is
F16, as the converter does); tokenizer.json's byte-level BPE vocabulary as tokenizer.ggml.*.
"""

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from patcher_kernels.codecs import itemsize

from patcher.errors import PatcherError
from patcher.io import manifest
from patcher.io.checkpoint import INDEX_NAME
from patcher.io.gguf import CONFIG_KEYS, HFView, OutTensorGGUF, write_gguf
from patcher.io.gguf_fields import INT32, encode, typed
from patcher.io.gguf_hf import side_files
from patcher.io.gguf_pretokenizers import PRE_TOKENIZERS, pre_tokenizer
from patcher.io.writer import OutputFolder, OutTensor, write_safetensors
from patcher.model.architectures import Architecture, GGUFLayout
from patcher.model.opened import Model

# --dtype -> (safetensors dtype, config.json torch_dtype)
HF_DTYPES = {"bf16": ("BF16", "bfloat16"), "fp16": ("F16", "float16"), "fp32": ("F32", "float32")}
# --type -> llama.cpp's general.file_type (LlamaFileType)
GGUF_TYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7}
SHARD_BYTES = 5_000_000_000  # HF's default max_shard_size
BLOCK_BYTES = 64 << 20  # float32 bytes per row block of a large tensor
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.(weight|bias)$")
_SKIPPED = ("rotary_emb.inv_freq",)  # buffers some checkpoints store; llama.cpp's converter drops them too
# text that tells llama.cpp's pre-tokenizers apart: contractions, digit runs, spaces, newlines, symbols
_PROBE = "Hello world! I'm 12345 don't\n\n  x  \tTHE'LL  $3.50 – naïve 日本語 ...\r\n  end"


@dataclass
class Converted:
    out: Path
    tensors: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def target_format(model: Model, to: str | None) -> str:
    """hf for a GGUF input, gguf for a safetensors one; --to must be the other format."""
    other = "hf" if model.is_gguf else "gguf"
    if to is not None and to.lower() not in ("hf", "gguf"):
        raise PatcherError("--to", f"must be hf or gguf, got {to!r}")
    if to is not None and to.lower() != other:
        raise PatcherError(
            "--to",
            f"the input is already {'GGUF' if model.is_gguf else 'HF safetensors'}; "
            f"convert writes the other format ({other})",
        )
    return other


def _check_name(out, fmt: str) -> None:
    """A GGUF output is one file named *.gguf; an HF output is a folder (no .gguf name)."""
    is_gguf = str(out).lower().endswith(".gguf")
    if fmt == "gguf" and not is_gguf:
        raise PatcherError("-o/--output", f"{out}: the GGUF is one file; name it *.gguf")
    if fmt == "hf" and is_gguf:
        raise PatcherError("-o/--output", f"{out}: converting to hf writes a folder; name it without .gguf")


# --- GGUF -> HF ---------------------------------------------------------------------------------------


def check_hf_dtype(dtype: str) -> tuple[str, str]:
    if dtype not in HF_DTYPES:
        raise PatcherError("--dtype", f"must be one of {', '.join(HF_DTYPES)}, got {dtype!r}")
    return HF_DTYPES[dtype]


def to_hf(
    model: Model, out, dtype: str = "bf16", *, force: bool = False, command: str = "", hash_files: bool = True
) -> Converted:
    st_dtype, torch_dtype = check_hf_dtype(dtype)
    _check_name(out, "hf")
    t0 = time.perf_counter()
    g = model.storage
    view = model.forward_model().storage  # HFView; the hyperparameters HF needs are checked here
    files = side_files(g, torch_dtype)  # a vocabulary patcher cannot read fails here, before any work
    shards = _shards([(n, math.prod(view.info(n).shape) * itemsize(st_dtype)) for n in view.tensors])
    hasher = manifest.Hasher(enabled=hash_files)
    hasher.add(g.path.name, g.path)
    try:
        with OutputFolder(out, model.input_paths, force=force) as tmp:
            weight_map, total = {}, 0
            for fname, names in shards:
                tensors = [
                    OutTensor(n, st_dtype, view.info(n).shape, produce=partial(_hf_blocks, view, n, st_dtype))
                    for n in names
                ]
                sha = write_safetensors(tmp / fname, tensors, {"format": "pt"}, hash_out=hash_files)
                if sha:
                    hasher.set("out/" + fname, sha)
                else:  # --no-hash: the size
                    hasher.add("out/" + fname, tmp / fname)
                weight_map.update(dict.fromkeys(names, fname))
                total += sum(t.nbytes for t in tensors)
            if len(shards) > 1:
                files[INDEX_NAME] = (
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
                )
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
                hasher.add("out/" + name, tmp / name)
            digests = hasher.results()
            seconds = time.perf_counter() - t0
            manifest.write(
                tmp,
                kind="convert",
                command=command,
                record={"op": "convert", "from": "gguf", "to": "hf", "dtype": dtype},
                inputs={k: v for k, v in digests.items() if not k.startswith("out/")},
                outputs={k[4:]: v for k, v in digests.items() if k.startswith("out/")},
                timings={"seconds": round(seconds, 3)},
            )
    except BaseException:
        hasher.cancel()
        raise
    return Converted(Path(out), len(view.tensors), total, seconds)


def _shards(sizes: list[tuple[str, int]]) -> list[tuple[str, list[str]]]:
    """Tensors in order, cut into files of at most SHARD_BYTES (HF's model-0000i-of-0000n names)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, n in sizes:
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    k = len(groups)
    return [(f"model-{i + 1:05d}-of-{k:05d}.safetensors", names) for i, names in enumerate(groups)]


def _row_blocks(rows: int, row_floats: int) -> Iterator[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // (4 * max(row_floats, 1)))
    for s in range(0, rows, step):
        yield s, min(rows, s + step)


def _hf_blocks(view: HFView, name: str, st_dtype: str) -> Iterator[np.ndarray]:
    """The tensor's values in the storage dtype; row blocks where the view reads rows independently
    (no q/k un-permutation, no transpose, not an expert slice)."""
    from patcher_kernels.codecs import encode as encode_values

    shape = view.info(name).shape
    gname, expert = view.map[name]
    layout = view.g.architecture.gguf_layout
    row_local = (
        len(shape) == 2
        and expert is None
        and not view._transposed(name, shape)
        and not (layout.rope_permuted and re.search(r"attn_[qk]\.", gname))
    )
    spans = _row_blocks(shape[0], math.prod(shape[1:])) if row_local else [(None, None)]
    for s, e in spans:
        v = view.array(name) if s is None else view.array(name, s, e)
        data = encode_values(np.asarray(v, dtype=np.float32), st_dtype)
        if st_dtype == "F16" and not np.isfinite(data).all():
            raise PatcherError(
                "--dtype", f"{name} holds values beyond fp16's range (±65504); use --dtype bf16 or fp32"
            )
        yield data
    view.release(name)


# --- HF -> GGUF ---------------------------------------------------------------------------------------


def check_gguf_type(qtype: str) -> str:
    q = qtype.upper()
    if q not in GGUF_TYPES:
        raise PatcherError("--type", f"must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    return q


def to_gguf(model: Model, out, qtype: str = "F16", *, force: bool = False, command: str = "") -> Converted:
    from patcher.edit.gguf_apply import AtomicFile
    from patcher.io.paths import check_output

    qtype = check_gguf_type(qtype)
    _check_name(out, "gguf")
    path = check_output(out, model.input_paths, force=force, kind="file")
    t0 = time.perf_counter()
    _, layout = _gguf_layout(model)
    model.hp  # noqa: B018 - the hyperparameters llama.cpp needs, checked before any work
    notes: list[str] = []
    tensors = _gguf_tensors(model, layout.arch, qtype, notes)
    fields = _gguf_metadata(model, layout.arch, qtype) + _vocab_fields(model)
    record = {"op": "convert", "from": "hf", "to": "gguf", "type": qtype, "source": str(model.source)}
    fields.append(encode("patcher.convert", json.dumps(record, sort_keys=True)))
    with AtomicFile(path, [model.path], force=True) as tmp:
        write_gguf(tmp, fields, tensors)
        size = tmp.stat().st_size
    return Converted(path, len(tensors), size, time.perf_counter() - t0, notes)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's permute() (rows per head from (2, half) to (half, 2)); HFView undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Source:
    """One GGUF tensor made from HF tensors: a single one, or the per-expert ones stacked."""

    gguf: str
    hf: list[str]
    transposed: bool = False


def _gguf_layout(model: Model) -> tuple[Architecture, GGUFLayout]:
    """The model's table and its [gguf] section (llama.cpp's names for it)."""
    arch = model.arch
    if arch is None or arch.gguf_layout is None:
        raise PatcherError(
            arch.source if arch else model.source,
            f"model_type {model.model_type!r} has no [gguf] section: its GGUF names are not known",
        )
    return arch, arch.gguf_layout


def _gguf_tensors(model: Model, arch: str, qtype: str, notes: list) -> list[OutTensorGGUF]:
    from gguf import MODEL_ARCH_NAMES, TensorNameMap

    arch_id = {v: k for k, v in MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_id is None:
        raise PatcherError(
            _gguf_layout(model)[0].source, f"the gguf package does not know architecture {arch!r}"
        )
    tmap = TensorNameMap(arch_id, model.n_layers)
    sources: dict[str, _Source] = {}
    experts: dict[str, dict[int, str]] = {}
    for name in model.tensors:
        if model.is_scale(name) or name.endswith(_SKIPPED):
            continue
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(f"{m[1]}.{m[3]}.{m[4]}", {})[int(m[2])] = name
            continue
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise PatcherError(
                model.path, f"tensor {name!r} has no GGUF name for {arch} (llama.cpp would not load it)"
            )
        shape = model.info(name).shape
        sources[g] = _Source(
            g, [name], model.spec.conv1d and len(shape) == 2 and name.endswith(".weight") and ".h." in name
        )
    for base, by_e in experts.items():
        stem, suffix = base.rsplit(".", 1)
        g = tmap.get_name(stem)
        if g is None or sorted(by_e) != list(range(len(by_e))):
            raise PatcherError(model.path, f"experts {stem}.*: no GGUF name, or expert numbers with gaps")
        sources[g + "." + suffix] = _Source(g + "." + suffix, [by_e[e] for e in sorted(by_e)])
    fallback = []
    out = []
    for src in sources.values():
        shape = model.info(src.hf[0]).shape
        if src.transposed:
            shape = tuple(reversed(shape))
        if len(src.hf) > 1:
            shape = (len(src.hf), *shape)
        t = "F32" if len(shape) < 2 else qtype
        if t == "Q8_0" and shape[-1] % 32:
            t = "F16"
            fallback.append(src.gguf)
        out.append(_out_tensor(model, src, shape, t))
    if fallback:
        notes.append(
            f"{len(fallback)} tensors written F16: their rows do not hold whole Q8_0 blocks "
            f"({', '.join(fallback[:4])}{' …' if len(fallback) > 4 else ''})"
        )
    return out


def _out_tensor(model: Model, src: _Source, shape: tuple, t: str) -> OutTensorGGUF:
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    qt = GGMLQuantizationType[t]
    block, size = GGML_QUANT_SIZES[qt]
    return OutTensorGGUF(
        src.gguf,
        int(qt),
        tuple(reversed(shape)),
        math.prod(shape) // block * size,
        produce=lambda: _gguf_blocks(model, src, qt),
    )


def _gguf_blocks(model: Model, src: _Source, qt) -> Iterator[np.ndarray]:
    from gguf.quants import quantize

    _, layout = _gguf_layout(model)
    permute = layout.rope_permuted and re.search(r"attn_[qk]\.(weight|bias)$", src.gguf)
    shift = layout.norm_shift if src.gguf.endswith("norm.weight") else 0.0
    for name in src.hf:
        shape = model.info(name).shape
        whole = permute or src.transposed or len(shape) != 2 or model.fp8_scale(name) is not None
        spans = [(None, None)] if whole else _row_blocks(shape[0], math.prod(shape[1:]))
        for s, e in spans:
            v = model.decode(name) if s is None else model.array(name, s, e).astype(np.float32)
            v = np.asarray(v, dtype=np.float32)
            if src.transposed:
                v = np.ascontiguousarray(v.T)
            if shift:
                v = v + np.float32(shift)
            if permute:
                heads = model.hp.n_heads if "attn_q" in src.gguf else model.hp.n_kv
                v = _permute(v, heads)
            yield np.ascontiguousarray(quantize(v, qt))
        model.release(name)


def _gguf_metadata(model: Model, arch: str, qtype: str) -> list[bytes]:
    """general.* and {arch}.* keys: the config's hyperparameters under llama.cpp's names."""
    cfg, hp, spec = model.config, model.hp, model.spec
    g = lambda *keys: next((cfg[k] for k in keys if cfg.get(k) is not None), None)  # noqa: E731
    kv: dict = {}
    for hf, key in CONFIG_KEYS.items():  # whatever the config spells with HF's usual names
        v = cfg.get(hf)
        if isinstance(v, (bool, int, float)):
            kv[key] = v
    kv.update(
        {
            "context_length": g("max_position_embeddings", "n_positions", "n_ctx"),
            "embedding_length": hp.d_model,
            "block_count": hp.n_layers,
            "feed_forward_length": g("intermediate_size", "n_inner") or 4 * hp.d_model,
            "attention.head_count": hp.n_heads,
            "attention.head_count_kv": hp.n_kv,
            (
                "attention.layer_norm_epsilon" if spec.norm == "layer" else "attention.layer_norm_rms_epsilon"
            ): float(hp.eps),
        }
    )
    if "head_dim" in cfg:
        kv["attention.key_length"] = kv["attention.value_length"] = hp.head_dim
    if hp.ropes:
        rope = next(iter(hp.ropes.values()))
        kv["rope.freq_base"], kv["rope.dimension_count"] = float(rope.theta), rope.dim
    fields = [
        encode("general.architecture", arch),
        encode("general.name", Path(str(model.source)).name or "model"),
        encode("general.file_type", GGUF_TYPES[qtype]),
        encode("general.quantization_version", 2),
    ]
    for key, v in kv.items():
        if v is None:
            continue
        fields.append(encode(f"{arch}.{key}", float(v) if isinstance(v, float) else v))
    return fields


def _vocab_fields(model: Model) -> list[bytes]:
    """tokenizer.json (a byte-level BPE) and tokenizer_config.json as tokenizer.ggml.* and the chat
    template. The pre-tokenizer is named by behaviour: the llama.cpp name whose split of a probe text
    (contractions, digits, spaces, symbols) equals tokenizer.json's own."""
    from patcher.model.prompts import load_tokenizer as load_hf

    tok = load_hf(model.folder)
    spec = json.loads(tok.tokenizer.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise PatcherError(
            model.folder / "tokenizer.json",
            "convert to GGUF reads byte-level BPE "
            "vocabularies (GPT-2 style) only; this tokenizer is "
            f"{bpe.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder",
        )
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    if "" in tokens:
        raise PatcherError(
            model.folder / "tokenizer.json", "token ids have gaps; GGUF needs one token per id"
        )
    added = {a["content"]: a for a in spec.get("added_tokens") or []}
    types = [(3 if added[t].get("special") else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]
    pre = _pre_tokenizer_name(tok.tokenizer, model.folder / "tokenizer.json")
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": typed(types, INT32),
        "tokenizer.ggml.merges": merges,
    }
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("pad_token", "padding"),
        ("unk_token", "unknown"),
    ):
        token_id = tok.special_id(name)
        if token_id is not None:
            md[f"tokenizer.ggml.{key}_token_id"] = token_id
    md["tokenizer.ggml.add_bos_token"] = _adds_bos(tok)
    if tok.chat_template is not None:
        md["tokenizer.chat_template"] = tok.chat_template
    return [encode(k, v) for k, v in md.items()]


def _adds_bos(tok) -> bool:
    bos = tok.bos_id
    return bos is not None and tok.tokenizer.encode("x").ids[:1] == [bos]


def _pre_tokenizer_name(tokenizer, where) -> str:
    want = _split(tokenizer.normalizer, tokenizer.pre_tokenizer)
    for name in PRE_TOKENIZERS:
        if _split(tokenizer.normalizer, pre_tokenizer(name, where)) == want:
            return name
    raise PatcherError(
        where,
        "its pre-tokenizer splits text like none of the llama.cpp pre-tokenizers "
        f"patcher knows ({', '.join(sorted(PRE_TOKENIZERS))})",
    )


def _split(normalizer, pre) -> list[str]:
    text = normalizer.normalize_str(_PROBE) if normalizer else _PROBE
    return [p for p, _ in pre.pre_tokenize_str(text)] if pre else [text]
