"""`patcher run RECIPE.toml`: a batch of edits over one or more models, planned and validated in full
before any work, resumable, and parallel across models.

    [[model]]                       # one or more
    name = "llama"                  # label (default: folder name)
    path = "models/llama"
    output = "out/llama"            # every step writes inside this folder

    [[step]]
    op = "extract"                  # extract | ablate | inject | export | verify
    positive = "pos.txt"
    negative = "neg.txt"

    [[step]]
    op = "ablate"                   # direction: the last extract's file unless given
    layers = "4-20"
    strength = { kernel = "gaussian", center = 12, width = 4, peak = 1.0 }   # or a list, or scale = 0.8

Each step's input is the previous step's output model (the original for the first); the last
extract's directions feed ablate/inject; export packs the latest model; verify checks that export.
"""

import json
import math
import os
import re
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patcher.errors import PatcherError
from patcher.io.jsonsafe import dumps

STEP_KEYS = {
    "extract": {
        "positive",
        "negative",
        "positions",
        "batch_size",
        "max_prompts",
        "layers",
        "chat_template",
        "system",
        "project_out_negative_mean",
        "output",
    },
    "ablate": {
        "direction",
        "directions",
        "layers",
        "targets",
        "scale",
        "strength",
        "norm_preserve",
        "untie_embeddings",
        "output",
    },
    "inject": {"direction", "layer", "alpha", "target", "output"},
    "export": {"dtype", "output"},
    "verify": {"prompts", "direction", "tokens", "dtype"},
}
MODEL_KEYS = {"name", "path", "output", "arch_table"}
KERNELS = {
    "constant": {"value"},
    "linear": {"start", "end"},
    "gaussian": {"center", "width", "peak"},
    "peak": {"peak", "center", "min", "width"},
}  # peak: linear falloff to min at width, 0 beyond
DEFAULT_OUTPUT = {
    "extract": "directions.safetensors",
    "ablate": "ablated",
    "inject": "injected",
    "export": "onnx",
}


@dataclass
class Problem:
    line: int | None
    message: str

    def __str__(self):
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class Step:
    index: int
    op: str
    options: dict
    line: int | None


@dataclass
class Recipe:
    path: Path
    text: str
    models: list[dict]
    steps: list[Step]
    problems: list[Problem] = field(default_factory=list)


def _lines(text: str, header: str) -> list[int]:
    """1-based line of each `[[header]]` table, so problems can point into the file."""
    return [
        i + 1 for i, line in enumerate(text.splitlines()) if re.match(rf"\s*\[\[\s*{header}\s*\]\]", line)
    ]


def _key_line(text: str, start: int | None, key: str) -> int | None:
    if start is None:
        return None
    lines = text.splitlines()
    for i in range(start, len(lines)):
        if re.match(r"\s*\[", lines[i]) and i + 1 != start:
            break
        if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start


def strengths(spec, n_layers: int, where: str) -> dict[int, float]:
    """Per-layer strength from a number, a list (one per layer) or a kernel table; every number is
    checked like --scale (finite, in range)."""
    from patcher import validate as V

    def num(v, what="scale", key="scale"):
        return float(V.number(v, key, f"{where}: {what}"))

    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return {l: num(spec) for l in range(n_layers)}
    if isinstance(spec, list):
        if len(spec) != n_layers:
            raise PatcherError(
                where, f"strength list must have {n_layers} numbers (one per layer), got {len(spec)}"
            )
        return {l: num(v, f"strength[{l}]") for l, v in enumerate(spec)}
    if isinstance(spec, dict) and spec.get("kernel") in KERNELS:
        k = spec["kernel"]
        extra = set(spec) - KERNELS[k] - {"kernel"}
        if extra:
            raise PatcherError(
                where, f"strength kernel {k!r} takes {sorted(KERNELS[k])}, not {sorted(extra)}"
            )
        if k == "constant":
            return {l: num(spec.get("value", 1.0), "value") for l in range(n_layers)}
        if k == "linear":
            a, b = num(spec.get("start", 0.0), "start"), num(spec.get("end", 1.0), "end")
            return {l: a + (b - a) * l / max(n_layers - 1, 1) for l in range(n_layers)}
        if "center" not in spec:
            raise PatcherError(where, f"{k} strength needs a center")
        c = num(spec["center"], "center", "gaussian_center")
        w = num(spec.get("width", 1.0), "width", "gaussian_width")
        p = num(spec.get("peak", 1.0), "peak")
        if k == "peak":
            from patcher.edit.plan import peak_kernel

            return peak_kernel(n_layers, p, c, num(spec.get("min", 0.0), "min"), w)
        return {l: p * math.exp(-((l - c) ** 2) / (2 * w * w)) for l in range(n_layers)}
    raise PatcherError(
        where, "strength is a number, a list per layer, or {kernel = constant|linear|gaussian, ...}"
    )


