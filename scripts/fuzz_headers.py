"""Fuzz the safetensors header parser and the index reader; count outcomes.

    python scripts/fuzz_headers.py [--cases 20000] [--seed 0]

Each case starts from a real fixture shard or index and applies random damage: bit flips, byte
overwrites, truncation, a forged header length, a rewritten header (offsets shifted, overlapping,
out of range, huge shapes, wrong dtypes, non-UTF-8, deeply nested JSON), or a rewritten weight map
(../, absolute paths, missing shards). Every case must end in either a clean read or a
CheckpointError; anything else (another exception, > 2 s, or an allocation past the 2 GiB address
space cap) is a crash. Prints the counts and exits 1 if any case crashed.
"""

import argparse
import json
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from patcher.errors import CheckpointError  # noqa: E402
from patcher.io.checkpoint import Checkpoint  # noqa: E402

FIXTURE = ROOT / "fixtures" / "tiny-llama"


def _header(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header, data: bytes, text: bytes | None = None) -> bytes:
    body = text if text is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def mutate_shard(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(
        [
            "flip",
            "overwrite",
            "truncate",
            "length",
            "offsets",
            "shape",
            "dtype",
            "utf8",
            "nest",
            "extra",
            "metadata",
        ]
    )
    b = bytearray(raw)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 4096))
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "overwrite":
        i = rng.randrange(min(len(b), 4096))
        b[i : i + 8] = bytes(rng.randrange(256) for _ in range(8))
        return kind, bytes(b)
    if kind == "truncate":
        return kind, bytes(b[: rng.randrange(len(b))])
    if kind == "length":
        return kind, struct.pack(
            "<Q", rng.choice([0, 1, 7, 2**63, 2**64 - 1, 100_000_001, rng.randrange(1 << 40)])
        ) + raw[8:]
    header, data = _header(raw)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    if kind == "offsets":
        a, c = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [[a, c + 2], [a - 2, c], [c, a], [a, 1 << 62], [-1, c], [a, a], [0, c - a]]
        )
    elif kind == "shape":
        entry["shape"] = rng.choice([[1 << 40, 1 << 40], [-1, 4], [], [0], [True], ["3"], [2**63], None])
    elif kind == "dtype":
        entry["dtype"] = rng.choice(["F7", "", None, 3, "bf16", "F8_E4M3", "I8", "BOOL"])
    elif kind == "utf8":
        text = json.dumps(header).encode()
        i = rng.randrange(len(text))
        return kind, _pack(
            None, data, text[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + text[i + 1 :]
        )
    elif kind == "nest":
        return kind, _pack(None, data, b"[" * rng.choice([1000, 100_000, 1_000_000]))
    elif kind == "extra":
        entry[rng.choice(["x", "dtype2", "data_offsets2"])] = 1
    else:
        header["__metadata__"] = rng.choice(
            [[], {"a": 1}, "x", {"format": None}, {str(i): "v" * 10 for i in range(1000)}]
        )
    return kind, _pack(header, data)


def mutate_index(index: dict, rng: random.Random) -> tuple[str, dict]:
    kind = rng.choice(["dotdot", "absolute", "missing", "wrongshard", "notdict", "empty", "nonstring"])
    wm = dict(index["weight_map"])
    name = rng.choice(list(wm))
    if kind == "dotdot":
        wm[name] = rng.choice(["../x.safetensors", "../../etc/passwd", "a/../../b", "..\\x.safetensors"])
    elif kind == "absolute":
        wm[name] = rng.choice(["/etc/passwd", "/tmp/x.safetensors", "C:\\x.safetensors"])
    elif kind == "missing":
        wm[name] = "nope.safetensors"
    elif kind == "wrongshard":
        others = sorted(set(wm.values()) - {wm[name]})
        wm[name] = others[0] if others else wm[name]
    elif kind == "notdict":
        return kind, {"weight_map": rng.choice([[], "x", 3, None])}
    elif kind == "empty":
        wm = {}
    else:
        wm[name] = rng.choice([3, None, [], {"a": 1}])
    return kind, {**index, "weight_map": wm}


class Timeout(Exception):
    pass


def _alarm(_s, _f):
    raise Timeout()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a "huge allocation" fails loudly
    signal.signal(signal.SIGALRM, _alarm)
    shards = sorted(FIXTURE.glob("*.safetensors"))
    raws = [p.read_bytes() for p in shards]
    index = json.loads((FIXTURE / "model.safetensors.index.json").read_text())
    counts, crashes = Counter(), []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "m"
        shutil.copytree(FIXTURE, work)
        for case in range(args.cases):
            on_index = rng.random() < 0.25
            if on_index:
                kind, idx = mutate_index(index, rng)
                (work / "model.safetensors.index.json").write_text(json.dumps(idx))
                target, label = work, f"index:{kind}"
            else:
                kind, data = mutate_shard(rng.choice(raws), rng)
                (Path(tmp) / "x.safetensors").write_bytes(data)
                target, label = Path(tmp) / "x.safetensors", f"shard:{kind}"
            signal.alarm(2)
            try:
                Checkpoint(target).close()
                counts[(label, "read")] += 1
            except CheckpointError:
                counts[(label, "CheckpointError")] += 1
            except BaseException as e:
                counts[(label, "CRASH")] += 1
                crashes.append((case, label, f"{type(e).__name__}: {e}"[:200]))
            finally:
                signal.alarm(0)
            if on_index:
                (work / "model.safetensors.index.json").write_text(json.dumps(index))
    total = sum(counts.values())
    print(f"{total} cases in {time.perf_counter() - t0:.1f} s (seed {args.seed})")
    for (label, outcome), n in sorted(counts.items()):
        print(f"  {label:22s} {outcome:16s} {n}")
    print(f"crashes: {len(crashes)}")
    for c in crashes[:20]:
        print("  ", *c)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
