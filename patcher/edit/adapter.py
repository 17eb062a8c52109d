"""The edit as a LoRA adapter: ΔW = B·A, computed by streaming each weight once; the edited model is
never written.

A rank-k ablation W' = W - s Q(QᵀW) is, in nn.Linear orientation [out, in], exactly
    B = -s Q  [d_model, k],   A = QᵀW  [k, in]      (A accumulated in float64 over row blocks).
Residual-axis-1 storage (embeddings [vocab, d_model], GPT-2 Conv1D [in, d_model]) gives A = (W Q)ᵀ.
Post-norm writers already carry u instead of r̂ in the plan's Q, so the same formula holds. A writer
bias b changes by -s Q(Qᵀb): PEFT carries that as `lora_B.bias` (lora_bias=True); LoRA as such cannot.

Two containers:
- PEFT (`adapter_config.json` + `adapter_model.safetensors`), key names and shapes as PEFT saves them
  (peft/tuners/lora/layer.py): Linear/Conv1D `lora_A.weight` [k, in], `lora_B.weight` [out, k]
  (Conv1D: fan_in_fan_out=True, same factor shapes); Embedding `lora_embedding_A` [k, vocab],
  `lora_embedding_B` [d_model, k]; fused experts of transformers >= 5 (`target_parameters`,
  ParamWrapper) `lora_A.weight` [E·k, in] expert-major, `lora_B.weight` [out, k·E] rank-major.
- llama.cpp's GGUF LoRA (src/llama-adapter.cpp): `<gguf tensor>.lora_a` numpy [k, in] and `.lora_b`
  [out, k]; for `token_embd.weight` lora_a is [vocab, k] (llm_build_inp_embd gathers its rows); for
  `ffn_down_exps` [E, k, in] and [E, out, k] (build_lora_mm_id picks each token's experts from both).
  Scale alpha / rank with alpha = k, so 1.
"""

import json
import math
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from patcher import __version__
from patcher.edit.apply import BLOCK_ROWS, block_reader, matrices
from patcher.edit.plan import Plan, TensorEdit
from patcher.errors import PatcherError
from patcher.io import manifest
from patcher.io.atomic import AtomicOutput
from patcher.io.writer import OutTensor, write_safetensors

FORMATS = ("peft", "gguf")
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"

# Per-expert writers on disk that transformers >= 5 fuses at load time into one 3-D parameter
# [experts, d_model, in] (module path relative to the layer prefix): PEFT reaches it through
# `target_parameters`. (checkpoint pattern relative to the layer prefix, fused parameter path)
FUSED_EXPERTS = {
    "qwen2_moe": ("mlp.experts.{expert}.down_proj.weight", "mlp.experts.down_proj"),
    "qwen3_moe": ("mlp.experts.{expert}.down_proj.weight", "mlp.experts.down_proj"),
    "mixtral": ("block_sparse_moe.experts.{expert}.w2.weight", "mlp.experts.down_proj"),
}
# Not deepseek_v3: PEFT 0.21 + transformers 5.24 leave its dense and shared-expert down_proj unadapted
# when loading such an adapter (found by the oracle test), so it is refused rather than written wrong.


@dataclass
class Factor:
    """ΔW of one module as B·A (float32), plus the bias change if the plan edits one."""

    name: str  # checkpoint tensor (experts: the first expert's)
    module: str  # HF module path (experts: the fused parameter path)
    kind: str  # linear | conv1d | embedding | experts
    a: np.ndarray  # [k, in] ([E, k, in] for experts; embedding: [k, vocab])
    b: np.ndarray  # [out, k] ([E, out, k] for experts)
    bias: np.ndarray | None = None
    layer: int | None = None


@dataclass
class AdapterReport:
    out: Path
    fmt: str
    rank: int
    modules: int = 0
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    hash_files: bool = True


def adapter_format(path: Path) -> str:
    return "gguf" if Path(path).suffix.lower() == ".gguf" else "peft"


def _module_of(plan: Plan, name: str) -> str:
    """HF module path of a checkpoint tensor: hub checkpoints may drop the model's prefix
    (GPT-2 without `transformer.`); the module tree always has it."""
    res = plan.resolved
    canonical = res.arch.prefixes[0]
    return canonical + name[len(res.prefix) :].removesuffix(".weight")


