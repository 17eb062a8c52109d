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
import re
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patcher.errors import PatcherError

STEP_KEYS = {
    "extract": {"positive", "negative", "positions", "batch_size", "max_prompts", "layers", "chat_template",
                "system",
                "project_out_negative_mean", "output"},
    "ablate": {"direction", "directions", "layers", "targets", "scale", "strength", "norm_preserve",
               "untie_embeddings", "output"},
    "inject": {"direction", "layer", "alpha", "target", "output"},
    "export": {"dtype", "output"},
    "verify": {"prompts", "direction", "tokens", "dtype"},
}
MODEL_KEYS = {"name", "path", "output", "arch_table"}
KERNELS = {"constant": {"value"}, "linear": {"start", "end"}, "gaussian": {"center", "width", "peak"}}
DEFAULT_OUTPUT = {"extract": "directions.safetensors", "ablate": "ablated", "inject": "injected",
                  "export": "onnx"}


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
    return [i + 1 for i, line in enumerate(text.splitlines()) if re.match(rf"\s*\[\[\s*{header}\s*\]\]",
                                                                          line)]


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
    """Per-layer strength from a number, a list (one per layer) or a kernel table."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return {l: float(spec) for l in range(n_layers)}
    if isinstance(spec, list):
        if len(spec) != n_layers or not all(isinstance(v, (int, float)) for v in spec):
            raise PatcherError(where, f"strength list must have {n_layers} numbers (one per layer), got "
                               f"{len(spec)}")
        return {l: float(v) for l, v in enumerate(spec)}
    if isinstance(spec, dict) and spec.get("kernel") in KERNELS:
        k = spec["kernel"]
        extra = set(spec) - KERNELS[k] - {"kernel"}
        if extra:
            raise PatcherError(where,
                               f"strength kernel {k!r} takes {sorted(KERNELS[k])}, not {sorted(extra)}")
        if k == "constant":
            return {l: float(spec.get("value", 1.0)) for l in range(n_layers)}
        if k == "linear":
            a, b = float(spec.get("start", 0.0)), float(spec.get("end", 1.0))
            return {l: a + (b - a) * l / max(n_layers - 1, 1) for l in range(n_layers)}
        c, w, p = float(spec["center"]), float(spec.get("width", 1.0)), float(spec.get("peak", 1.0))
        if w <= 0:
            raise PatcherError(where, "gaussian width must be > 0")
        return {l: p * math.exp(-((l - c) ** 2) / (2 * w * w)) for l in range(n_layers)}
    raise PatcherError(where, "strength is a number, a list per layer, or "
                       "{kernel = constant|linear|gaussian, ...}")


def load(path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as e:
        raise PatcherError(path, f"cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise PatcherError(path, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise PatcherError(path, f"invalid TOML ({e})") from None
    problems = []
    unknown = set(data) - {"model", "step"}
    if unknown:
        problems.append(Problem(1, f"unknown top-level keys {sorted(unknown)}; a recipe has [[model]] and "
                                f"[[step]] tables"))
    model_lines, step_lines = _lines(text, "model"), _lines(text, "step")
    models = data.get("model") or []
    if not isinstance(models, list) or not models:
        problems.append(Problem(None, "no [[model]] table"))
        models = []
    for i, m in enumerate(models):
        line = model_lines[i] if i < len(model_lines) else None
        for k in set(m) - MODEL_KEYS:
            problems.append(Problem(_key_line(text, line, k), f"model: unknown key {k!r} (allowed: "
                                    f"{sorted(MODEL_KEYS)})"))
        for k in ("path", "output"):
            if not isinstance(m.get(k), str):
                problems.append(Problem(line, f"model: {k!r} (a path) is required"))
        m["_line"] = line
    steps = []
    for i, s in enumerate(data.get("step") or []):
        line = step_lines[i] if i < len(step_lines) else None
        op = s.get("op")
        if op not in STEP_KEYS:
            problems.append(Problem(_key_line(text, line, "op"), f"step {i + 1}: op must be one of "
                                    f"{sorted(STEP_KEYS)}"))
            continue
        for k in set(s) - STEP_KEYS[op] - {"op"}:
            problems.append(Problem(_key_line(text, line, k), f"step {i + 1} ({op}): unknown key {k!r} "
                                                               f"(allowed: {sorted(STEP_KEYS[op])})"))
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


def validate(recipe: Recipe) -> list[ModelPlan]:
    """Check everything that can be checked before work; raise one error listing every problem."""
    from patcher.model.opened import Model
    from patcher.edit.directions import load_direction
    from patcher.edit.plan import parse_layers
    base = recipe.path.parent
    problems = list(recipe.problems)
    plans = []
    for m in recipe.models:
        line = m.get("_line")
        if not isinstance(m.get("path"), str) or not isinstance(m.get("output"), str):
            continue
        out = _resolve_path(base, m["output"])
        table = _resolve_path(base, m["arch_table"]) if isinstance(m.get("arch_table"), str) else None
        try:
            if "arch_table" in m and table is None:
                raise PatcherError("arch_table", "must be a path to a TOML table")
            path = _model_path(base, m["path"])
            with Model.open(path, table) as opened:
                res = opened.resolved
        except PatcherError as e:
            problems.append(Problem(_key_line(recipe.text, line, "path"), f"model {m['path']}: {e}"))
            continue
        L, d = res.n_layers, res.d_model
        actions, current, last_directions = [], path, None
        for st in recipe.steps:
            o, where = dict(st.options), lambda k, st=st: _key_line(recipe.text, st.line, k)  # noqa: E731
            default = DEFAULT_OUTPUT.get(st.op, "")
            target = out / (o.pop("output", None) or f"{st.index:02d}-{default}")
            for k in ("positive", "negative", "prompts"):
                if k in o:
                    o[k] = _resolve_path(base, o[k])
                    if not o[k].is_file():
                        problems.append(Problem(where(k), f"step {st.index}: {k} file {o[k]} does not exist"))
            if st.op in ("ablate", "inject", "verify"):
                specs = _direction_specs(o)
                resolved_specs = []
                for spec in specs:
                    file_part, _, layer_part = (str(spec).partition(":") if ".safetensors:" in str(spec)
                                                else (str(spec), "", ""))
                    full = str(_resolve_path(base, file_part)) + (f":{layer_part}" if layer_part else "")
                    try:
                        load_direction(full, d)
                    except PatcherError as e:
                        problems.append(Problem(where("direction" if "direction" in o else "directions"),
                                                f"step {st.index}: {e}"))
                    resolved_specs.append(full)
                if not specs and st.op != "verify":
                    if last_directions is None:
                        problems.append(Problem(st.line, f"step {st.index} ({st.op}): no direction given "
                                                f"and no extract step before it"))
                    else:
                        resolved_specs = [str(last_directions)]
                o["directions"] = resolved_specs
                o.pop("direction", None)
            if "layers" in o:
                try:
                    parse_layers(str(o["layers"]), L + 1 if st.op == "extract" else L)
                except PatcherError as e:
                    problems.append(Problem(where("layers"), f"step {st.index}: {e.problem}"))
            if st.op == "inject":
                if not isinstance(o.get("layer"), int) or not 0 <= o["layer"] < L:
                    problems.append(Problem(where("layer"), f"step {st.index}: layer must be an integer in "
                                            f"0..{L - 1}"))
                if not isinstance(o.get("alpha"), (int, float)):
                    problems.append(Problem(where("alpha"), f"step {st.index}: alpha (a number) is required"))
            if st.op == "ablate":
                try:
                    spec = o.pop("strength", o.pop("scale", 1.0))
                    o["strengths"] = strengths(spec, L, f"step {st.index}")
                except PatcherError as e:
                    problems.append(Problem(where("strength"), e.problem))
                if o.get("norm_preserve") not in (None, "rows", "cols"):
                    problems.append(Problem(where("norm_preserve"), f"step {st.index}: norm_preserve is "
                                            f"rows or cols"))
            if st.op == "extract":
                for k in ("positive", "negative"):
                    if k not in o:
                        problems.append(Problem(st.line, f"step {st.index}: extract needs {k}"))
                target = target if target.suffix == ".safetensors" else target.with_suffix(".safetensors")
                last_directions = target
            if st.op == "verify" and not any(a.op == "export" for a in actions):
                problems.append(Problem(st.line, f"step {st.index}: verify needs an export step before it"))
            if st.op == "export" and o.get("dtype", "fp32") not in ("fp32", "fp16", "int4"):
                problems.append(Problem(where("dtype"), f"step {st.index}: dtype is fp32, fp16 or int4"))
            action = Action(st, st.op, current, target, o)
            if st.op == "verify":
                action.input = next(a.output for a in reversed(actions)
                                    if a.op == "export") if actions else current
                action.options["reference"] = current
                action.output = out / f"{st.index:02d}-verify.json"
            actions.append(action)
            if st.op in ("ablate", "inject"):
                current = target
        plans.append(ModelPlan(m.get("name") or path.name, path, out, actions, L, d, table))
    names = [p.output.resolve() for p in plans]
    if len(set(names)) != len(names):
        problems.append(Problem(None, "two models write to the same output folder"))
    if problems:
        raise PatcherError(recipe.path, f"{len(problems)} problem(s):\n  " + "\n  ".join(map(str, problems)))
    for plan in plans:
        _fingerprints(plan)
    return plans


def _fingerprints(plan: ModelPlan) -> None:
    """Each action's identity: its options and its input's identity, chained through the pipeline."""
    import hashlib

    from patcher import __version__
    from patcher.io.manifest import folder_identity
    from patcher.io.manifest import sha256_file
    model, directions, export = folder_identity(plan.path), None, None
    table = sha256_file(plan.arch_table) if plan.arch_table else None
    for a in plan.actions:
        blob = json.dumps({"op": a.op, "options": a.options, "model": model, "directions": directions,
                           "export": export, "v": __version__, "arch_table": table}, sort_keys=True,
                           default=str)
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
    from patcher.model.opened import Model
    from patcher.edit.directions import Direction
    from patcher.edit.plan import parse_layers, plan_ablation, plan_injection
    rows = []
    for plan in plans:
        for a in plan.actions:
            row = {"model": plan.name, "step": a.step.index, "op": a.op, "input": str(a.input),
                   "output": str(a.output),
                   "tensors": [], "bytes": 0}
            if a.op in ("ablate", "inject"):
                # later steps: described on the original layout
                src = a.input if a.input.exists() else plan.path
                with Model.open(src, plan.arch_table) as ck:
                    k = max(len(a.options.get("directions") or []), 1)
                    d = Direction(np.random.default_rng(0).standard_normal((k, plan.d_model)), "planned",
                                  None, "")
                    p = (plan_ablation(ck, d, layers=parse_layers(a.options.get("layers"), plan.n_layers),
                                       roles=tuple(a.options.get("targets") or ("embed", "attn_out",
                                                                                "mlp_out")),
                                       scale=a.options["strengths"], preserve=a.options.get("norm_preserve"),
                                       untie=bool(a.options.get("untie_embeddings")))
                         if a.op == "ablate" else
                         plan_injection(ck, Direction(d.vectors[:1], "planned", None, ""),
                                        layer=a.options["layer"],
                                        alpha=float(a.options["alpha"]), target=a.options.get("target",
                                                                                              "mlp_out")))
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
    return bool(data and (data.get("recipe") or {}).get("fingerprint") == a.fingerprint and a.output.is_file()
                and manifest.sha256_file(a.output) == data["outputs"].get(a.output.name))


def run_action(a: Action, plan: ModelPlan, recipe_file: str) -> str:
    """Execute one action (its output is written atomically); returns a one-line summary."""
    import time

    from patcher.io import manifest
    from patcher.edit.apply import execute
    from patcher.model.opened import Model
    from patcher.edit.plan import parse_layers, plan_ablation, plan_injection
    info = {"file": recipe_file, "step": a.step.index, "fingerprint": a.fingerprint, "model": plan.name}
    t0 = time.perf_counter()
    o = a.options
    if a.op == "extract":
        from patcher.edit.extract import extract
        r = extract(a.input, o["positive"], o["negative"], positions=tuple(o.get("positions", [-1])),
                    batch_size=int(o.get("batch_size", 8)), max_prompts=o.get("max_prompts"),
                    layers=o.get("layers"),
                    chat_template=bool(o.get("chat_template", True)), system=o.get("system"),
                    project_out_negative_mean=bool(o.get("project_out_negative_mean", False)),
                    arch_table=plan.arch_table)
        a.output.parent.mkdir(parents=True, exist_ok=True)
        r.save(a.output)
        manifest.write_file(_manifest_path(a), kind="extract", command=None, recipe=info,
                            inputs={p.name: manifest.sha256_file(p) for p in (o["positive"], o["negative"])},
                            outputs={a.output.name: manifest.sha256_file(a.output)},
                            timings={"seconds": round(time.perf_counter() - t0, 3)})
        return f"selected layer {r.selected_layer}"
    if a.op in ("ablate", "inject"):
        with Model.open(a.input, plan.arch_table) as ck:
            res = ck.resolved
            d = _directions(o["directions"], res.d_model)
            if a.op == "ablate":
                p = plan_ablation(ck, d, layers=parse_layers(o.get("layers"), res.n_layers),
                                  roles=tuple(o.get("targets") or ("embed", "attn_out", "mlp_out")),
                                  scale=o["strengths"], preserve=o.get("norm_preserve"),
                                  untie=bool(o.get("untie_embeddings")))
            else:
                p = plan_injection(ck, d, layer=int(o["layer"]), alpha=float(o["alpha"]),
                                   target=o.get("target", "mlp_out"))
            rep = execute(p, a.output, force=True, command=None, recipe=info)
        return f"{len(p.edits)} edited, {len(p.new)} added" + (f", leakage {rep.overall_leakage():.2e}"
                                                               if rep.leakage else "")
    if a.op == "export":
        from patcher.onnx.export import export
        export(a.input, a.output, dtype=o.get("dtype", "fp32"), force=True, recipe=info,
               arch_table=plan.arch_table)
        return f"{o.get('dtype', 'fp32')} export"
    if a.op == "verify":
        from patcher.edit.directions import load_direction
        from patcher.onnx.verify import verify
        d = load_direction(o["directions"][0], plan.d_model) if o.get("directions") else None
        rep = verify(a.input, o["reference"], dtype=o.get("dtype", "fp32"), prompts=o.get("prompts"),
                     direction=d,
                     tokens=int(o.get("tokens", 8)), arch_table=plan.arch_table)
        a.output.write_text(json.dumps(rep.as_dict(), indent=2) + "\n")
        manifest.write_file(_manifest_path(a), kind="verify", command=None, recipe=info, inputs={},
                            outputs={a.output.name: manifest.sha256_file(a.output)})
        if not rep.parity_ok:
            raise PatcherError(a.output, f"parity failed: max |Δ logits| {rep.max_abs_diff:.3g}")
        return f"parity {rep.max_abs_diff:.2e}, greedy match {rep.generation_match:.0%}"
    raise AssertionError(a.op)


def run_model(plan: ModelPlan, recipe_file: str) -> list[tuple[int, str, str]]:
    """All actions of one model, in order, skipping those already complete (by manifest)."""
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
