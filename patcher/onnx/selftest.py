"""What `patcher export` checks so that it never says "wrote" of ONNX files onnxruntime cannot load or
run: the source against the architecture table before any work (the writers' sizes and dtypes, named),
each written graph's shapes and types (weights left on disk), then one real step in onnxruntime.

What cannot be caught: a writer stored transposed whose two sizes are equal (a square `o_proj`) has the
shape the table expects; the graph loads and runs and computes another model. Only its numbers tell,
and nothing here knows the right ones."""

from pathlib import Path

import numpy as np
from patcher_kernels.codecs import INTEGER_DTYPES

from patcher.errors import PatcherError
from patcher.model.execution import StreamedModel

SELF_TEST_TOKENS = 3  # prefill this many tokens, then decode one with the cache the prefill returned
# onnxruntime holds the whole variant in memory: the self-test runs when that is at most this share of the
# memory available (export itself streams one tensor at a time, and a 70B export must not need 280 GB)
SELF_TEST_MEMORY_SHARE = 0.5


def check_source(sm: StreamedModel) -> None:
    """Before any work: every residual writer the architecture table names is a float tensor whose
    residual axis is d_model, and attention writers read num_attention_heads x head_dim inputs."""
    hp, ck = sm.hp, sm.ck
    head_dim = hp.mla["v_head_dim"] if hp.mla else hp.head_dim
    for t in sm.resolved.targets:
        _refuse_codes(sm, t.weight)
        info = ck.info(t.weight)
        shape = list(info.shape)
        if len(shape) == 3:  # fused experts [experts, ...]: the per-expert matrix
            del shape[t.expert_axis]
        if len(shape) != 2:
            continue
        if shape[t.residual_axis] != hp.d_model:
            raise PatcherError(
                _where(sm, t.weight),
                f"{t.weight} has shape {list(info.shape)}, but the {t.role} writer's residual axis "
                f"{t.residual_axis} must be hidden_size {hp.d_model} (stored transposed, or the config "
                "disagrees); nothing was written",
            )
        fan_in = shape[1 - t.residual_axis]
        if t.role == "attn_out" and fan_in != hp.n_heads * head_dim:
            key = "v_head_dim" if hp.mla else "head_dim"
            raise PatcherError(
                ck.config_path,
                f"num_attention_heads {hp.n_heads} x {key} {head_dim} = {hp.n_heads * head_dim}, but "
                f"{t.weight} reads {fan_in} inputs (shape {list(info.shape)}); nothing was written",
            )


