"""A search from files to a study: directions (extracted or given), prompts, the engine, the
evaluator, and the Optuna loop. Also the way back: a stored trial -> its Plan (`--from-study`)."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patcher.edit.directions import read_metadata
from patcher.errors import PatcherError
from patcher.io.checkpoint import Checkpoint
from patcher.io.manifest import folder_identity, sha256_file
from patcher.io.storage import Storage
from patcher.model.architectures import Resolved
from patcher.model.execution import StreamedModel
from patcher.model.opened import Model
from patcher.model.prompts import check_lengths, encode_prompts, read_prompt_file
from patcher.search import reference_cache as ref_cache
from patcher.search import space as sp
from patcher.search import study as st
from patcher.search.objectives import DEFAULT_OBJECTIVE, Evaluator, Hopeless, Result, load_markers
from patcher.search.plan import build_plan

if TYPE_CHECKING:  # the engines import their runtimes (numpy kernels, onnxruntime) only when chosen
    from patcher.search.engine import ResidentModel
    from patcher.search.onnx_engine import OnnxEngine

ENGINES = ("numpy", "onnx")
MIN_REFUSED = 16  # fewer refused training prompts: the directions come from all of them
DEFAULT_ENGINE = "numpy"


def load_table(path: Path, n_layers: int, d_model: int) -> tuple[np.ndarray, dict]:
    """The directions file's [L+1, d] table and metadata."""
    if not Path(path).is_file():
        raise PatcherError(path, "no such directions file")
    with Checkpoint(path) as ck:
        if "direction" not in ck.tensors:
            raise PatcherError(path, "no 'direction' tensor: not a `patcher extract` directions file")
        table = np.array(ck.array("direction"), dtype=np.float64)
        meta = read_metadata(ck)
    if table.shape != (n_layers + 1, d_model):
        raise PatcherError(
            path, f"'direction' is {list(table.shape)}; this model needs [{n_layers + 1}, {d_model}]"
        )
    return table, meta


def heuristic_params(selected: int, n_layers: int) -> dict:
    """patcher's default pipeline as a point of the same space: the extract-selected row, every
    writer at strength 1, embeddings included (`patcher ablate -d DIRS` with its defaults)."""
    p = {
        "direction_scope": "global",
        "direction_index": float(selected),
        "embed": True,
        "embed_strength": 1.0,
        "norm_preserve": "none",
    }
    for c in sp.COMPONENTS:
        p.update({f"{c}_peak": 1.0, f"{c}_center": 0.0, f"{c}_min_frac": 1.0, f"{c}_width": float(n_layers)})
    return p


@dataclass
class Setup:
    ck: Model
    resolved: Resolved
    engine: "ResidentModel | OnnxEngine"
    evaluator: Evaluator
    table: np.ndarray
    directions: Path
    space: dict
    selected: int | None
    untie: bool = False
    attrs: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    prune: bool = True
    reference_key: str = ""

    @property
    def n_layers(self) -> int:
        return self.resolved.n_layers

    def evaluate(self, params: dict, keep_texts: bool = False, prune=None, markers=None) -> Result:
        spec = sp.edit_spec(params, self.table, self.n_layers, self.directions)
        plan = build_plan(self.ck, self.resolved, spec, str(self.directions), self.untie)
        return self.evaluator.evaluate(self.engine.edits(plan), keep_texts, prune, markers)

    def run_trial(self, trial) -> tuple[float, float]:
        params = sp.sample(trial, self.space)
        front = [t.values for t in st.pareto(st.completed(trial.study))] if self.prune else []
        base = self.evaluator.reference()[self.metric]
        if self.prune and base > 0:  # the original itself: refusing as often is no use at any KL
            front.append((base, 0.0))
        try:
            r = self.evaluate(params, prune=beyond_front(front) if front else None)
        except Hopeless as h:
            trial.set_user_attr("first_token_kl", h.first_token_kl)
            trial.set_user_attr("pruned", {f"{self.metric}_at_least": h.rate, "kl": h.kl, "rows": h.rows})
            raise st.pruned() from None
        trial.set_user_attr("first_token_kl", r.first_token_kl)
        trial.set_user_attr("seconds_generate", round(r.timing.generate, 3))
        trial.set_user_attr("seconds_kl", round(r.timing.kl, 3))
        trial.set_user_attr("tokens_generated", r.tokens_generated)
        if r.judge_rate is not None:
            trial.set_user_attr("judge_rate", r.judge_rate)
        if r.negative_marker_rate is not None:
            trial.set_user_attr("negative_marker_rate", r.negative_marker_rate)
            base = self.evaluator.reference()["negative_marker_rate"]
            trial.set_user_attr("constraint", [r.negative_marker_rate - base])
            if hasattr(trial, "set_constraint"):
                trial.set_constraint("negative_marker_rate", r.negative_marker_rate - base)
        return getattr(r, self.metric), r.kl

    @property
    def metric(self) -> str:
        """The Result field the search minimises beside the KL."""
        return st.metric_names(self.evaluator.objective)[0]