def _expert_groups(plan: Plan) -> dict[str, tuple[str, list[tuple[int, str]]]]:
    """weight name -> (fused parameter path, [(expert, weight name)...] of its layer)."""
    spec = FUSED_EXPERTS.get(plan.resolved.arch.model_type)
    if spec is None:
        return {}
    pattern, fused = spec
    groups: dict[int, list[tuple[int, str]]] = {}
    for e in plan.edits.values():
        if e.op != "project" or e.layer is None:
            continue
        lp = plan.resolved.layer_prefix(e.layer)
        rx = re.escape(lp + pattern).replace(re.escape("{expert}"), r"(\d+)") + r"\Z"
        m = re.match(rx, e.name)
        if m:
            groups.setdefault(e.layer, []).append((int(m[1]), e.name))
    canonical = plan.resolved.arch.prefixes[0]
    out = {}
    for layer, members in groups.items():
        path = canonical + plan.resolved.layer_prefix(layer)[len(plan.resolved.prefix) :] + fused
        for _, n in members:
            out[n] = (path, sorted(members))
    return out


def _refuse(problem: str) -> PatcherError:
    return PatcherError("--adapter", problem)


FULL = "write a full model with -o"


def check(plan: Plan, fmt: str) -> None:
    """Refuse, before any work, what an adapter in this format cannot carry."""
    if fmt not in FORMATS:
        raise _refuse(f"format must be one of {FORMATS}")
    if plan.ck.storage.names != "hf":  # a GGUF: its weights are quantized and named for llama.cpp
        raise _refuse(
            "adapters are made from the safetensors model (the factors need its names and exact "
            "weights); a GGUF input is not supported here"
        )
    projected = [e for e in plan.all() if e.op == "project"]
    if any(e.op == "copy_of" for e in plan.all()) or plan.new:
        raise _refuse(
            "an adapter cannot untie embeddings (it adds to the base's weights, and a tied base "
            f"shares one matrix); drop --untie-embeddings or {FULL}"
        )
    if any(e.preserve for e in projected):
        raise _refuse(
            "--norm-preserve rescales every row or column: that is not a low-rank change, so no "
            f"LoRA adapter carries it; drop --norm-preserve or {FULL}"
        )
    for e in projected:
        if len(e.shape) != 2:
            raise _refuse(
                f"{e.name} is a fused {len(e.shape)}-D expert tensor; adapters here cover 2-D "
                f"weights only: pass --targets without mlp_out or {FULL}"
            )
    FORMAT_CHECKS[fmt](plan, _Parts(plan, projected))


class _Parts:
    """What an adapter would carry, sorted by what the formats treat differently."""

    def __init__(self, plan: Plan, projected: list[TensorEdit]):
        self.projected = projected
        self.experts = _expert_groups(plan)
        self.with_expert = [e for e in projected if "{expert}" in _writer_pattern(plan, e)]
        self.biases = [e for e in plan.edits.values() if e.op == "project_bias"]
        self.embeds = [e for e in projected if e.role == "embed"]


def _check_peft(plan: Plan, p: _Parts) -> None:
    for e in p.with_expert:
        if e.name not in p.experts:
            mt = plan.resolved.arch.model_type
            raise _refuse(
                f"{e.name}: per-expert writers of {mt} have no known PEFT target; "
                f"pass --targets without mlp_out or {FULL}"
            )
    for path, members in {v[0]: v[1] for v in p.experts.values()}.items():
        if [i for i, _ in members] != list(range(len(members))):
            raise _refuse(f"{path}: the fused PEFT target needs every expert of the layer")
    if p.biases and p.embeds:
        raise _refuse(
            f"this edit changes {len(p.biases)} writer biases (PEFT: lora_bias, which PEFT "
            f"refuses on embedding layers) and {len(p.embeds)} embeddings; write two adapters "
            f"(--targets embed, then --targets attn_out,mlp_out) or {FULL}"
        )
    if p.biases and p.experts:
        raise _refuse("PEFT's fused-expert adapters refuse lora_bias; this edit changes biases too")


def _check_gguf(plan: Plan, p: _Parts) -> None:
    if p.biases:
        raise _refuse(
            f"llama.cpp LoRA adapters carry no biases and this edit changes {len(p.biases)} "
            f"(e.g. {p.biases[0].name}); write a PEFT adapter (a folder) or {FULL}"
        )
    for e in p.with_expert:
        if e.name not in p.experts:
            raise _refuse(
                f"{e.name}: no GGUF LoRA layout is known for these expert writers; pass "
                f"--targets without mlp_out or write a PEFT adapter"
            )
    if p.embeds and plan.resolved.tied:
        # measured: llama.cpp 0.3.36 aborts (GGML_ASSERT in build_lora_mm) on such an adapter
        raise _refuse(
            "tied embeddings: llama.cpp applies a token_embd LoRA to the tied output "
            "projection too, in the gathered-row orientation, and aborts; pass --targets "
            "attn_out,mlp_out or write a PEFT adapter"
        )
    _gguf_names(plan, p.projected)  # every tensor must have a llama.cpp name