def load(path) -> Recipe:
    from patcher.io.paths import read_text

    path = Path(path)
    try:
        text = read_text(path, "recipe")
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PatcherError(path, f"invalid TOML ({e})") from None
    problems = []
    unknown = set(data) - {"model", "step"}
    if unknown:
        problems.append(
            Problem(
                1, f"unknown top-level keys {sorted(unknown)}; a recipe has [[model]] and [[step]] tables"
            )
        )
    model_lines, step_lines = _lines(text, "model"), _lines(text, "step")
    models = data.get("model") or []
    if not isinstance(models, list) or not models:
        problems.append(Problem(None, "no [[model]] table"))
        models = []
    for i, m in enumerate(models):
        line = model_lines[i] if i < len(model_lines) else None
        if not isinstance(m, dict):
            problems.append(Problem(line, "model: expected a [[model]] table"))
            continue
        for k in set(m) - MODEL_KEYS:
            problems.append(
                Problem(_key_line(text, line, k), f"model: unknown key {k!r} (allowed: {sorted(MODEL_KEYS)})")
            )
        for k in ("path", "output"):
            if not isinstance(m.get(k), str):
                problems.append(Problem(line, f"model: {k!r} (a path) is required"))
        m["_line"] = line
    models = [m for m in models if isinstance(m, dict)]
    steps = []
    raw_steps = data.get("step") or []
    if not isinstance(raw_steps, list):
        problems.append(Problem(None, "step must be [[step]] tables"))
        raw_steps = []
    for i, s in enumerate(raw_steps):
        line = step_lines[i] if i < len(step_lines) else None
        if not isinstance(s, dict):
            problems.append(Problem(line, f"step {i + 1}: expected a [[step]] table"))
            continue
        op = s.get("op")
        if op not in STEP_KEYS:
            problems.append(
                Problem(_key_line(text, line, "op"), f"step {i + 1}: op must be one of {sorted(STEP_KEYS)}")
            )
            continue
        for k in set(s) - STEP_KEYS[op] - {"op"}:
            problems.append(
                Problem(
                    _key_line(text, line, k),
                    f"step {i + 1} ({op}): unknown key {k!r} (allowed: {sorted(STEP_KEYS[op])})",
                )
            )
        steps.append(Step(i + 1, op, {k: v for k, v in s.items() if k != "op"}, line))
    if not steps:
        problems.append(Problem(None, "no [[step]] tables"))
    return Recipe(path, text, models, steps, problems)


# --- validation against the models ------------------------------------------------------------------


@dataclass
class Action:
    step: Step
    op: str
    input: Path  # model folder the step reads
    output: Path  # folder (or file, for extract) it writes
    options: dict  # resolved options (paths absolute, strengths expanded)
    fingerprint: str = ""


@dataclass
class ModelPlan:
    name: str
    path: Path
    output: Path
    actions: list[Action]
    n_layers: int
    d_model: int
    arch_table: Path | None = None  # the model's custom table: every step opens the model with it


def _resolve_path(base: Path, value) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def _model_path(base: Path, value: str) -> Path:
    """A model `path`: relative to the recipe's folder, or a hub repo id resolved from the local cache."""
    from patcher.io.hub import locate, parse_repo_id

    local = _resolve_path(base, value)
    if local.exists() or parse_repo_id(value) is None:
        return local
    return locate(value)[0]


def _direction_specs(opts: dict) -> list[str]:
    if "directions" in opts:
        return list(opts["directions"]) if isinstance(opts["directions"], list) else [opts["directions"]]
    return [opts["direction"]] if "direction" in opts else []