def beyond_front(front: list) -> Callable[[float, float], bool]:
    """prune(rate_lower_bound, kl) for a trial whose KL is known and whose marker rate is at least the
    bound: True when a front point (rate f, KL g) dominates every value the trial can still end with:
    f <= bound and g <= kl, one of them strictly (equal values would tie, not dominate, and a tie stays
    on the front). The trial's final rate only grows from the bound, so it ends dominated: never on
    the front. Feasible front points only (st.pareto), so an infeasible point never prunes."""

    def prune(rate: float, kl: float) -> bool:
        return any(f <= rate and g <= kl and (f < rate or g < kl) for f, g in front)

    return prune


def check_engine(engine: str, provider: str, resident: str, dtype: str = "fp32") -> None:
    """--engine, --provider, --resident and --engine-dtype, before any work: one line naming what is
    wrong."""
    from patcher.onnx.runtime import PROVIDERS, available_providers
    from patcher.search.engine import RESIDENT
    from patcher.search.onnx_engine import check_dtype

    if engine not in ENGINES:
        raise PatcherError("--engine", f"must be one of {', '.join(ENGINES)}")
    if provider not in PROVIDERS:
        raise PatcherError("--provider", f"must be one of {', '.join(PROVIDERS)}")
    if engine == "numpy" and provider != "cpu":
        raise PatcherError("--provider", "the numpy engine runs on the CPU; use --engine onnx for cuda")
    if engine == "onnx" and provider not in available_providers():
        raise PatcherError(
            "--provider",
            f"{provider} is not available in this onnxruntime "
            f"(available: {', '.join(available_providers())}; cuda needs onnxruntime-gpu and a GPU)",
        )
    if resident not in RESIDENT:
        raise PatcherError("--resident", f"must be one of {', '.join(RESIDENT)}")
    check_dtype(dtype)
    if engine == "numpy" and dtype != "fp32":
        raise PatcherError(
            "--engine-dtype", f"{dtype} weights run on the onnx engine only (add --engine onnx)"
        )


def make_engine(
    kind: str,
    sm: StreamedModel,
    provider: str = "cpu",
    announce=None,
    resident: str = "auto",
    dtype: str = "fp32",
) -> "ResidentModel | OnnxEngine":
    check_engine(kind, provider, resident, dtype)
    if kind == "numpy":
        from patcher.search.engine import ResidentModel

        return ResidentModel(sm, resident)
    if kind == "onnx":
        from patcher.search.onnx_engine import OnnxEngine

        return OnnxEngine(sm, provider, announce, dtype)
    raise PatcherError("--engine", f"must be one of {', '.join(ENGINES)}")


def _prompts(tok, path, limit, chat_template, system):
    texts = read_prompt_file(path, limit)
    return encode_prompts(tok, texts, chat_template=chat_template, system=system)


def build_space(n_layers: int, space_toml: Path | None, space_items=()) -> dict:
    """The default space for this depth, narrowed by the TOML file, then by --space items."""
    space = sp.default_space(n_layers)
    if space_toml is not None:
        sp.apply_toml(space, sp.load_toml(space_toml), space_toml)
    sp.parse_cli(space, list(space_items))
    return space


def _refused(ev: Evaluator, texts: list[str], encoded, source: Path, seconds: dict, announce):
    """The filter's record and the positive training prompts the original refuses (greedy, --tokens,
    a marker hit); the record says they are not used when fewer than MIN_REFUSED are: a mean over so
    few prompts is mostly noise, all of them are used then.
    Why: a model refuses only part of a harmful set (Qwen2.5-Coder-0.5B a third); the mean over the
    prompts it answers carries the topic, not the refusal (measured in BENCHMARKS.md)."""
    if announce:
        announce(
            f"the original's replies ({ev.tokens} tokens) to {len(texts)} prompts of {source.name}: which "
            "does it refuse? (--all-positives skips this)"
        )
    t0 = time.perf_counter()
    flags = ev.refusing(encoded)
    seconds["refused_only"] = round(time.perf_counter() - t0, 3)
    kept = [t for t, f in zip(texts, flags) if f]
    enough = len(kept) >= MIN_REFUSED
    if announce:
        use = f"directions from those {len(kept)}" if enough else f"directions from all {len(texts)}"
        announce(f"the original refuses {len(kept)} of {len(texts)} prompts of {source.name}: {use}")
    return {"kept": len(kept), "of": len(texts), "tokens": ev.tokens, "used": enough}, kept


