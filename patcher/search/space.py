"""The search space: what one trial of `patcher search` chooses, as plain Optuna parameters.

A trial is one ablation:
- `direction_scope`: "global" (one direction for every writer: the directions file's rows
  blended at the fractional `direction_index`, floor and ceil rows weighted by the fraction) or
  "per_layer" (block l's writers use row l+1, the resid_pre the block writes into; embeddings row 0).
- per component c in (attn_out, mlp_out), a layer kernel (recipe kernel "peak"): strength
  `c_peak` at layer `c_center`, falling linearly to `c_min_frac * c_peak` at distance `c_width`,
  0 beyond. The minimum is a fraction of the peak so every bound is static (TPE models it jointly).
- `embed` (on/off) with `embed_strength`, and `norm_preserve` (none | rows | cols).

Every parameter can be narrowed (a smaller range, fewer choices, or one fixed value) from the
command line (`--space NAME=LOW:HIGH`, `--space NAME=A,B`, `--space NAME=VALUE`) or a TOML file's
`[search.space]` table (`NAME = [LOW, HIGH]`, `NAME = ["a", "b"]` for choices, or a scalar).
A parameter narrowed to one value is fixed: it is not an Optuna parameter and costs no search.
"""

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patcher.edit.plan import peak_kernel
from patcher.errors import PatcherError

COMPONENTS = ("attn_out", "mlp_out")
SCOPES = ("global", "per_layer")
PRESERVE = ("none", "rows", "cols")


@dataclass
class Param:
    name: str
    kind: str  # float | categorical
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    help: str = ""
    when: tuple | None = None  # (other parameter, value): only sampled when that parameter has that value

    @property
    def fixed(self):
        """The value if narrowed to one, else None (and Optuna samples it)."""
        if self.kind == "float" and self.low == self.high:
            return self.low
        if self.kind == "categorical" and len(self.choices) == 1:
            return self.choices[0]
        return None

    def describe(self) -> str:
        if self.fixed is not None:
            return f"= {self.fixed}"
        return (
            f"[{self.low:g}, {self.high:g}]"
            if self.kind == "float"
            else "{" + ", ".join(map(str, self.choices)) + "}"
        )

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "low": self.low,
            "high": self.high,
            "choices": list(self.choices),
            "when": self.when,
        }


def default_space(n_layers: int) -> dict[str, Param]:
    """Bounds scaled to the model's depth, where abliteration works on most models (the peer's ranges,
    from its experiments over many models: refusal is best read a little past the middle of the stack,
    and edited hardest in its upper 40 %; a peak below 0.8 mostly leaves the behaviour in place).
    Every range can be widened with --space (e.g. attn_out_peak=0:1.5, direction_index=0:L).
    Embeddings and norm preservation are off by default, as in the peer's search; open them with
    --space embed=false,true / norm_preserve=none,cols."""
    L = n_layers
    top = float(max(L - 1, 0))
    p = [
        Param(
            "direction_scope",
            "categorical",
            choices=SCOPES,
            help="one blended direction for all writers, or each block its own resid_pre[l+1] row",
        ),
        Param(
            "direction_index",
            "float",
            0.4 * L,
            0.9 * L,
            help="resid_pre row (fractional: blend of two rows)",
            when=("direction_scope", "global"),
        ),
    ]
    for c in COMPONENTS:
        p += [
            Param(f"{c}_peak", "float", 0.8, 1.5, help=f"{c}: strength at the kernel's centre"),
            Param(f"{c}_center", "float", 0.6 * top, top, help=f"{c}: layer of the peak (fractional)"),
            Param(
                f"{c}_min_frac",
                "float",
                0.0,
                1.0,
                help=f"{c}: strength at distance width, as a fraction of peak",
            ),
            Param(
                f"{c}_width",
                "float",
                1.0,
                max(0.6 * top, 1.0),
                help=f"{c}: falloff distance in layers (0 beyond)",
            ),
        ]
    p += [
        Param("embed", "categorical", choices=(False,), help="also ablate the token embeddings"),
        Param("embed_strength", "float", 0.0, 1.0, help="strength on the embeddings", when=("embed", True)),
        Param(
            "norm_preserve", "categorical", choices=("none",), help="none | rows | cols (see patcher ablate)"
        ),
    ]
    return {x.name: x for x in p}