def _inside(target: Path, folder: Path) -> bool:
    import os

    t, f = Path(os.path.realpath(target)), Path(os.path.realpath(folder))
    return f in t.parents


def _layers_check(op):
    def check(v, L, key):
        from patcher.validate import parse_layers

        parse_layers(v, L + 1 if op == "extract" else L, key)
        return str(v)

    return check


def _checks():
    """Per op and option: check(value, n_layers, key) -> the value to use (same rules, messages as the
    CLI)."""
    from patcher import validate as V
    from patcher.model.architectures import ROLES

    num = lambda name: lambda v, L, k: V.number(v, name, k)  # noqa: E731
    flag = lambda v, L, k: V.flag(v, k)  # noqa: E731
    dtype = lambda v, L, k: V.choice(v, ("fp32", "fp16", "int4"), k)  # noqa: E731
    return {
        "extract": {
            "positions": lambda v, L, k: V.positions(v, k),
            "batch_size": num("batch_size"),
            "max_prompts": num("max_prompts"),
            "layers": _layers_check("extract"),
            "chat_template": flag,
            "system": lambda v, L, k: V.text(v, k),
            "project_out_negative_mean": flag,
        },
        "ablate": {
            "layers": _layers_check("ablate"),
            "targets": lambda v, L, k: list(V.choices(v, ROLES, k)),
            "norm_preserve": lambda v, L, k: V.choice(v, ("rows", "cols"), k),
            "untie_embeddings": flag,
        },
        "inject": {
            "layer": lambda v, L, k: V.layer_index(v, L, k),
            "alpha": num("alpha"),
            "target": lambda v, L, k: V.choice(v, ("mlp_out", "attn_out"), k),
        },
        "export": {"dtype": dtype},
        "verify": {"tokens": num("tokens"), "dtype": dtype},
    }


def validate(recipe: Recipe) -> list[ModelPlan]:
    """Check everything that can be checked before work; raise one error listing every problem."""
    v = _Validation(recipe)
    plans = [plan for m in recipe.models if (plan := v.model_plan(m)) is not None]
    v.check_outputs(plans)
    if v.problems:
        error = PatcherError(
            recipe.path, f"{len(v.problems)} problem(s):\n  " + "\n  ".join(map(str, v.problems))
        )
        error.lines = True  # one problem per line, each naming its recipe line
        raise error
    for plan in plans:
        _fingerprints(plan)
    return plans