def _extracted(ck, positive, negative, directions_out, seconds: dict, announce, refused, **options) -> Path:
    """Directions extracted from the training prompts, saved to `directions_out`; `refused`, when
    given, is _refused's (record, kept prompts): the kept prompts replace the positive file when the
    record says they are used, and the record goes into the metadata."""
    from patcher.edit.extract import extract

    t0 = time.perf_counter()
    if announce:
        announce(f"extracting directions from {positive.name} / {negative.name}")
    record, kept = refused or (None, None)
    result = extract(ck, kept if record and record["used"] else positive, negative, **options)
    if record is not None:
        result.metadata["refused_only"] = record
    result.save(directions_out)
    seconds["extract"] = round(time.perf_counter() - t0, 3)
    return directions_out


def setup(
    model: Path,
    positive: Path,
    negative: Path,
    *,
    eval_positive: Path | None = None,
    eval_negative: Path | None = None,
    directions: Path | None = None,
    directions_out: Path | None = None,
    engine: str = DEFAULT_ENGINE,
    provider: str = "cpu",
    resident: str = "auto",
    engine_dtype: str = "fp32",
    tokens: int = 64,
    kl_tokens: int = 1,
    negative_markers: bool = False,
    markers: Path | None = None,
    replace_markers: bool = False,
    batch_size: int = 64,
    max_prompts: int | None = None,
    chat_template: bool = True,
    system: str | None = None,
    untie: bool = False,
    space_items=(),
    space_toml: Path | None = None,
    project_out_negative_mean: bool = False,
    arch_table: Path | None = None,
    prune: bool = True,
    announce=None,
    judge: Path | None = None,
    winsorize: float | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    refused_only: bool = True,
) -> Setup:
    """Model, space, directions (extracted when not given), prompts, engine and evaluator of a search."""
    from patcher.onnx.verify import stop_tokens

    seconds: dict = {}
    ck = Model.open(model, arch_table)  # a folder, file or hub repo id; its table, if given
    sm = StreamedModel(ck)
    space = build_space(sm.n_layers, space_toml, space_items)
    # every input is read and checked before the extraction's work: eval prompts, their lengths, the judge
    tok = ck.tokenizer()
    ep = _prompts(tok, eval_positive or positive, max_prompts, chat_template, system)
    en = _prompts(tok, eval_negative or negative, max_prompts, chat_template, system)
    negative_extra = max(tokens if negative_markers else 0, kl_tokens)
    for toks, path, extra in (
        (ep, eval_positive or positive, tokens),
        (en, eval_negative or negative, negative_extra),
    ):
        check_lengths(toks, ck.config, path, extra=extra, heads=sm.hp.n_heads, batch_size=batch_size)
    if directions is None and directions_out is None:
        raise PatcherError("--directions", "give a directions file or a place to write the extracted one")
    train_texts = read_prompt_file(positive, max_prompts) if directions is None and refused_only else None
    if train_texts is not None:  # generated on to find the refused ones: they need the same room
        train = encode_prompts(tok, train_texts, chat_template=chat_template, system=system)
        check_lengths(train, ck.config, positive, extra=tokens, heads=sm.hp.n_heads, batch_size=batch_size)
    from patcher.search.judge import Judge

    judged, requests = None, None
    if judge is not None:
        judged, requests = Judge.open(judge), read_prompt_file(eval_positive or positive, max_prompts)
        judged.check(requests)
    t0 = time.perf_counter()
    eng = make_engine(engine, sm, provider, announce, resident, engine_dtype)
    seconds["load"] = round(time.perf_counter() - t0, 3)
    eos = stop_tokens(ck.folder, tok)
    ev = Evaluator(
        eng,
        tok,
        ep,
        en,
        markers=load_markers(markers, replace_markers),
        tokens=tokens,
        kl_tokens=kl_tokens,
        negative_markers=negative_markers,
        eos=eos,
        batch_size=batch_size,
        judge=judged,
        requests=requests,
        objective=objective,
    )
    if directions is None:
        refused = (
            None if train_texts is None else _refused(ev, train_texts, train, positive, seconds, announce)
        )
        directions = _extracted(
            ck,
            positive,
            negative,
            directions_out,
            seconds,
            announce,
            refused,
            max_prompts=max_prompts,
            chat_template=chat_template,
            system=system,
            project_out_negative_mean=project_out_negative_mean,
            winsorize=winsorize,
        )
    table, meta = load_table(directions, sm.n_layers, sm.hp.d_model)
    # a quantized engine scores edits of another model: its study and reference are its own
    label = engine if engine_dtype == "fp32" else f"{engine}-{engine_dtype}"
    evaluation = _evaluation(
        ev, eval_positive or positive, eval_negative or negative, max_prompts, chat_template, system, label
    )
    evaluation["judge"] = None if judge is None else str(Path(judge).resolve())
    attrs = st.base_attrs(
        model=str(Path(model).resolve()),
        model_identity=folder_identity(ck.folder),
        directions=str(Path(directions).resolve()),
        directions_sha256=sha256_file(directions),
        selected_layer=meta.get("selected_layer"),
        space={k: p.as_dict() for k, p in space.items()},
        fixed={p.name: p.fixed for p in space.values() if p.fixed is not None},
        untie_embeddings=untie,
        evaluation=evaluation,
    )
    # what the original's completions and log-probs depend on: model, prompts as token ids, settings
    key = ref_cache.key(
        attrs["model_identity"], evaluation, ep, en, sorted(set(eos)), batch_size, provider, tok.pad_id
    )
    return Setup(
        ck,
        sm.resolved,
        eng,
        ev,
        table,
        Path(directions),
        space,
        meta.get("selected_layer"),
        untie,
        attrs,
        seconds,
        prune,
        key,
    )