# what each adapter format cannot carry, beyond what none can
FORMAT_CHECKS = {"peft": _check_peft, "gguf": _check_gguf}


def _writer_pattern(plan: Plan, edit: TensorEdit) -> str:
    if edit.layer is None:
        return ""
    lp = plan.resolved.layer_prefix(edit.layer)
    for w in plan.resolved.arch.writers:
        rx = re.escape(lp + w.weight).replace(re.escape("{expert}"), r"\d+") + r"\Z"
        if re.match(rx, edit.name):
            return w.weight
    return ""


def _gguf_arch(plan: Plan) -> str:
    """llama.cpp's `general.architecture`: the [gguf] arch of the model's table (an error without one)."""
    import gguf

    layout = getattr(plan.resolved.arch, "gguf_layout", None)
    arch = layout.arch if layout is not None else None
    if arch is None or arch not in gguf.MODEL_ARCH_NAMES.values():
        raise PatcherError(
            "--adapter",
            f"no llama.cpp architecture is known for model_type {plan.resolved.arch.model_type!r} "
            "(its architecture table has no [gguf] section)",
        )
    return arch


def _gguf_names(plan: Plan, edits) -> dict[str, str]:
    import gguf

    arch = _gguf_arch(plan)
    ids = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    tmap = gguf.get_tensor_name_map(ids[arch], plan.resolved.n_layers)
    experts = _expert_groups(plan)  # per-expert weights of a layer are one ffn_down_exps tensor in GGUF
    out = {}
    for e in edits:
        module = experts[e.name][0] if e.name in experts else _module_of(plan, e.name)
        name = tmap.get_name(module)
        if name is None:
            raise PatcherError("--adapter", f"llama.cpp's {arch} has no tensor for {e.name}")
        if e.role == "embed" and name != "token_embd":
            raise PatcherError(
                "--adapter",
                f"llama.cpp applies no LoRA to {name} ({e.name}); pass --targets "
                f"attn_out,mlp_out or write a PEFT adapter",
            )
        out[e.name] = name + ".weight"
    return out


# --- the factors ------------------------------------------------------------------------------------