class _Validation:
    """One recipe's checks, one method per rule; every problem is collected (with its recipe line)
    so the user sees them all at once. `inputs` gathers every file the recipe reads: no output may
    touch one."""

    def __init__(self, recipe: Recipe):
        self.recipe, self.base = recipe, recipe.path.parent
        self.checks = _checks()
        self.problems = list(recipe.problems)
        self.inputs = [recipe.path] + [
            _resolve_path(self.base, m[k])
            for m in recipe.models
            for k in ("path", "arch_table")
            if isinstance(m.get(k), str)
        ]

    def where(self, st: Step, key: str) -> int | None:
        return _key_line(self.recipe.text, st.line, key)

    def problem(self, st: Step, key: str | None, e: PatcherError) -> None:
        """A step's problem, at the line of `key` (the step's first line without one)."""
        self.problems.append(
            Problem(
                self.where(st, key) if key else st.line,
                f"step {st.index} ({st.op}): " + (f"{key}: " if key else "") + e.problem,
            )
        )

    def model_plan(self, m: dict) -> ModelPlan | None:
        from patcher.model.opened import Model

        if not isinstance(m.get("path"), str) or not isinstance(m.get("output"), str):
            return None  # already a problem of the recipe's shape
        out = _resolve_path(self.base, m["output"])
        table = _resolve_path(self.base, m["arch_table"]) if isinstance(m.get("arch_table"), str) else None
        try:
            if "arch_table" in m and table is None:
                raise PatcherError("arch_table", "must be a path to a TOML table")
            path = _model_path(self.base, m["path"])
            with Model.open(path, table) as opened:
                res = opened.resolved
                self.inputs.extend(opened.input_paths)  # a hub repo's cache entry, symlink targets
        except PatcherError as e:
            line = _key_line(self.recipe.text, m.get("_line"), "path")
            self.problems.append(Problem(line, f"model {m['path']}: {e}"))
            return None
        L, d = res.n_layers, res.d_model
        actions: list[Action] = []
        current, last_directions = path, None
        for st in self.recipe.steps:
            o = dict(st.options)
            target = self.step_output(st, o, out)
            self.prompt_files(st, o)
            if st.op in ("ablate", "inject", "verify"):
                self.directions(st, o, L, d, last_directions)
            self.option_values(st, o, L)
            for rule in OP_RULES.get(st.op, ()):
                target = rule(self, st, o, L, target) or target
            if st.op == "extract":
                last_directions = target
            if st.op == "verify" and not any(a.op == "export" for a in actions):
                self.problems.append(
                    Problem(st.line, f"step {st.index}: verify needs an export step before it")
                )
            action = Action(st, st.op, current, target, o)
            if st.op == "verify":
                _verify_inputs(action, actions, current, out)
            actions.append(action)
            if st.op in ("ablate", "inject"):
                current = target
        return ModelPlan(m.get("name") or path.name, path, out, actions, L, d, table)

    def step_output(self, st: Step, o: dict, out: Path) -> Path:
        """Where the step writes: its `output` name, or NN-default, inside the model's output folder."""
        name = o.pop("output", None)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            self.problem(st, "output", PatcherError("output", f"must be a file or folder name, got {name!r}"))
            name = None
        target = out / (name or f"{st.index:02d}-{DEFAULT_OUTPUT.get(st.op, '')}")
        if not _inside(target, out):
            self.problem(
                st, "output", PatcherError("output", f"{name!r} leaves the model's output folder {out}")
            )
        return target

    def prompt_files(self, st: Step, o: dict) -> None:
        from patcher.io.paths import regular_file

        for k in ("positive", "negative", "prompts"):
            if k not in o:
                continue
            if not isinstance(o[k], str):
                self.problem(st, k, PatcherError(k, f"must be a file name, got {o[k]!r}"))
                o.pop(k)
                continue
            o[k] = _resolve_path(self.base, o[k])
            self.inputs.append(o[k])
            if not o[k].exists():
                self.problems.append(
                    Problem(self.where(st, k), f"step {st.index}: {k} file {o[k]} does not exist")
                )
                continue
            try:
                regular_file(o[k], f"{k} file")
            except PatcherError as e:
                self.problem(st, k, e)

    def directions(self, st: Step, o: dict, L: int, d: int, last_directions: Path | None) -> None:
        """`direction`/`directions` resolved, loaded and checked; none given: the last extract's."""
        from patcher.edit.directions import check_independent, load_direction

        specs = _direction_specs(o)
        resolved_specs, loaded = [], []
        for spec in specs:
            if not isinstance(spec, str):
                self.problem(st, "direction", PatcherError("direction", f"must be a file name, got {spec!r}"))
                continue
            file_part, _, layer_part = (
                spec.rpartition(":") if re.search(r"\.safetensors:-?\d+$", spec) else (spec, "", "")
            )
            full = str(_resolve_path(self.base, file_part)) + (f":{layer_part}" if layer_part else "")
            self.inputs.append(_resolve_path(self.base, file_part))
            try:
                loaded.append(load_direction(full, d, L).vectors)
            except PatcherError as e:
                key = "direction" if "direction" in o else "directions"
                self.problems.append(Problem(self.where(st, key), f"step {st.index}: {e}"))
            resolved_specs.append(full)
        if len(loaded) > 1:  # together they must still span len(...) dimensions
            try:
                check_independent(np.concatenate(loaded), "directions")
            except PatcherError as e:
                self.problem(st, "directions", e)
        if not specs and st.op != "verify":
            if last_directions is None:
                self.problems.append(
                    Problem(
                        st.line,
                        f"step {st.index} ({st.op}): no direction given and no extract step before it",
                    )
                )
            else:
                resolved_specs = [str(last_directions)]
        o["directions"] = resolved_specs
        o.pop("direction", None)

    def option_values(self, st: Step, o: dict, L: int) -> None:
        for key, check in self.checks.get(st.op, {}).items():
            if key in o:
                try:
                    o[key] = check(o[key], L, key)
                except PatcherError as e:
                    self.problem(st, key, e)

    def check_outputs(self, plans: list[ModelPlan]) -> None:
        """Every input is known now: no output may touch one, and no two outputs may be one."""
        from patcher.io.paths import check_output

        names = [p.output.resolve() for p in plans]
        if len(set(names)) != len(names):
            self.problems.append(Problem(None, "two models write to the same output folder"))
        for plan in plans:
            try:
                check_output(plan.output, self.inputs, resume=True, option=f"model {plan.name}: output")
            except PatcherError as e:
                self.problems.append(Problem(None, f"model {plan.name}: output {e}"))
            seen: dict[str, int] = {}
            for a in plan.actions:
                key = os.path.realpath(a.output)
                if key in seen:
                    self.problems.append(
                        Problem(
                            a.step.line,
                            f"step {a.step.index}: writes {a.output}, as step {seen[key]} does; "
                            "give each step its own output",
                        )
                    )
                seen[key] = a.step.index


