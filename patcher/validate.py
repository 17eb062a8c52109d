"""Every number and choice a user gives, checked the same way on the command line and in recipes:
finite, in range, the right type. Each check raises PatcherError(where, problem) with one message,
so `--scale nan` and a recipe's `scale = nan` read alike. Limits are data (LIMITS), not if-chains."""

import difflib
import math
from dataclasses import dataclass

from patcher.errors import PatcherError


@dataclass(frozen=True)
class Limit:
    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    why: str = ""


FP16_MAX = 65504.0
# `extract --max-prompts` when not given (per prompt file): the mean difference's sampling error falls as
# 1/sqrt(n), so past ~1000 prompts a set adds time more than accuracy (a 100 MB file ran ~50 min)
DEFAULT_MAX_PROMPTS = 1024
LIMITS = {
    # an ablation strength: 1 removes the component, 0.5 halves it, 2 reflects it; past ±10 the
    # weights grow without bound (1e40 writes Inf)
    "scale": Limit(float, -10.0, 10.0),
    # alpha·r̂ is stored as a bias: it must fit every float dtype a bias may have (fp16 included)
    "alpha": Limit(float, -FP16_MAX, FP16_MAX, why="the bias must fit fp16"),
    "batch_size": Limit(int, 1, 4096),
    "max_prompts": Limit(int, 1, 10_000_000),
    "tokens": Limit(int, 0, 4096),
    "max_new_tokens": Limit(int, 1, 1 << 20),
    "temperature": Limit(float, 0.0, 100.0, lo_open=True),
    "top_k": Limit(int, 0, 1 << 31),
    "seed": Limit(int, 0, 2**63 - 1),
    "int4_block": Limit(int, 16, 4096),
    "int4_accuracy": Limit(int, 0, 4),
    "position": Limit(int, -(1 << 20), -1, why="positions count from the end of the prompt: -1, -2, ..."),
    "gaussian_width": Limit(float, 0.0, 1e6, lo_open=True),
    "gaussian_center": Limit(float, -1e6, 1e6),
}


def _type_name(v) -> str:
    return {str: "text", bool: "true/false", list: "a list", dict: "a table", type(None): "nothing"}.get(
        type(v), type(v).__name__
    )


def number(value, key: str, where: str | None = None, limit: Limit | None = None):
    """Check one user number against LIMITS[key] (or `limit`); return it as int or float."""
    lim = limit or LIMITS[key]
    where = where or key
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        want = "an integer" if lim.kind is int else "a number"
        raise PatcherError(where, f"must be {want}, got {value!r} ({_type_name(value)})")
    if lim.kind is int and isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise PatcherError(where, f"must be an integer, got {value!r}")
        value = int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise PatcherError(where, f"must be a finite number, got {value!r}")
    low_bad = (
        value is not None and lim.lo is not None and (value <= lim.lo if lim.lo_open else value < lim.lo)
    )
    if low_bad or (lim.hi is not None and value > lim.hi):
        lo = "" if lim.lo is None else (f"> {_fmt(lim.lo)}" if lim.lo_open else f">= {_fmt(lim.lo)}")
        hi = "" if lim.hi is None else f"<= {_fmt(lim.hi)}"
        rule = " and ".join(x for x in (lo, hi) if x)
        raise PatcherError(where, f"must be {rule}, got {_fmt(value)}" + (f" ({lim.why})" if lim.why else ""))
    return lim.kind(value)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def choice(value, options, where: str) -> str:
    """One of `options`; a typo gets the nearest spelling suggested."""
    if not isinstance(value, str) or value not in options:
        near = difflib.get_close_matches(str(value), list(options), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PatcherError(where, f"{value!r} is not one of {', '.join(options)}{hint}")
    return value


def choices(value, options, where: str) -> tuple[str, ...]:
    """A comma string (CLI) or a list of strings (recipe), each one of `options`, at least one."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise PatcherError(where, f"must be a list of {', '.join(options)}, got {value!r}")
    items = [v for v in items if not (isinstance(v, str) and not v)]
    if not items:
        raise PatcherError(where, f"is empty; choose from {', '.join(options)}")
    return tuple(choice(v, options, where) for v in items)


def flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise PatcherError(where, f"must be true or false, got {value!r} ({_type_name(value)})")
    return value


def text(value, where: str) -> str:
    if not isinstance(value, str):
        raise PatcherError(where, f"must be text, got {value!r} ({_type_name(value)})")
    return value


def positions(value, where: str = "--positions") -> list[int]:
    """Token positions from the end: "-1,-2" (CLI), a list of ints or one int (recipe)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise PatcherError(where, f"cannot read {value!r}; use e.g. -1,-2") from None
    elif isinstance(value, list):
        items = value
    else:
        items = [value]
    if not items:
        raise PatcherError(where, "no positions given; use e.g. -1,-2")
    return sorted({number(p, "position", where) for p in items}, reverse=True)


def layer_index(value, n_layers: int, where: str = "--layer") -> int:
    """One block index: 0..n-1, or -n..-1 counted from the end (never wrapped further)."""
    v = number(value, "layer", where, Limit(int))
    if not -n_layers <= v < n_layers:
        raise PatcherError(
            where,
            f"layer {v} is out of range: the model has layers 0..{n_layers - 1} "
            f"(or -{n_layers}..-1 from the end)",
        )
    return v + n_layers if v < 0 else v


def parse_layers(text_value, n_layers: int, where: str = "--layers") -> set[int] | None:
    """'4-20', '3,5,7-9', '-4--1' (inclusive; negatives count from the end, -n..-1, never wrapped)."""
    if text_value is None:
        return None
    if isinstance(text_value, bool) or not isinstance(text_value, (str, int)):
        raise PatcherError(where, f'must be text such as "4-20" or "3,5,7-9", got {text_value!r}')
    spec = str(text_value).strip()
    if spec in ("", "all"):
        return None
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                i = part.index("-", 1)
                lo, hi = int(part[:i]), int(part[i + 1 :])
            else:
                lo = hi = int(part)
        except ValueError:
            raise PatcherError(where, f"cannot read {part!r}; use e.g. 4-20 or 3,5,7-9") from None
        ends = []
        for v in (lo, hi):
            if not -n_layers <= v < n_layers:
                raise PatcherError(
                    where,
                    f"{part!r}: layer {v} is outside 0..{n_layers - 1} (or -{n_layers}..-1 from the end)",
                )
            ends.append(v + n_layers if v < 0 else v)
        if ends[0] > ends[1]:
            raise PatcherError(
                where, f"{part!r} is an empty range (it starts after it ends); write {ends[1]}-{ends[0]}"
            )
        out.update(range(ends[0], ends[1] + 1))
    return out
