"""`patcher search`: a multi-objective search over ablations (marker rate vs KL), trials evaluated
in the forward pass, study in SQLite; `patcher ablate --from-study` writes a chosen trial."""

from pathlib import Path

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


def _front_table(front, title: str):
    from rich.table import Table

    from patcher.search.report import params_text
    from patcher.search.space import complete

    t = Table(title=title, title_justify="left")
    for c in ("trial", "marker rate", "KL", "first-token KL", "parameters"):
        t.add_column(c, justify="right" if c != "parameters" else "left", overflow="fold")
    for tr, fixed in front:
        first = tr.user_attrs.get("first_token_kl")
        t.add_row(
            str(tr.number),
            f"{tr.values[0]:.3f}",
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
        trials: int = typer.Option(200, "--trials", min=1, help="Completed trials the study should hold"),
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
            False,
            "--project-out-negative-mean",
            help="Extracted directions orthogonal to the negative mean (as the peer makes them)",
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
            help="BLAS threads for the numpy engine (default: the library's; 1 is fastest for small models "
            "and on busy machines)",
        ),
        seed: int = typer.Option(0, "--seed"),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
    ):
        """Search ablations for the best trade-off: marker rate of greedy completions vs KL from the
        original."""

        def body():
            if blas_threads is None:
                return run()
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=blas_threads, user_api="blas"):
                return run()

        def run():
            import time

            from patcher.search import run as sr
            from patcher.search import space as sp
            from patcher.search import study as st
            from patcher.search.report import params_text, write_plot

            if show_space:
                from patcher.model.execution import StreamedModel
                from patcher.model.opened import Model

                sm = StreamedModel(Model.open(model, arch_table))
                space = sp.default_space(sm.n_layers)
                if config:
                    sp.apply_toml(space, sp.load_toml(config), config)
                sp.parse_cli(space, list(space_items or []))
                out.print(_space_table(space))
                return
            if engine not in sr.ENGINES:
                raise PatcherError("--engine", f"must be one of {', '.join(sr.ENGINES)}")
            dirs_out = study_file.with_name(study_file.stem + ".directions.safetensors")
            given = directions if directions is not None else (dirs_out if dirs_out.is_file() else None)
            _check_study(st, study_file, model, given, arch_table)  # before the extraction, not 11 s later
            from patcher.io.paths import check_output

            inputs = [model, positive, negative, eval_positive, eval_negative, directions, config, arch_table]
            check_output(
                plot or study_file.with_suffix(".svg"), inputs, kind="file", option="--plot", replace_ok=True
            )  # rewritten by every run of the study, never a user's file
            s = sr.setup(
                model,
                positive,
                negative,
                eval_positive=eval_positive,
                eval_negative=eval_negative,
                directions=given,
                directions_out=dirs_out,
                engine=engine,
                provider=provider,
                tokens=tokens,
                kl_tokens=kl_tokens,
                negative_markers=negative_markers,
                markers=markers,
                replace_markers=replace_markers,
                batch_size=batch_size,
                max_prompts=max_prompts,
                chat_template=not no_chat_template,
                system=system,
                untie=untie,
                space_items=space_items or [],
                space_toml=config,
                project_out_negative_mean=project_out_negative_mean,
                arch_table=arch_table,
                announce=lambda m: err.print(m),
            )
            out.print(_space_table(s.space))
            n_start = startup if startup is not None else min(60, max(1, int(0.3 * trials)))
            study = st.open_study(study_file, s.attrs, seed=seed, startup=n_start)
            if eval_positive is None or eval_negative is None:
                err.print(
                    "[yellow]note:[/] evaluating on the extraction prompts; pass "
                    "--eval-positive/--eval-negative "
                    "with prompts extraction never saw to judge the edit fairly"
                )
            t0 = time.perf_counter()
            ref = s.evaluator.reference()
            out.print(
                f"original: marker rate {ref['marker_rate']:.3f} on {len(s.evaluator.positive)} prompts "
                f"({tokens} tokens); reference computed in {ref['seconds']:.1f} s"
            )
            extra = {"original": (ref["marker_rate"], 0.0)}
            if heuristic and s.selected is not None:
                h = s.evaluate(sr.heuristic_params(int(s.selected), s.n_layers))
                extra[f"default pipeline (layer {s.selected})"] = (h.marker_rate, h.kl)
                study.set_user_attr(
                    "heuristic", {"layer": int(s.selected), "marker_rate": h.marker_rate, "kl": h.kl}
                )
                out.print(
                    f"default pipeline (extract-selected layer {s.selected}, strength 1, all writers): "
                    f"marker rate {h.marker_rate:.3f}, KL {h.kl:.4g}"
                )

            def on_trial(t):
                if t.values is None:
                    return
                err.print(
                    f"trial {t.number}: marker rate {t.values[0]:.3f}, KL {t.values[1]:.4g} "
                    f"({t.user_attrs.get('seconds_generate', 0):.1f} s generate, "
                    f"{t.user_attrs.get('seconds_kl', 0):.1f} s KL) "
                    f"{params_text(sp.complete(t.params, s.attrs['fixed']))}",
                    highlight=False,
                )

            outcome = st.optimize(
                study, s.run_trial, trials, timeout * 60 if timeout else None, jobs, on_trial
            )
            seconds = time.perf_counter() - t0
            done = st.completed(study)
            front = st.pareto(done)
            fixed = s.attrs["fixed"]
            out.print(
                _front_table(
                    [(t, fixed) for t in front],
                    f"Pareto front: {len(front)} of {len(done)} completed trials "
                    f"({outcome.ran} this run, {seconds:.0f} s) — study {study_file}",
                )
            )
            path = plot or study_file.with_suffix(".svg")
            write_plot(
                path,
                [(t.number, t.values[0], t.values[1]) for t in done],
                [(t.number, t.values[0], t.values[1]) for t in front],
                f"{Path(model).name}: search trials",
                extra,
            )
            out.print(f"plot: {path}")
            if front:
                out.print(
                    f"write a trial: patcher ablate {model} --from-study {study_file} "
                    f"--trial {front[0].number} "
                    f"-o OUT"
                )
            if outcome.interrupted:
                err.print(
                    "[bold red]interrupted:[/] completed trials are kept in the study; run again to resume"
                )
                raise typer.Exit(130)

        guard(body)


def _check_study(st, study_file: Path, model, directions: Path | None, arch_table: Path | None) -> None:
    """A study file that exists is readable, patcher's, and was searched on this model (and with these
    directions, when they are known before extraction): checked before any work."""
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