def _lowrank(plan: Plan, edit: TensorEdit) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one 2-D weight in nn.Linear orientation, reading the weight once, one row block at a
    time, float64 accumulation."""
    ((first, rows, axis),) = matrices(edit)
    read = block_reader(plan.ck, edit, first)
    q = np.asarray(edit.q, dtype=np.float64)
    if axis == 0:  # W [d_model, in]: A = QᵀW sums over row blocks
        a = np.zeros((q.shape[1], edit.shape[1]))
        for s in range(0, rows, BLOCK_ROWS):
            e = min(s + BLOCK_ROWS, rows)
            a += q[s:e].T @ read(s, e).astype(np.float64)
    else:  # W [rows, d_model]: each row block gives its own columns of A = (W Q)ᵀ
        a = np.empty((q.shape[1], rows))
        for s in range(0, rows, BLOCK_ROWS):
            e = min(s + BLOCK_ROWS, rows)
            a[:, s:e] = (read(s, e).astype(np.float64) @ q).T
    plan.ck.release(edit.name)
    return a.astype(np.float32), (-edit.scale * q).astype(np.float32)


def factors(plan: Plan) -> list[Factor]:
    weight_bias = {t.weight: t.bias for t in plan.resolved.targets if t.bias}
    experts = _expert_groups(plan)
    out: list[Factor] = []
    done: set[str] = set()
    for edit in plan.edits.values():
        if edit.op != "project" or edit.name in done:
            continue
        if edit.name in experts:
            path, members = experts[edit.name]
            pairs = [_lowrank(plan, plan.edits[n]) for _, n in members]
            done.update(n for _, n in members)
            out.append(
                Factor(
                    members[0][1],
                    path,
                    "experts",
                    np.stack([a for a, _ in pairs]),
                    np.stack([b for _, b in pairs]),
                    layer=edit.layer,
                )
            )
            continue
        a, b = _lowrank(plan, edit)
        kind = "embedding" if edit.role == "embed" else ("conv1d" if edit.residual_axis == 1 else "linear")
        bias = None
        bias_edit = plan.edits.get(weight_bias.get(edit.name, ""))
        if bias_edit is not None and bias_edit.op == "project_bias":
            q = np.asarray(bias_edit.q, dtype=np.float64)
            b0 = plan.ck.array(bias_edit.name).astype(np.float64)
            bias = (-bias_edit.scale * q @ (q.T @ b0)).astype(np.float32)
        out.append(Factor(edit.name, _module_of(plan, edit.name), kind, a, b, bias, edit.layer))
    return out


# --- PEFT ----------------------------------------------------------------------------------------------


def _peft_tensors(plan: Plan, fs: list[Factor]) -> dict[str, np.ndarray]:
    t = {}
    for f in fs:
        key = "base_model.model." + f.module
        if f.kind == "embedding":
            t[key + ".lora_embedding_A"], t[key + ".lora_embedding_B"] = f.a, f.b
        elif f.kind == "experts":
            E, k = f.a.shape[0], f.a.shape[1]
            t[key.rsplit(".", 1)[0] + ".lora_A.weight"] = f.a.reshape(E * k, -1)  # row e*k + j
            t[key.rsplit(".", 1)[0] + ".lora_B.weight"] = np.ascontiguousarray(
                f.b.transpose(1, 2, 0).reshape(f.b.shape[1], k * E)
            )  # column j*E + e
        else:
            t[key + ".lora_A.weight"], t[key + ".lora_B.weight"] = f.a, f.b
            if f.bias is not None:
                t[key + ".lora_B.bias"] = f.bias
    # tied unembedding [vocab, d_model] as a Linear: ΔW = -s (W Q) Qᵀ, so lora_A = embedding Bᵀ,
    # lora_B = Aᵀ
    token = _token_embedding(plan, fs)
    if token is not None:
        unembed = plan.resolved.arch.unembed.removesuffix(".weight")
        t[f"base_model.model.{unembed}.lora_A.weight"] = np.ascontiguousarray(token.b.T)
        t[f"base_model.model.{unembed}.lora_B.weight"] = np.ascontiguousarray(token.a.T)
    return t


def _token_embedding(plan: Plan, fs: list[Factor]) -> Factor | None:
    if not plan.resolved.tied:
        return None
    token = plan.resolved.prefix + plan.resolved.arch.embeds[0].weight
    return next((f for f in fs if f.name == token), None)


def peft_config(plan: Plan, fs: list[Factor], rank: int) -> dict:
    modules = sorted(f.module for f in fs if f.kind != "experts")
    params = sorted(f.module for f in fs if f.kind == "experts")
    # lora_alpha = r: PEFT's scaling alpha / r is 1
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": modules,
        "target_parameters": params or None,
        "fan_in_fan_out": any(f.kind == "conv1d" for f in fs),
        "lora_bias": any(f.bias is not None for f in fs),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": str(plan.ck.folder.resolve()),
        "revision": None,
    }
    if _token_embedding(plan, fs) is not None:
        # the tied unembedding as its own target with the same ΔW: right unmerged on the tied base, and
        # right merged on a base loaded untied (PEFT's own advice for tied merges). PEFT's
        # ensure_weight_tying would share the factors instead, but then a merge cannot be made right.
        cfg["target_modules"] = sorted([*modules, plan.resolved.arch.unembed.removesuffix(".weight")])
    return cfg


def _write_peft(
    plan: Plan,
    out: Path,
    fs: list[Factor],
    rank: int,
    force: bool,
    command: str,
    report: AdapterReport,
    record: dict,
    t0: float,
) -> None:
    tensors = _peft_tensors(plan, fs)
    cfg = peft_config(plan, fs, rank)
    with AtomicOutput(out, "folder", inputs=[plan.ck.path], force=force) as tmp:
        write_safetensors(
            tmp / WEIGHTS_NAME,
            [OutTensor(k, "F32", v.shape, produce=partial(list, [v])) for k, v in tensors.items()],
            {"format": "pt", "patcher": json.dumps(record, sort_keys=True)},
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        report.tensors = len(tensors)
        report.bytes_written = (tmp / WEIGHTS_NAME).stat().st_size
        report.seconds = time.perf_counter() - t0
        _manifest(plan, tmp, {n: tmp / n for n in (WEIGHTS_NAME, CONFIG_NAME)}, command, record, report)


# --- GGUF ----------------------------------------------------------------------------------------------


def _write_gguf(
    plan: Plan,
    out: Path,
    fs: list[Factor],
    rank: int,
    force: bool,
    command: str,
    report: AdapterReport,
    record: dict,
    t0: float,
) -> None:
    import gguf

    names = _gguf_names(plan, [plan.edits[f.name] for f in fs])
    arch = _gguf_arch(plan)
    from patcher.io.atomic import AtomicOutput
    from patcher.io.paths import check_output

    target = check_output(out, plan.ck.input_paths, force=force, kind="file", option="--adapter")
    with AtomicOutput(target) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # llama.cpp scale = alpha / rank = 1
        w.add_string("patcher.edit", json.dumps(record, sort_keys=True))
        w.add_string("patcher.version", __version__)
        inputs = _input_digests(plan, None, report.hash_files)
        w.add_string("patcher.inputs", json.dumps(inputs, sort_keys=True))
        for f in fs:
            n = names[f.name]
            a = f.a.T if n == "token_embd.weight" else f.a  # llm_build_inp_embd gathers rows of lora_a
            w.add_tensor(n + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
            w.add_tensor(n + ".lora_b", np.ascontiguousarray(f.b, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    report.tensors = 2 * len(fs)
    report.bytes_written = target.stat().st_size
    report.seconds = time.perf_counter() - t0


def _input_digests(
    plan: Plan, outputs: dict[str, Path] | None = None, hash_files: bool = True
) -> dict[str, str]:
    """sha256 (or, without hashing, sizes) of what this run read and, prefixed out/, of what it wrote."""
    hasher = manifest.Hasher(enabled=hash_files)
    try:
        for p in plan.ck.storage.input_files():
            hasher.add(p.name, p)
        for n, p in (outputs or {}).items():
            hasher.add("out/" + n, p)
        return hasher.results()
    except BaseException:
        hasher.cancel()
        raise


def _manifest(
    plan: Plan, folder: Path, outputs: dict[str, Path], command: str, record: dict, report: AdapterReport
) -> None:
    digests = _input_digests(plan, outputs, report.hash_files)
    manifest.write(
        folder,
        kind="adapter",
        command=command,
        record=record,
        inputs={k: v for k, v in digests.items() if not k.startswith("out/")},
        outputs={k[4:]: v for k, v in digests.items() if k.startswith("out/")},
        directions=[{"source": record.get("direction"), "sha256": record.get("direction_sha256")}],
        timings={"seconds": round(report.seconds, 3)},
    )


def write_adapter(
    plan: Plan,
    out: Path,
    *,
    fmt: str | None = None,
    force: bool = False,
    command: str = "",
    hash_files: bool = True,
) -> AdapterReport:
    fmt = fmt or adapter_format(out)
    check(plan, fmt)
    t0 = time.perf_counter()
    rank = int(plan.record.get("rank", 1))
    record = {**plan.record, "adapter": fmt}
    report = AdapterReport(Path(out), fmt, rank, hash_files=hash_files)
    fs = factors(plan)
    report.modules = len(fs)
    write = _write_gguf if fmt == "gguf" else _write_peft
    write(plan, Path(out), fs, rank, force, command, report, record, t0)
    if _token_embedding(plan, fs) is not None:
        report.notes.append(
            "tied embeddings: the adapter targets the output unembedding too, with the "
            "same ΔW, as the merged edit does. To merge it with PEFT, load the base untied "
            "(tie_word_embeddings=False, lm_head = a copy of the embedding): merging into "
            "one shared matrix would add ΔW twice"
        )
    if any(f.bias is not None for f in fs):
        report.notes.append(
            "writer biases are carried as PEFT lora_B.bias (lora_bias=True); loaders without "
            "lora_bias support would drop them"
        )
    if any(f.kind == "experts" for f in fs):
        report.notes.append(
            "experts are targeted as transformers >= 5 fuses them (target_parameters "
            "mlp.experts.down_proj); PEFT >= 0.17 loads that"
        )
    return report


def adapter_bytes(plan: Plan) -> int:
    """Size of the factors (float32): what `--dry-run` announces."""
    k = int(plan.record.get("rank", 1))
    return sum(4 * k * (e.shape[0] + e.shape[1]) for e in plan.edits.values() if e.op == "project") + sum(
        4 * math.prod(e.shape) for e in plan.edits.values() if e.op == "project_bias"
    )
