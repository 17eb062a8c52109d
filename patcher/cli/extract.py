"""`patcher extract`."""

from pathlib import Path

import typer

from patcher import validate as V
from patcher.cli.common import ARCH_TABLE_HELP, PlainProgress, err, guard, out, progress
from patcher.errors import PatcherError
from patcher.io.paths import check_distinct, check_output


def _score_table(result):
    from rich.table import Table

    t = Table(
        title=f"layer scores (selected: {result.selected_layer}; rule: {result.metadata['selection_rule']})",
        title_justify="left",
    )
    for c in ("layer", "|μ+ − μ−|", "SNR", "cos neighbours", "|μ+ − μ−| / |resid|"):
        t.add_column(c, justify="right")
    fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    for s in result.scores:
        style = "bold green" if s["layer"] == result.selected_layer else None
        t.add_row(
            str(s["layer"]),
            fmt(s.get("diff_norm")),
            fmt(s.get("snr")),
            fmt(s.get("neighbour_cos")),
            fmt(s.get("relative_norm")),
            style=style,
        )
    return t


def _run(m, result_args, capped_by_default: bool):
    from patcher.edit.extract import extract as run_extract
    from patcher.model.prompts import read_prompt_file

    cap = result_args["max_prompts"]
    have = {k: len(read_prompt_file(result_args[k])) for k in ("positive", "negative")}
    used = {k: min(n, cap) for k, n in have.items()}
    if capped_by_default and used != have:
        parts = " and ".join(f"{used[k]} of {have[k]} {k}" for k in have)
        err.print(
            f"[yellow]note:[/] using the first {parts} prompts (--max-prompts {cap} is the default); "
            f"pass --max-prompts {max(have.values())} to use them all",
            highlight=False,
        )
    total = sum(used.values())
    plain = PlainProgress("prompts through the model", total)
    with progress() as prog:
        task = prog.add_task("prompts through the model", total=total)

        def advance(n: int) -> None:  # the bar on a terminal, a line now and then otherwise
            prog.advance(task, n)
            plain.advance(n)

        return run_extract(
            m,
            progress=advance,
            announce=lambda line: err.print(f"[cyan]{line}[/]", highlight=False),
            **result_args,
        )


def register(app) -> None:
    @app.command()
    def extract(
        model: Path = typer.Argument(..., help="Model folder"),
        positive: Path = typer.Option(
            ..., "--positive", help="Prompts that show the behaviour (.txt lines or .jsonl with 'prompt')"
        ),
        negative: Path = typer.Option(..., "--negative", help="Contrast prompts"),
        output: Path = typer.Option(..., "-o", "--output", help="directions .safetensors to write"),
        positions: str = typer.Option(
            "-1", "--positions", help="Token positions from the end, e.g. -1,-2,-3"
        ),
        batch_size: int = typer.Option(8, "--batch-size", min=1),
        max_prompts: int | None = typer.Option(
            None,
            "--max-prompts",
            min=1,
            help=f"Use the first N prompts of each file (default {V.DEFAULT_MAX_PROMPTS}: the direction's "
            "sampling error falls as 1/sqrt(N), so more prompts add time more than accuracy)",
            show_default=False,
        ),
        layers: str | None = typer.Option(None, "--layers", help="resid_pre layers to compute, e.g. 0-20"),
        no_chat_template: bool = typer.Option(
            False, "--no-chat-template", help="Tokenize raw prompts (base models)"
        ),
        system: str | None = typer.Option(None, "--system", help="System prompt for the chat template"),
        project_out_negative_mean: bool = typer.Option(
            False,
            "--project-out-negative-mean",
            help="Orthogonalize each direction against the negative mean",
        ),
        plot: Path | None = typer.Option(
            None, "--plot", help="Write the score plot (.svg, or .png with matplotlib)"
        ),
        force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
    ):
        """Difference-in-means directions at every layer, streamed block by block, and a ranking."""

        def body():
            from patcher.io.plot import check_plot_path, plot_scores

            pos = V.positions(positions, "--positions")
            V.number(batch_size, "batch_size", "--batch-size")
            cap = (
                V.DEFAULT_MAX_PROMPTS
                if max_prompts is None
                else V.number(max_prompts, "max_prompts", "--max-prompts")
            )
            if plot is not None:
                check_plot_path(plot)
            from patcher.model.opened import Model

            with Model.open(model, arch_table) as m:
                inputs = [*m.input_paths, positive, negative, arch_table]
                check_output(output, inputs, force=force, kind="file")
                if output.suffix != ".safetensors":
                    raise PatcherError(output, "a directions file ends in .safetensors")
                if plot is not None:
                    check_output(plot, inputs, force=force, kind="file", option="--plot")
                    check_distinct({"-o": output, "--plot": plot})
                result = _run(
                    m,
                    result_args=dict(
                        positive=positive,
                        negative=negative,
                        positions=pos,
                        batch_size=batch_size,
                        max_prompts=cap,
                        layers=layers,
                        chat_template=not no_chat_template,
                        system=system,
                        project_out_negative_mean=project_out_negative_mean,
                    ),
                    capped_by_default=max_prompts is None,
                )
            result.save(output)
            out.print(_score_table(result))
            counts = result.metadata["prompts"]
            out.print(
                f"wrote {output}: direction / positive_mean / negative_mean "
                f"[{result.direction.shape[0]}, "
                f"{result.direction.shape[1]}] from {counts['positive']['count']} + "
                f"{counts['negative']['count']} "
                f"prompts at positions {result.metadata['positions']}; use it as -d {output} "
                f"(layer {result.selected_layer}) or -d {output}:LAYER; with shuffled labels the same "
                f"prompts reach SNR {result.metadata['shuffled_labels_snr']:.2f}"
            )
            weak = _weak_separation(result)
            if weak:
                err.print(f"[yellow]warning:[/] {weak}", highlight=False)
            if plot:
                plot_scores(
                    plot, result.scores, result.selected_layer, f"{model.name}: difference-in-means scores"
                )
                out.print(f"plot: {plot}")

        guard(body)


def _weak_separation(result) -> str | None:
    """A line for a direction the prompt sets do not support: its SNR is no better than the same prompts
    reach with their labels shuffled."""
    meta = result.metadata
    snr = next(r.get("snr") for r in result.scores if r["layer"] == result.selected_layer)
    null = meta.get("shuffled_labels_snr")
    if snr is None or null is None or snr > 1.25 * null:
        return None
    hint = (
        "every prompt ends in the chat template's same closing tokens; if your sets differ in their last "
        "words, try --no-chat-template or other --positions"
        if meta.get("chat_template")
        else "check that the positive prompts show the behaviour and the negative ones do not, or try other "
        "--positions"
    )
    return (
        f"weak direction: layer {result.selected_layer}'s SNR {snr:.2f} is within what the same prompts "
        f"reach with shuffled labels ({null:.2f}); {hint}"
    )
