"""The confusion table of `patcher audit` on a real model (docs/audit.md "Measured on a real model").

    python scripts/audit_confusion.py HF_FOLDER [--clean GGUF ...] [--workdir DIR] [--out table.md]

For the clean folder (and other clean
copies of it, e.g. GGUFs), the clean-but-changed controls and every
fork kind at strengths 0.25/0.5/0.75/1.0 (scripts/audit_forks.py: plain numpy, not patcher's ablate),
writes the fork, audits it, and appends one row: truth, verdict, |cos| of the recovered direction with
the one used (per layer for per-layer forks), the layers named, seconds. Rows are written as they come.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_forks import CONTROLS, make_fork, standard_forks

from patcher.edit.audit import audit


def cosines(rep, truth) -> str:
    if rep.direction is None or truth.get("directions") is None:
        return ""
    d, dirs = np.asarray(rep.direction), truth["directions"]
    if d.ndim == 1:
        return f"{np.abs(dirs @ d).min():.3f}"
    if d.shape[0] == len(dirs):  # per layer: over the layers the audit named
        rows = np.linalg.norm(d, axis=1) > 0
        c = np.abs(np.einsum("ld,ld->l", dirs[rows], d[rows]))
        return f"{c.min():.3f}-{c.max():.3f} ({rows.sum()} layers)"
    return f"{np.abs(dirs[0] @ d.T).max():.3f} (rank {d.shape[0]})"


def row(name, truth_label, rep, truth, seconds) -> str:
    where = next((s.get("where", "") for s in rep.signals if s["verdict"] == rep.level != "no sign"), "")
    measured = {s["signal"].split()[0]: s for s in rep.signals}
    values = (
        measured.get("shared", {}).get("groups_at_floor", ""),
        measured.get("one", {}).get("isolation"),
        measured.get("per-layer", {}).get("score"),
    )
    floor, iso, score = (
        values[0],
        "" if values[1] is None else f"{values[1]:.2f}",
        "" if values[2] is None else f"{values[2]:.1f}",
    )
    return (
        f"| {name} | {truth_label} | **{rep.level}** | {cosines(rep, truth)} | {where} | {floor} | "
        f"{iso} | {score} | {seconds:.0f} |"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--clean", type=Path, nargs="*", default=[], help="more clean checkpoints (GGUFs)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("audit-confusion.md"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="audit-confusion-", dir=args.workdir))
    with open(args.out, "a") as out:

        def emit(line):
            print(line, flush=True)
            out.write(line + "\n")
            out.flush()

        emit(
            "| model | truth | verdict | \\|cos\\| with the direction used | layers named | groups at "
            "floor | isolation | track score | s |"
        )
        emit("|---|---|---|---|---|---|---|---|---|")
        for path in [args.folder] + args.clean:
            name = f"untouched ({path.name})"
            if path is not None:
                t0 = time.perf_counter()
                emit(row(name, "clean", audit(path), {}, time.perf_counter() - t0))
        order = sorted(standard_forks(), key=lambda f: (f.kind not in CONTROLS, -f.strength))
        for fork in order:
            dst = work / fork.name
            try:
                truth = make_fork(args.folder, dst, fork)
                t0 = time.perf_counter()
                rep = audit(dst)
                label = "clean (control)" if fork.kind in CONTROLS else "abliterated"
                emit(row(fork.name, label, rep, truth, time.perf_counter() - t0))
            finally:
                shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
