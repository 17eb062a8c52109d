"""Benchmark `patcher ablate --adapter` (PEFT folder and GGUF LoRA) against `patcher ablate -o` on the
synthetic bf16 llama checkpoints of bench_patch.py: wall seconds (sync included), the process's own peak
RSS and the output size. The adapter reads each edited weight once and writes only the factors.

    python scripts/bench_adapter.py                 # ~1.1 GB, 1 repeat
    python scripts/bench_adapter.py --sizes 1.1,2.2 --repeats 3
"""

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patch import D, layers_for, make_checkpoint, run_in_workdir, timed, warm


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1.1", help="checkpoint sizes in GB, comma-separated")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    patcher = [shutil.which("patcher") or "patcher"]

    def bench(work: Path, created: list) -> None:
        direction = work / "dir.npy"
        np.save(direction, np.random.default_rng(0).standard_normal(D).astype(np.float32))
        created.append(direction)
        for gb in (float(s) for s in args.sizes.split(",")):
            src = work / f"llama-{gb}gb"
            if not src.exists():
                make_checkpoint(src, layers_for(gb))
                created.append(src)
            rows = {}
            for label, flag, out in (
                ("ablate -o", "-o", work / "out"),
                ("--adapter peft", "--adapter", work / "ad"),
                ("--adapter gguf", "--adapter", work / "ad.gguf"),
            ):
                runs = []
                for _ in range(args.repeats):
                    warm(src)
                    with tempfile.TemporaryDirectory() as tmp:
                        r = timed(
                            [*patcher, "ablate", str(src), "-d", str(direction), flag, str(out), "--force"],
                            Path(tmp) / "log",
                            label,
                        )
                    runs.append((r["total"], r["rss"], _size(out)))
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
                rows[label] = (
                    statistics.median(t for t, _, _ in runs),
                    max(m for _, m, _ in runs),
                    runs[0][2],
                )
            print(f"\n{gb} GB checkpoint ({_size(src) / 1e9:.2f} GB)")
            for label, (t, rss, size) in rows.items():
                print(f"  {label:16s} {t:7.2f} s  peak RSS {rss:7.0f} MiB  output {size / 1e6:10.3f} MB")

    run_in_workdir(args, "bench-adapter-", bench)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