def _inject_needs(v: _Validation, st: Step, o: dict, L: int, target: Path) -> None:
    for key in ("layer", "alpha"):
        if key not in o:
            v.problem(st, key, PatcherError(key, "is required"))


def _ablate_strengths(v: _Validation, st: Step, o: dict, L: int, target: Path) -> None:
    try:
        spec = o.pop("strength", o.pop("scale", 1.0))
        o["strengths"] = strengths(spec, L, f"step {st.index}")
    except PatcherError as e:
        message = e.problem if e.problem.startswith("step") else f"{e.where}: {e.problem}"
        v.problems.append(Problem(v.where(st, "strength"), message))


def _extract_needs(v: _Validation, st: Step, o: dict, L: int, target: Path) -> Path:
    for k in ("positive", "negative"):
        if k not in o:
            v.problems.append(Problem(st.line, f"step {st.index}: extract needs {k}"))
    return target if target.suffix == ".safetensors" else target.with_suffix(".safetensors")


# per op, the rules beyond the common ones (output, prompt files, directions, option values);
# a rule may return the step's output path when it changes it
OP_RULES = {"inject": (_inject_needs,), "ablate": (_ablate_strengths,), "extract": (_extract_needs,)}


def _verify_inputs(action: Action, actions: list[Action], current: Path, out: Path) -> None:
    """verify reads the last export (in its dtype) and compares with the checkpoint it came from."""
    export = next((a for a in reversed(actions) if a.op == "export"), None)
    action.input = export.output if export else current
    if export is not None:  # verify what the export wrote (docs/recipes.md: export int4, then verify)
        action.options.setdefault("dtype", export.options.get("dtype", "fp32"))
    action.options["reference"] = current
    action.output = out / f"{action.step.index:02d}-verify.json"


def _fingerprints(plan: ModelPlan) -> None:
    """Each action's identity: its options and its input's identity, chained through the pipeline."""
    import hashlib

    from patcher import __version__
    from patcher.io.manifest import folder_identity, sha256_file

    model, directions, export = folder_identity(plan.path), None, None
    table = sha256_file(plan.arch_table) if plan.arch_table else None
    for a in plan.actions:
        blob = json.dumps(
            {
                "op": a.op,
                "options": a.options,
                "model": model,
                "directions": directions,
                "export": export,
                "v": __version__,
                "arch_table": table,
            },
            sort_keys=True,
            default=str,
        )
        a.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        if a.op in ("ablate", "inject"):
            model = a.fingerprint
        elif a.op == "extract":
            directions = a.fingerprint
        elif a.op == "export":
            export = a.fingerprint


# --- dry run and execution ---------------------------------------------------------------------------


