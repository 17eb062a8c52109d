"""`patcher search`: a multi-objective search over ablations (refusal likelihood or marker rate vs
KL), trials evaluated in the forward pass, study in SQLite; `patcher ablate --from-study` writes a
chosen trial."""

from pathlib import Path
from types import SimpleNamespace

import typer

from patcher.cli.common import ARCH_TABLE_HELP, err, guard, out
from patcher.errors import PatcherError


def _space_table(space: dict):
    from rich.table import Table

    t = Table(
        title="search space (narrow with --space NAME=LOW:HIGH | NAME=A,B | NAME=VALUE, or \\[search.space])",
        title_justify="left",
    )
    for c in ("parameter", "range / choices", "only when", "meaning"):
        t.add_column(c, overflow="fold")
    for p in space.values():
        t.add_row(p.name, p.describe(), f"{p.when[0]} = {p.when[1]}" if p.when else "", p.help)
    return t


def _front_table(front, title: str, rates: dict | None = None):
    """The front's rows; `rates` (trial -> marker rate) when the search minimised the likelihood."""
    from rich.table import Table

    from patcher.search.report import params_text
    from patcher.search.space import complete

    t = Table(title=title, title_justify="left")
    first_col = ["refusal likelihood", "marker rate"] if rates is not None else ["marker rate"]
    for c in ("trial", *first_col, "KL", "first-token KL", "parameters"):
        t.add_column(c, justify="right" if c != "parameters" else "left", overflow="fold")
    for tr, fixed in front:
        first = tr.user_attrs.get("first_token_kl")
        measured = [] if rates is None else [f"{rates[tr.number]:.3f}"]
        t.add_row(
            str(tr.number),
            f"{tr.values[0]:.3f}",
            *measured,
            f"{tr.values[1]:.4g}",
            "" if first is None else f"{first:.4g}",
            params_text(complete(tr.params, fixed)),
        )
    return t