def _evaluation(ev: Evaluator, positive: Path, negative: Path, max_prompts, chat_template, system, engine):
    """The evaluation settings a study records (a resumed study must match them)."""
    return {
        "positive": sha256_file(positive),
        "negative": sha256_file(negative),
        "counts": [len(ev.positive), len(ev.negative)],
        "tokens": ev.tokens,
        "kl_tokens": ev.kl_tokens,
        "negative_markers": ev.negative_markers,
        "markers": list(ev.markers),
        "max_prompts": max_prompts,
        "chat_template": chat_template,
        "system": system,
        "engine": engine,
        # only when not the default: studies written before the option resume unchanged
        **({} if ev.objective == "markers" else {"objective": ev.objective}),
    }


def reference(s: Setup, cache: Path | None) -> tuple[dict, bool]:
    """The original model's completions and log-probs: from the cache file beside the study when it
    was made for the same key (True), else computed (False) and written there."""
    ref = ref_cache.load(cache, s.reference_key) if cache is not None else None
    if ref is not None:
        s.evaluator.use_reference(ref)
        return s.evaluator.reference(), True
    ref = s.evaluator.reference()
    if cache is not None:
        ref_cache.save(cache, s.reference_key, ref)
    return ref, False


def trial_params(study, number: int, path: Path) -> tuple[dict, dict]:
    """A completed trial's full parameters (free + fixed) and the study's attributes."""
    attrs = st.study_attrs(study, path)
    trials = {t.number: t for t in st.completed(study)}
    if number not in trials:
        raise PatcherError(
            "--trial",
            f"trial {number} is not a completed trial of this study "
            f"(completed: {len(trials)}; see the Pareto table of `patcher search`)",
        )
    return sp.complete(trials[number].params, attrs.get("fixed", {})), attrs


def plan_from_study(
    ck: Model | Storage, resolved: Resolved, study_path: Path, number: int, directions: Path | None = None
):
    """The Plan that writes trial `number` of the study as a checkpoint; its record names the study,
    the trial, the study digest and the directions file."""
    study = st.open_study(study_path, None, create=False)
    params, attrs = trial_params(study, number, study_path)
    dpath = Path(directions or attrs["directions"])
    if not dpath.is_file():
        raise PatcherError(dpath, "the study's directions file is missing; pass it with -d/--direction")
    sha = sha256_file(dpath)
    if sha != attrs.get("directions_sha256"):
        raise PatcherError(
            dpath, "this directions file is not the one the study searched with (sha256 differs)"
        )
    if folder_identity(ck.folder) != attrs.get("model_identity"):  # trials were measured on that model
        raise PatcherError(
            ck.folder,
            f"is not the model this study searched ({attrs.get('model')}; path, "
            "file sizes or times differ): run `patcher search` on this model",
        )
    table, _ = load_table(dpath, resolved.n_layers, resolved.d_model)
    spec = sp.edit_spec(params, table, resolved.n_layers, dpath)
    values = next(t.values for t in st.completed(study) if t.number == number)
    record = {
        "direction_sha256": sha,
        "search": {
            "study": str(Path(study_path).resolve()),
            "study_sha256": st.digest(study),
            "trial": number,
            "params": params,
            st.metric_names(st.objective_of(attrs))[0]: values[0],
            "kl": values[1],
        },
    }
    return build_plan(ck, resolved, spec, str(dpath), bool(attrs.get("untie_embeddings")), record)