def _value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(text)
    except ValueError:
        return text.strip()


def narrow(space: dict[str, Param], name: str, value, where: str) -> None:
    """Apply one narrowing: (low, high) range, a list of choices, or a single value."""
    if name not in space:
        raise PatcherError(where, f"unknown search parameter {name!r}; parameters: {', '.join(space)}")
    p = space[name]
    if p.kind == "float":
        vals = list(value) if isinstance(value, (list, tuple)) else [value]
        try:
            if len(vals) not in (1, 2) or any(isinstance(v, bool) for v in vals):
                raise ValueError
            lo, hi = float(vals[0]), float(vals[-1])
        except (TypeError, ValueError):
            raise PatcherError(where, f"{name} takes numbers: LOW:HIGH or one value, got {value!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise PatcherError(where, f"{name}: need LOW <= HIGH, got {lo:g}:{hi:g}")
        p.low, p.high = lo, hi
        return
    choices = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    allowed = {"direction_scope": SCOPES, "embed": (False, True), "norm_preserve": PRESERVE}[name]
    bad = [c for c in choices if c not in allowed]
    if bad or not choices:
        raise PatcherError(
            where, f"{name} choices are {', '.join(map(str, allowed))}; got {', '.join(map(str, bad))}"
        )
    p.choices = tuple(dict.fromkeys(choices))


def parse_cli(space: dict[str, Param], items: list[str]) -> None:
    """--space NAME=LOW:HIGH | NAME=A,B | NAME=VALUE."""
    for item in items:
        name, sep, rhs = item.partition("=")
        if not sep:
            raise PatcherError("--space", f"expected NAME=LOW:HIGH, NAME=A,B or NAME=VALUE, got {item!r}")
        name = name.strip()
        if ":" in rhs:
            value = [_value(v) for v in rhs.split(":")]
        elif "," in rhs:
            value = [_value(v) for v in rhs.split(",")]
        else:
            value = _value(rhs)
        narrow(space, name, value, "--space")


def load_toml(path: Path) -> dict:
    """The `[search]` table of a TOML file (its `space` sub-table narrows the space)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PatcherError(path, f"cannot read ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PatcherError(path, f"invalid TOML ({e})") from None
    section = data.get("search")
    if not isinstance(section, dict):
        raise PatcherError(path, "no [search] table")
    unknown = set(section) - {"space"}
    if unknown:
        raise PatcherError(path, f"[search]: unknown keys {sorted(unknown)} (allowed: space)")
    return section


def apply_toml(space: dict[str, Param], section: dict, where) -> None:
    for name, value in (section.get("space") or {}).items():
        narrow(space, name, value, str(where))


def sample(trial, space: dict[str, Param]) -> dict:
    """Ask an Optuna trial for every free parameter (conditional ones only when they apply); fixed
    parameters are filled in but are not Optuna parameters."""
    out: dict[str, object] = {}
    for p in space.values():
        if p.when is not None and out.get(p.when[0]) != p.when[1]:
            continue
        if p.fixed is not None:
            out[p.name] = p.fixed
        elif p.kind == "float":
            out[p.name] = trial.suggest_float(p.name, p.low, p.high)
        else:
            out[p.name] = trial.suggest_categorical(p.name, list(p.choices))
    return out


class RandomTrial:
    """Stands in for an Optuna trial in `sample`: every free parameter drawn uniformly (as the study's
    random start-up trials draw them), for benchmarks and tests that need points without a study."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def suggest_categorical(self, name: str, choices: list):
        return choices[int(self.rng.integers(len(choices)))]


def complete(params: dict, fixed: dict) -> dict:
    """A stored trial's parameters plus the fixed ones the study recorded (conditions re-checked)."""
    out = dict(params)
    for name, value in fixed.items():
        out.setdefault(name, value)
    return out


# --- from parameters to an edit ------------------------------------------------------------------


def unit_rows(table: np.ndarray, where) -> np.ndarray:
    """Unit rows; a zero row stays zero (with a chat template, resid_pre[0] at the last position is the
    same template token for every prompt, so its mean difference is exactly zero: nothing to remove)."""
    table = np.asarray(table, dtype=np.float64)
    if not np.all(np.isfinite(table)):
        raise PatcherError(where, "directions contain NaN or Inf")
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    return np.divide(table, norms, out=np.zeros_like(table), where=norms > 0)


def blended(units: np.ndarray, index: float) -> np.ndarray:
    """Fractional row: (1 - f) row[floor] + f row[ceil] of the unit rows, renormalised (zero if both are)."""
    index = min(max(float(index), 0.0), units.shape[0] - 1.0)
    lo = int(math.floor(index))
    hi = min(lo + 1, units.shape[0] - 1)
    f = index - lo
    v = (1 - f) * units[lo] + f * units[hi]
    n = np.linalg.norm(v)
    return v / n if n > 0 else np.zeros_like(v)


def strengths(params: dict, n_layers: int) -> dict[str, dict]:
    """Per component, per layer strength (only nonzero entries kept)."""
    out = {}
    for c in COMPONENTS:
        peak = float(params[f"{c}_peak"])
        k = peak_kernel(
            n_layers,
            peak,
            float(params[f"{c}_center"]),
            float(params[f"{c}_min_frac"]) * peak,
            float(params[f"{c}_width"]),
        )
        out[c] = {l: s for l, s in k.items() if s != 0.0}
    return out


@dataclass
class EditSpec:
    """One trial's edit: (role, layer) -> (unit direction [d] float64, strength); layer None = embeddings."""

    groups: dict
    preserve: str | None
    direction_rows: dict  # (role, layer) -> resid_pre row (float) the direction came from, for the record

    def as_record(self) -> list[dict]:
        return [
            {"role": role, "layer": layer, "strength": s, "direction_row": self.direction_rows[(role, layer)]}
            for (role, layer), (_, s) in sorted(
                self.groups.items(), key=lambda kv: (kv[0][1] is not None, kv[0][1] or 0, kv[0][0])
            )
        ]


def edit_spec(params: dict, table: np.ndarray, n_layers: int, where="directions") -> EditSpec:
    units = unit_rows(table, where)
    if units.shape[0] != n_layers + 1:
        raise PatcherError(
            where, f"directions have {units.shape[0]} rows; the model needs {n_layers + 1} (resid_pre 0..L)"
        )
    scope = params["direction_scope"]
    if scope == "global":
        idx = float(params["direction_index"])
        g = blended(units, idx)
        vec = lambda _layer: (g, idx)  # noqa: E731
    else:

        def vec(layer):
            return (
                units[0 if layer is None else layer + 1],
                float(0 if layer is None else layer + 1),
            )

    groups, rows = {}, {}
    for c, per_layer in strengths(params, n_layers).items():
        for l, s in per_layer.items():
            v, row = vec(l)
            if np.any(v):  # a zero row: no difference to remove at that layer
                groups[(c, l)], rows[(c, l)] = (v, s), row
    if params.get("embed") and float(params.get("embed_strength", 0.0)) != 0.0:
        v, row = vec(None)
        if np.any(v):
            groups[("embed", None)], rows[("embed", None)] = (v, float(params["embed_strength"])), row
    preserve = params.get("norm_preserve", "none")
    return EditSpec(groups, None if preserve in (None, "none") else preserve, rows)