def register(app) -> None:
    @app.command()
    def search(
        model: Path = typer.Argument(..., help="Model folder"),
        positive: Path = typer.Option(
            ..., "--positive", help="Prompts that show the behaviour (for the directions)"
        ),
        negative: Path = typer.Option(..., "--negative", help="Contrast prompts (for the directions)"),
        eval_positive: Path | None = typer.Option(
            None,
            "--eval-positive",
            help="Prompts the marker rate is measured on (default: --positive; "
            "better: prompts extraction never saw)",
        ),
        eval_negative: Path | None = typer.Option(
            None, "--eval-negative", help="Prompts the KL is measured on (default: --negative)"
        ),
        directions: Path | None = typer.Option(
            None,
            "--directions",
            help="Directions from `patcher extract` (default: extracted now, saved beside the study)",
        ),
        trials: int = typer.Option(
            200, "--trials", min=1, help="Trials the study should hold (completed or pruned)"
        ),
        startup: int | None = typer.Option(
            None,
            "--startup",
            min=0,
            help="Random start-up trials before TPE (default: 30 % of --trials, at most 60)",
        ),
        timeout: float | None = typer.Option(None, "--timeout", min=0, help="Stop after MIN minutes"),
        study_file: Path = typer.Option(Path("search.db"), "--study", help="SQLite study (again: resumes)"),
        jobs: int = typer.Option(1, "--jobs", min=1, help="Trials in parallel (threads)"),
        engine: str = typer.Option("numpy", "--engine", help="numpy | onnx: where trials run"),
        provider: str = typer.Option("cpu", "--provider", help="cpu | cuda (onnx engine)"),
        engine_dtype: str = typer.Option(
            "fp32",
            "--engine-dtype",
            help="onnx engine weights: fp32 | int4 | int8, rounded as `patcher export --dtype` rounds them "
            "(int4: ~0.6 byte per parameter; trials score edits of the quantized model)",
        ),
        tokens: int = typer.Option(64, "--tokens", min=1, help="Greedy tokens per eval-positive completion"),
        kl_tokens: int = typer.Option(
            1,
            "--kl-tokens",
            min=1,
            help="KL over the first K positions of the original's greedy completion (1: first-token KL)",
        ),
        negative_markers: bool = typer.Option(
            False,
            "--negative-markers",
            help="Also generate on eval-negative prompts; trials that raise their marker rate are infeasible",
        ),
        markers: Path | None = typer.Option(None, "--markers", help="Extra markers, one per line"),
        replace_markers: bool = typer.Option(
            False, "--replace-markers", help="Use only the --markers file's list"
        ),
        space_items: list[str] | None = typer.Option(None, "--space", help="Narrow a parameter (repeatable)"),
        config: Path | None = typer.Option(None, "--config", help="TOML file with a [search.space] table"),
        show_space: bool = typer.Option(False, "--show-space", help="Print the search space and exit"),
        plot: Path | None = typer.Option(
            None, "--plot", help="SVG of all trials and the front (default: STUDY.svg)"
        ),
        batch_size: int = typer.Option(64, "--batch-size", min=1),
        max_prompts: int | None = typer.Option(
            None, "--max-prompts", min=1, help="Use the first N of each file"
        ),
        no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Tokenize raw prompts"),
        system: str | None = typer.Option(None, "--system", help="System prompt for the chat template"),
        untie: bool = typer.Option(
            False, "--untie-embeddings", help="Embedding edits keep the original unembedding"
        ),
        project_out_negative_mean: bool = typer.Option(
            True,
            "--project-out-negative-mean/--no-project-out-negative-mean",
            help="Extracted directions orthogonal to the negative mean (as the peer makes them; less KL "
            "at the same refusals on SmolLM2 and Qwen2.5-Coder-0.5B)",
        ),
        refused_only: bool = typer.Option(
            True,
            "--refused-only/--all-positives",
            help="Extract directions from the --positive prompts the original refuses (its greedy "
            "--tokens completion hits a marker), when at least 16 are; the mean over prompts it answers "
            "carries their topic, not the refusal",
        ),
        heuristic: bool = typer.Option(
            True,
            "--heuristic/--no-heuristic",
            help="Also evaluate patcher's default pipeline (selected layer, strength 1) for comparison",
        ),
        blas_threads: int | None = typer.Option(
            None,
            "--blas-threads",
            min=1,
            help="BLAS threads for the numpy engine (default: the usable cores / --jobs)",
        ),
        resident: str = typer.Option(
            "auto",
            "--resident",
            help="numpy engine weights: float32 (decoded once, fastest) | storage (bf16/fp16 as stored, "
            "converted per use: models larger than memory in float32) | auto (float32 if it takes at most "
            "half the available memory)",
        ),
        prune: bool = typer.Option(
            True,
            "--prune/--no-prune",
            help="Give up a trial as soon as its marker hits so far put it behind the Pareto front "
            "(it could not end on the front)",
        ),
        objective: str | None = typer.Option(
            None,
            "--objective",
            help="likelihood (default; a resumed study keeps its own): the edited model's probability of "
            "the original's refusal openings (no generation per trial; carries better to prompts the "
            "search never saw; the front's marker rates are measured at the end) | markers: the greedy "
            "completions' marker rate",
        ),
        seed: int = typer.Option(0, "--seed"),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
        judge: Path | None = typer.Option(
            None,
            "--judge",
            help="A local chat model (folder) that judges each eval-positive completion: refusal or not "
            "(its P(Yes) to 'does the reply do what the request asks?' against a canned refusal and the "
            "request echoed as done); its rate is shown beside the marker rate",
        ),
        winsorize: float | None = typer.Option(
            None,
            "--winsorize",
            help="Extracted directions from winsorized activations (see patcher extract --winsorize)",
        ),
    ):
        """Search ablations for the best trade-off: refusal (the likelihood of the original's refusal
        openings, or greedy completions' marker rate) vs KL from the original."""
        a = SimpleNamespace(**locals())
        guard(lambda: _search(a))


def _search(a) -> None:
    """Check every value, set up, run the study, report: `patcher search`'s four steps."""
    from threadpoolctl import threadpool_limits

    if a.show_space:
        return _show_space(a)
    _validate(a)
    with threadpool_limits(limits=a.blas_threads or blas_threads_for(a.jobs), user_api="blas"):
        s = _setup(a)
        study, extra, t0 = _start(a, s)
        outcome = _run(a, s, study)
        _report(a, s, study, outcome, extra, t0)