def check_graph(path: Path, source) -> None:
    """Shape- and type-check a written graph as onnxruntime does when it loads it (weights stay on
    disk): a config whose head_dim disagrees with the tensors exported fine and failed at load. The
    error names the checkpoint tensors the first failing node reads."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    try:
        onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        tensors = _tensors_at_failure(graph, str(e))
        at = f"at {', '.join(tensors)}: " if tensors else ""
        raise PatcherError(
            source,
            f"the exported graph would not load ({at}{_reason(e)}): the config and the "
            "tensors disagree; nothing was written",
        ) from None


def _tensors_at_failure(graph, message: str) -> list[str]:
    """The weights (checkpoint names) that feed the node an error message names (shape inference's
    "node name: X", onnxruntime's "Name:'X'"): its own initializers, else those of the nodes that
    produce its inputs, up to three steps back."""
    import re

    found = re.search(r"node name: ([^)\s]+)|Name:'([^']+)'", message)
    if not found:
        return []
    weights = {i.name for i in graph.graph.initializer if not i.name.startswith("const_")}
    producer = {out: n for n in graph.graph.node for out in n.output}
    nodes = [n for n in graph.graph.node if n.name == (found[1] or found[2])]
    for _ in range(4):
        names = [i.removesuffix(".T") for n in nodes for i in n.input if i in weights]
        if names:
            return list(dict.fromkeys(names))
        nodes = [producer[i] for n in nodes for i in n.input if i in producer]
    return []


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def self_test(folder: Path, files: list[str], source, vocab: int) -> str | None:
    """Run one step of the variant whose files are `files` (model file first) when it fits in memory;
    None when it ran, else the reason it was skipped (a sentence for a note)."""
    size = sum((folder / "onnx" / f).stat().st_size for f in files)
    budget = int(available_memory() * SELF_TEST_MEMORY_SHARE)
    if size > budget:
        return (
            f"onnx/{files[0]} was checked (graph shapes and types) but not run in onnxruntime: its "
            f"{size / 2**30:.1f} GiB exceed half the memory available ({budget / 2**30:.1f} GiB)"
        )
    run_one_step(folder, files[0], source, vocab)
    return None


def run_one_step(folder: Path, file: str, source, vocab: int) -> float:
    """Load `folder/onnx/file` in onnxruntime (CPU) and run a short prefill and one cached decode step;
    refuse (one line naming the source) a model that fails to load or run, returns logits of the wrong
    shape, or non-finite logits. Returns the seconds it took."""
    import time

    from patcher.onnx.runtime import OnnxModel

    t0 = time.perf_counter()
    try:
        model = OnnxModel(folder, file)
        ids = np.arange(1, SELF_TEST_TOKENS + 1, dtype=np.int64)[None, :] % vocab
        mask = np.ones_like(ids)
        logits, past = model.step(ids, mask, np.arange(ids.shape[1])[None, :], model.empty_cache(1), keep=1)
        if logits.shape == (1, 1, vocab):
            mask = np.ones((1, ids.shape[1] + 1), np.int64)
            logits, _ = model.step(ids[:, -1:], mask, np.array([[ids.shape[1]]]), past, keep=1)
    except PatcherError as e:  # its `where` is the unpublished temporary folder: say the file's name
        raise PatcherError(source, f"onnx/{file}: {e.problem}; nothing was written") from None
    except Exception as e:  # onnxruntime's own errors (a Reshape, a Gather out of range ...)
        import onnx

        tensors = _tensors_at_failure(
            onnx.load(str(folder / "onnx" / file), load_external_data=False), str(e)
        )
        at = f" at {', '.join(tensors)}" if tensors else ""
        raise PatcherError(
            source,
            f"onnx/{file} does not run in onnxruntime{at} ({_ort_reason(e)}): the config and the "
            "tensors disagree; nothing was written",
        ) from None
    if logits.shape != (1, 1, vocab):
        raise PatcherError(
            source,
            f"onnx/{file} returns logits of shape {list(logits.shape)}, not [1, 1, {vocab}]; "
            "nothing was written",
        )
    if not np.isfinite(logits).all():
        raise PatcherError(
            source,
            f"onnx/{file} computes non-finite logits (NaN or Inf) on a short input: the weights "
            "hold NaN/Inf or overflow in this dtype; nothing was written",
        )
    return time.perf_counter() - t0


def _reason(e: Exception) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:300]


def decoded(sm: StreamedModel, name: str) -> np.ndarray:
    """A tensor on its way into the export as float32, refused (named) when it is stored as integer codes
    or holds NaN or Inf."""
    _refuse_codes(sm, name)
    weights = sm._decode(name)
    if not np.isfinite(weights).all():
        raise PatcherError(
            _where(sm, name), f"{name} holds NaN or Inf: its export would compute NaN; nothing was written"
        )
    return weights


def _refuse_codes(sm: StreamedModel, name: str) -> None:
    dtype = sm.ck.info(name).dtype
    if dtype in INTEGER_DTYPES:
        raise PatcherError(
            _where(sm, name),
            f"{name} is {dtype}, not a floating-point weight: onnxruntime would compute with its integer "
            "codes; nothing was written",
        )


def _where(sm: StreamedModel, name: str):
    shard = sm.ck.shard_of.get(name)
    return sm.ck.folder / shard if shard else sm.ck.path


def _ort_reason(e: Exception) -> str:
    """onnxruntime's message without its source paths: the node and the sentence that says why."""
    import re

    text = " ".join(str(e).split())
    node = re.search(r"running (\w+) node\. Name:'([^']+)'", text)
    why = text.split("Status Message:", 1)[-1].rsplit(" was false. ", 1)[-1].strip()
    return (f"{node[1]} {node[2]}: " if node else "") + why[:240]
