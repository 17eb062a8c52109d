"""K-quant ablation on a real GGUF: what storage does to the edit, per type, and what llama.cpp then computes.

From one GGUF (e.g. SmolLM2-135M-Instruct Q4_1 as shipped) llama.cpp's own quantizer
(llama_model_quantize, allow_requantize) makes Q4_K_M, Q5_K_M and Q6_K files. Each is ablated along one
direction (a .npy, or a seeded random unit vector) by `patcher ablate` three ways: orthogonal rounding in
the file's own types (the default), plain nearest re-rounding (`--rounding nearest`), and the old route
(`--requant q8_0`). Then, with the gguf package's dequantizers (not patcher's), per stored type over the
edited tensors: leakage |rᵀW'|/|rᵀW| and weight error |W'−W*|/|W*| (W* the exact projection of the
dequantized source), the bytes of the edited tensors; and with llama.cpp (llama-cpp-python) the mean KL of
next-token distributions over a few prompts from the unedited file and from the exact ablation (the
file's weights dequantized to F32 and ablated there, where storage adds nothing), and whether the greedy
continuation of the first prompt stays the unedited one's.

    python scripts/measure_kquant.py SmolLM2-135M-Instruct.Q4_1.gguf --workdir /tmp/kq-measure
"""

import argparse
import ctypes
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.\n",
    "def fibonacci(n):\n    ",
    "Question: how many legs does a spider have?\nAnswer:",
    "Once upon a time, in a small village,",
]
WAYS = {"orthogonal": [], "nearest": ["--rounding", "nearest"], "requant q8_0": ["--requant", "q8_0"]}


def quantize(src: Path, ftype: str, out: Path) -> Path:
    import llama_cpp

    if not out.exists():
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread, p.allow_requantize = FTYPES[ftype], 2, True
        if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) != 0:
            sys.exit(f"{src}: llama.cpp could not quantize it to {ftype}")
    return out


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def deq(t) -> np.ndarray:
    import gguf

    shape = [int(n) for n in reversed(t.shape)]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(shape)


def f32_copy(src: Path, out: Path) -> Path:
    """src with every tensor dequantized to F32 (gguf package): ablating it gives the exact projection of
    the very weights src holds, the reference each stored ablation is compared with."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(out), str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), vtype)
    for t in r.tensors:
        w.add_tensor(t.name, deq(t).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def ablate(src: Path, out: Path, direction: Path, extra: list[str]) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from patcher.cli import main; main()",
            "ablate",
            str(src),
            "-d",
            str(direction),
            "-o",
            str(out),
            *extra,
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0


def storage_stats(src: Path, out: Path, r: np.ndarray) -> dict[str, dict]:
    """Per stored type (source→stored when they differ): leakage, weight error, edited bytes."""
    before, after = tensors(src), tensors(out)
    acc = defaultdict(lambda: defaultdict(float))
    for name, t in after.items():
        if name not in before or len(t.shape) < 2 or bytes(t.data) == bytes(before[name].data):
            continue  # added (an untied output.weight keeps the original), a vector, or untouched
        w, stored = deq(before[name]), deq(t)
        axis = 1 if name.startswith("token_embd") else 0
        comp = w @ r if axis else r @ w
        exact = w - (np.outer(comp, r) if axis else np.outer(r, comp))
        a, b = before[name].tensor_type.name, t.tensor_type.name
        s = acc[a if a == b else f"{a}→{b}"]
        s["comp"] += float(comp @ comp)
        s["left"] += float(np.sum((stored @ r if axis else r @ stored) ** 2))
        s["err"] += float(np.sum((stored - exact) ** 2))
        s["norm"] += float(np.sum(exact**2))
        s["bytes_in"] += before[name].n_bytes
        s["bytes_out"] += t.n_bytes
        s["tensors"] += 1
    return {
        k: {
            "tensors": int(s["tensors"]),
            "leakage": (s["left"] / s["comp"]) ** 0.5,
            "error": (s["err"] / s["norm"]) ** 0.5,
            "size": s["bytes_out"] / s["bytes_in"],
        }
        for k, s in acc.items()
    }


class Runner:
    """llama.cpp next-token distributions over the prompts (its own tokenizer), and a greedy continuation."""

    def __init__(self, path: Path):
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2
        )

    def logprobs(self) -> list[np.ndarray]:
        out = []
        for p in PROMPTS:
            ids = self.llm.tokenize(p.encode(), add_bos=True)
            self.llm.reset()
            self.llm.eval(ids)
            z = np.array(self.llm.scores[: len(ids)], dtype=np.float64)
            out.append(z - np.logaddexp.reduce(z, axis=-1, keepdims=True))
        return out

    def greedy(self, prompt: str, n: int = 16) -> str:
        self.llm.reset()
        return self.llm(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]

    def close(self):
        self.llm.close()


def kl(base: list[np.ndarray], other: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([np.sum(np.exp(b) * (b - o), axis=-1) for b, o in zip(base, other)])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--direction", type=Path, help=".npy direction (default: seeded random unit vector)")
    ap.add_argument("--ftypes", default=",".join(FTYPES))
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    import gguf

    d_model = int(
        next(
            f.contents() for k, f in gguf.GGUFReader(a.gguf).fields.items() if k.endswith(".embedding_length")
        )
    )
    if a.direction:
        r = np.load(a.direction).astype(np.float64).reshape(-1)
        direction = a.direction
    else:
        r = np.random.default_rng(0).standard_normal(d_model)
        direction = a.workdir / "random-direction.npy"
        np.save(direction, r.astype(np.float32))
    r /= np.linalg.norm(r)
    rows = []
    for ftype in a.ftypes.split(","):
        src = quantize(a.gguf, ftype, a.workdir / f"{a.gguf.stem.rsplit('.', 1)[0]}.{ftype}.gguf")
        base_run = Runner(src)
        base, base_text = base_run.logprobs(), base_run.greedy(PROMPTS[0])
        base_run.close()
        f32 = f32_copy(src, a.workdir / f"{src.stem}.F32.gguf")
        exact_out = a.workdir / f"{src.stem}.F32.ablated.gguf"
        ablate(f32, exact_out, direction, [])
        f32.unlink()
        run = Runner(exact_out)
        exact = run.logprobs()
        run.close()
        exact_out.unlink()
        for way, extra in WAYS.items():
            out = a.workdir / f"{src.stem}.ablated-{way.replace(' ', '-')}.gguf"
            seconds = ablate(src, out, direction, extra)
            run = Runner(out)
            logp, text = run.logprobs(), run.greedy(PROMPTS[0])
            run.close()
            for kind, s in sorted(storage_stats(src, out, r).items()):
                rows.append(
                    (ftype, way, kind, s, kl(base, logp), kl(exact, logp), seconds, text == base_text)
                )
            print(f"{ftype} {way}: {seconds:.1f} s, greedy: {base_text!r} -> {text!r}", file=sys.stderr)
            out.unlink()
    print(
        "| file | rounding | edited type | tensors | leakage | weight error | size vs source | "
        "KL(unedited‖edited) | KL(exact‖edited) | greedy same | ablate s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ftype, way, kind, s, k, k_exact, seconds, same in rows:
        print(
            f"| {ftype} | {way} | {kind} | {s['tensors']} | {s['leakage']:.2%} | {s['error']:.2%} | "
            f"{s['size']:.2f}× | {k:.4f} | {k_exact:.4f} | {'yes' if same else 'no'} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