def blas_threads_for(jobs: int) -> int:
    """The cores this process may use, shared by the parallel trials (threads x BLAS threads <= cores)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def _show_space(a) -> None:
    from patcher.model.execution import StreamedModel
    from patcher.model.opened import Model
    from patcher.search.run import build_space

    sm = StreamedModel(Model.open(a.model, a.arch_table))
    out.print(_space_table(build_space(sm.n_layers, a.config, a.space_items or [])))


def _validate(a) -> None:
    """Every option and output path, before any work (not after an 11 s extraction)."""
    from patcher.edit.extract import check_winsorize
    from patcher.io.paths import check_output
    from patcher.search import reference_cache
    from patcher.search import run as sr
    from patcher.search import study as st
    from patcher.search.objectives import DEFAULT_OBJECTIVE, check_objective

    if a.objective is not None:
        check_objective(a.objective)
    sr.check_engine(a.engine, a.provider, a.resident, a.engine_dtype)
    check_winsorize(a.winsorize)
    a.dirs_out = a.study_file.with_name(a.study_file.stem + ".directions.safetensors")
    a.given = a.directions if a.directions is not None else (a.dirs_out if a.dirs_out.is_file() else None)
    attrs = _check_study(st, a.study_file, a.model, a.given, a.arch_table)
    if a.objective is None:  # a study made before likelihood was the default resumes as it was made
        a.objective = st.objective_of(attrs) if attrs else DEFAULT_OBJECTIVE
    inputs = [a.model, a.positive, a.negative, a.eval_positive, a.eval_negative, a.directions, a.config]
    inputs.append(a.arch_table)
    a.plot = a.plot or a.study_file.with_suffix(".svg")
    a.reference = reference_cache.path_for(a.study_file)
    for path, option in ((a.plot, "--plot"), (a.reference, "--study")):
        # rewritten by every run of the study, never a user's file
        check_output(path, inputs, kind="file", option=option, replace_ok=True)


def _setup(a):
    from patcher.search import run as sr

    s = sr.setup(
        a.model,
        a.positive,
        a.negative,
        eval_positive=a.eval_positive,
        eval_negative=a.eval_negative,
        directions=a.given,
        directions_out=a.dirs_out,
        engine=a.engine,
        provider=a.provider,
        resident=a.resident,
        engine_dtype=a.engine_dtype,
        tokens=a.tokens,
        kl_tokens=a.kl_tokens,
        negative_markers=a.negative_markers,
        markers=a.markers,
        replace_markers=a.replace_markers,
        batch_size=a.batch_size,
        max_prompts=a.max_prompts,
        chat_template=not a.no_chat_template,
        system=a.system,
        untie=a.untie,
        space_items=a.space_items or [],
        space_toml=a.config,
        project_out_negative_mean=a.project_out_negative_mean,
        refused_only=a.refused_only,
        prune=a.prune,
        arch_table=a.arch_table,
        judge=a.judge,
        winsorize=a.winsorize,
        objective=a.objective,
        announce=lambda m: err.print(m),
    )
    out.print(_space_table(s.space))
    return s


def _start(a, s):
    """Open (or resume) the study; the original's reference (cached beside the study) and the
    default pipeline's point for comparison."""
    import time

    from patcher.search import run as sr
    from patcher.search import study as st

    n_start = a.startup if a.startup is not None else min(60, max(1, int(0.3 * a.trials)))
    study = st.open_study(a.study_file, s.attrs, seed=a.seed, startup=n_start)
    if a.eval_positive is None or a.eval_negative is None:
        err.print(
            "[yellow]note:[/] evaluating on the extraction prompts; pass --eval-positive/--eval-negative "
            "with prompts extraction never saw to judge the edit fairly"
        )
    t0 = time.perf_counter()
    ref, cached = sr.reference(s, a.reference)
    how = f"loaded from {a.reference.name}" if cached else f"computed in {ref['seconds']:.1f} s"
    out.print(
        f"original: marker rate {ref['marker_rate']:.3f} on {len(s.evaluator.positive)} prompts "
        f"({a.tokens} tokens); reference {how}"
        + ("" if ref.get("judge_rate") is None else f"; judge's refusal rate {ref['judge_rate']:.3f}")
        + ("" if ref.get("likelihood") is None else f"; refusal likelihood {ref['likelihood']:.3f}")
    )
    if ref[s.metric] == 0:
        err.print(
            f"[yellow]note:[/] the original's {st.LABELS[s.metric]} is 0 on {a.eval_positive or a.positive}: "
            "nothing for the search to lower (every trial ties; only the KL orders them)"
        )
    extra = {"original": (ref[s.metric], 0.0)}
    if a.heuristic and s.selected is not None:
        h = s.evaluate(sr.heuristic_params(int(s.selected), s.n_layers), markers=True)
        extra[f"default pipeline (layer {s.selected})"] = (getattr(h, s.metric), h.kl)
        study.set_user_attr("heuristic", {"layer": int(s.selected), "marker_rate": h.marker_rate, "kl": h.kl})
        out.print(
            f"default pipeline (extract-selected layer {s.selected}, strength 1, all writers): "
            f"marker rate {h.marker_rate:.3f}, KL {h.kl:.4g}"
        )
    return study, extra, t0