def describe(plans: list[ModelPlan]) -> list[dict]:
    """The whole plan, for --dry-run: per action its input, output, and (for edits) every tensor."""
    from patcher.edit.directions import Direction
    from patcher.edit.plan import parse_layers, plan_ablation, plan_injection
    from patcher.model.opened import Model

    rows = []
    for plan in plans:
        for a in plan.actions:
            row = {
                "model": plan.name,
                "step": a.step.index,
                "op": a.op,
                "input": str(a.input),
                "output": str(a.output),
                "tensors": [],
                "bytes": 0,
            }
            if a.op in ("ablate", "inject"):
                # later steps: described on the original layout
                src = a.input if a.input.exists() else plan.path
                with Model.open(src, plan.arch_table) as ck:
                    k = max(len(a.options.get("directions") or []), 1)
                    d = Direction(
                        np.random.default_rng(0).standard_normal((k, plan.d_model)), "planned", None, ""
                    )
                    p = (
                        plan_ablation(
                            ck,
                            d,
                            layers=parse_layers(a.options.get("layers"), plan.n_layers),
                            roles=tuple(a.options.get("targets") or ("embed", "attn_out", "mlp_out")),
                            scale=a.options["strengths"],
                            preserve=a.options.get("norm_preserve"),
                            untie=bool(a.options.get("untie_embeddings")),
                        )
                        if a.op == "ablate"
                        else plan_injection(
                            ck,
                            Direction(d.vectors[:1], "planned", None, ""),
                            layer=a.options["layer"],
                            alpha=float(a.options["alpha"]),
                            target=a.options.get("target", "mlp_out"),
                        )
                    )
                    row["tensors"] = [(e.name, e.formula, e.nbytes) for e in p.all()]
                    row["bytes"] = p.bytes_edited
            rows.append(row)
    return rows


def _directions(specs: list[str], d_model: int):
    from patcher.edit.directions import Direction, digest, load_direction

    loaded = [load_direction(s, d_model) for s in specs]
    if len(loaded) == 1:
        return loaded[0]
    vectors = np.concatenate([x.vectors for x in loaded])
    return Direction(vectors, " + ".join(specs), None, digest(vectors))


def _manifest_path(a: Action) -> Path:
    from patcher.io import manifest

    return a.output if a.output.suffix == "" else a.output.with_name(a.output.name + "." + manifest.MANIFEST)


def is_done(a: Action) -> bool:
    from patcher.io import manifest

    if a.output.suffix == "":
        return manifest.is_complete(a.output, a.fingerprint)
    side = _manifest_path(a)
    data = manifest.read_file(side)
    return bool(
        data
        and (data.get("recipe") or {}).get("fingerprint") == a.fingerprint
        and a.output.is_file()
        and manifest.sha256_file(a.output) == data["outputs"].get(a.output.name)
    )