def _run(a, s, study):
    from patcher.search import space as sp
    from patcher.search import study as st
    from patcher.search.report import params_text

    def on_trial(t):
        gave_up = t.user_attrs.get("pruned")
        if t.values is None and gave_up:
            metric = s.metric
            err.print(
                f"trial {t.number}: pruned ({st.LABELS[metric]} >= {gave_up[f'{metric}_at_least']:.3f} "
                f"at KL {gave_up['kl']:.4g}: behind the front) "
                f"{params_text(sp.complete(t.params, s.attrs['fixed']))}",
                highlight=False,
            )
        if t.values is None:
            return
        judged = t.user_attrs.get("judge_rate")
        err.print(
            f"trial {t.number}: {st.LABELS[s.metric]} {t.values[0]:.3f}, "
            + ("" if judged is None else f"judge {judged:.3f}, ")
            + f"KL {t.values[1]:.4g} "
            f"({t.user_attrs.get('seconds_generate', 0):.1f} s "
            + ("generate" if s.metric == "marker_rate" else "openings")
            + ", "
            f"{t.user_attrs.get('seconds_kl', 0):.1f} s KL) "
            f"{params_text(sp.complete(t.params, s.attrs['fixed']))}",
            highlight=False,
        )

    return st.optimize(study, s.run_trial, a.trials, a.timeout * 60 if a.timeout else None, a.jobs, on_trial)


def _report(a, s, study, outcome, extra, t0) -> None:
    import time

    from patcher.search import study as st
    from patcher.search.report import write_plot

    seconds = time.perf_counter() - t0
    done = st.completed(study)
    front = st.pareto(done)
    pruned = len(st.pruned_trials(study))
    out.print(
        _front_table(
            [(t, s.attrs["fixed"]) for t in front],
            f"Pareto front: {len(front)} of {len(done)} completed trials"
            + (f" ({pruned} more pruned)" if pruned else "")
            + f" ({outcome.ran} this run, {seconds:.0f} s) — study {a.study_file}",
            _front_rates(s, study, front) if s.metric != "marker_rate" else None,
        )
    )
    write_plot(
        a.plot,
        [(t.number, t.values[0], t.values[1]) for t in done],
        [(t.number, t.values[0], t.values[1]) for t in front],
        f"{Path(a.model).name}: search trials",
        extra,
        st.LABELS[s.metric],
    )
    out.print(f"plot: {a.plot}")
    if front:
        out.print(
            f"write a trial: patcher ablate {a.model} --from-study {a.study_file} "
            f"--trial {front[0].number} -o OUT"
        )
    if outcome.interrupted:
        err.print("[bold red]interrupted:[/] completed trials are kept in the study; run again to resume")
        raise typer.Exit(130)


def _front_rates(s, study, front) -> dict:
    """The marker rate of each front trial, generated once and kept in the study (`front_marker_rates`;
    with --judge, the judge's rate too: `front_judge_rates`): a search that minimised the likelihood
    never generated completions for its trials."""
    from patcher.search import space as sp

    kept = {key: dict(study.user_attrs.get(key, {})) for key in ("front_marker_rates", "front_judge_rates")}
    todo = [t for t in front if str(t.number) not in kept["front_marker_rates"]]
    if todo:
        err.print(f"measuring the marker rate of {len(todo)} front trial(s)")
    for t in todo:
        r = s.evaluate(sp.complete(t.params, s.attrs["fixed"]), markers=True)
        kept["front_marker_rates"][str(t.number)] = r.marker_rate
        if r.judge_rate is not None:
            kept["front_judge_rates"][str(t.number)] = r.judge_rate
            err.print(f"trial {t.number}: marker rate {r.marker_rate:.3f}, judge {r.judge_rate:.3f}")
        for key, values in kept.items():
            if values:
                study.set_user_attr(key, values)
    return {int(k): v for k, v in kept["front_marker_rates"].items()}


def _check_study(st, study_file: Path, model, directions: Path | None, arch_table: Path | None) -> dict:
    """A study file that exists is readable, patcher's, and was searched on this model (and with these
    directions, when they are known before extraction): checked before any work. Its recorded settings
    ({} for a new study)."""
    from patcher.io.manifest import folder_identity, sha256_file
    from patcher.model.opened import Model

    with Model.open(model, arch_table) as m:
        identity = folder_identity(m.folder)
    attrs = st.check_study_file(study_file, model_identity=identity)
    if attrs and directions is not None and Path(directions).is_file():
        if sha256_file(directions) != attrs.get("directions_sha256"):
            raise PatcherError(
                study_file,
                f"was searched with other directions than {directions} (sha256 differs): "
                "choose a new --study file, or give the study's directions",
            )
    return attrs or {}