def run_action(a: Action, plan: ModelPlan, recipe_file: str) -> str:
    """Execute one action (its output is written atomically); returns a one-line summary."""
    import time

    from patcher.edit.apply import execute
    from patcher.edit.plan import parse_layers, plan_ablation, plan_injection
    from patcher.io import manifest
    from patcher.io.paths import check_output
    from patcher.model.opened import Model

    info = {"file": recipe_file, "step": a.step.index, "fingerprint": a.fingerprint, "model": plan.name}
    t0 = time.perf_counter()
    o = a.options
    if a.output.suffix:  # a file step: a previous run's file is replaced, anything else is refused
        check_output(
            a.output, [plan.path], kind="file", replace_ok=True, option=f"step {a.step.index} output"
        )
    if a.op == "extract":
        from patcher.edit.extract import extract

        r = extract(
            a.input,
            o["positive"],
            o["negative"],
            positions=tuple(o.get("positions", [-1])),
            batch_size=int(o.get("batch_size", 8)),
            max_prompts=o.get("max_prompts"),
            layers=o.get("layers"),
            chat_template=bool(o.get("chat_template", True)),
            system=o.get("system"),
            project_out_negative_mean=bool(o.get("project_out_negative_mean", False)),
            arch_table=plan.arch_table,
        )
        a.output.parent.mkdir(parents=True, exist_ok=True)
        r.save(a.output)
        manifest.write_file(
            _manifest_path(a),
            kind="extract",
            command=None,
            recipe=info,
            inputs={p.name: manifest.sha256_file(p) for p in (o["positive"], o["negative"])},
            outputs={a.output.name: manifest.sha256_file(a.output)},
            timings={"seconds": round(time.perf_counter() - t0, 3)},
        )
        return f"selected layer {r.selected_layer}"
    if a.op in ("ablate", "inject"):
        with Model.open(a.input, plan.arch_table) as ck:
            res = ck.resolved
            d = _directions(o["directions"], res.d_model)
            if a.op == "ablate":
                p = plan_ablation(
                    ck,
                    d,
                    layers=parse_layers(o.get("layers"), res.n_layers),
                    roles=tuple(o.get("targets") or ("embed", "attn_out", "mlp_out")),
                    scale=o["strengths"],
                    preserve=o.get("norm_preserve"),
                    untie=bool(o.get("untie_embeddings")),
                )
            else:
                p = plan_injection(
                    ck, d, layer=int(o["layer"]), alpha=float(o["alpha"]), target=o.get("target", "mlp_out")
                )
            # execute's `command: str` is too narrow (the manifest records None: no command line);
            # apply.py is being refactored (issue 23)
            rep = execute(p, a.output, force=True, command=None, recipe=info)  # type: ignore[arg-type]
        return f"{len(p.edits)} edited, {len(p.new)} added" + (
            f", leakage {rep.overall_leakage():.2e}" if rep.leakage else ""
        )
    if a.op == "export":
        from patcher.onnx.export import export

        export(
            a.input,
            a.output,
            dtype=o.get("dtype", "fp32"),
            force=True,
            recipe=info,
            arch_table=plan.arch_table,
        )
        return f"{o.get('dtype', 'fp32')} export"
    if a.op == "verify":
        from patcher.edit.directions import load_direction
        from patcher.onnx.verify import verify

        d = load_direction(o["directions"][0], plan.d_model) if o.get("directions") else None
        verified = verify(
            a.input,
            o["reference"],
            dtype=o.get("dtype", "fp32"),
            prompts=o.get("prompts"),
            direction=d,
            tokens=int(o.get("tokens", 8)),
            arch_table=plan.arch_table,
        )
        from patcher.io.atomic import AtomicOutput

        with AtomicOutput(a.output) as tmp:
            tmp.write_text(dumps(verified.as_dict(), indent=2) + "\n")
        if not verified.parity_ok:  # the report stays for reading, but the step is not recorded complete
            _manifest_path(a).unlink(missing_ok=True)
            raise PatcherError(
                a.output,
                f"parity failed: max |Δ logits| {verified.max_abs_diff:.3g} (report "
                "kept here; the step is not marked complete and runs again next time)",
            )
        manifest.write_file(
            _manifest_path(a),
            kind="verify",
            command=None,
            recipe=info,
            inputs={},
            outputs={a.output.name: manifest.sha256_file(a.output)},
        )
        return f"parity {verified.max_abs_diff:.2e}, greedy match {verified.generation_match:.0%}"
    raise AssertionError(a.op)


def run_model(plan: ModelPlan, recipe_file: str) -> list[tuple[int, str, str]]:
    """All actions of one model, in order, skipping those already complete (by manifest)."""
    from patcher.io import manifest

    plan.output.mkdir(parents=True, exist_ok=True)
    # marks the folder as patcher's: a re-run resumes in it
    if not (plan.output / manifest.MANIFEST).is_file():
        manifest.write(
            plan.output,
            kind="recipe",
            command=None,
            recipe={"file": recipe_file, "model": plan.name},
            inputs={},
            outputs={},
        )
    done = []
    for a in plan.actions:
        if is_done(a):
            done.append((a.step.index, a.op, "skipped (complete, verified by manifest)"))
            continue
        done.append((a.step.index, a.op, run_action(a, plan, recipe_file)))
    return done


def run(plans: list[ModelPlan], recipe_file: str, jobs: int = 1, on_done=None) -> dict[str, list]:
    """Models are independent: with jobs > 1 they run in separate processes (same results)."""
    results = {}
    if jobs <= 1 or len(plans) <= 1:
        for plan in plans:
            results[plan.name] = run_model(plan, recipe_file)
            if on_done:
                on_done(plan.name, results[plan.name])
        return results
    import multiprocessing

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {plan.name: pool.submit(run_model, plan, recipe_file) for plan in plans}
        for name, fut in futures.items():
            results[name] = fut.result()
            if on_done:
                on_done(name, results[name])
    return results
