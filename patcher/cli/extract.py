"""`patcher extract`."""
from pathlib import Path
from typing import Optional

import typer

from patcher.errors import PatcherError
from patcher.cli.common import ARCH_TABLE_HELP, guard, open_model, out, progress


def _score_table(result):
    from rich.table import Table
    t = Table(title=f"layer scores (selected: {result.selected_layer}; rule: "
              f"{result.metadata['selection_rule']})",
              title_justify="left")
    for c in ("layer", "|μ+ − μ−|", "SNR", "cos neighbours", "|μ+ − μ−| / |resid|"):
        t.add_column(c, justify="right")
    fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    for s in result.scores:
        style = "bold green" if s["layer"] == result.selected_layer else None
        t.add_row(str(s["layer"]), fmt(s.get("diff_norm")), fmt(s.get("snr")), fmt(s.get("neighbour_cos")),
                  fmt(s.get("relative_norm")), style=style)
    return t


def register(app) -> None:
    @app.command()
    def extract(model: Path = typer.Argument(..., help="Model folder"),
                positive: Path = typer.Option(..., "--positive", help="Prompts that show the behaviour "
                                              "(.txt lines or .jsonl with 'prompt')"),
                negative: Path = typer.Option(..., "--negative", help="Contrast prompts"),
                output: Path = typer.Option(..., "-o", "--output", help="directions .safetensors to write"),
                positions: str = typer.Option("-1", "--positions", help="Token positions from the end, e.g. "
                                              "-1,-2,-3"),
                batch_size: int = typer.Option(8, "--batch-size", min=1),
                max_prompts: Optional[int] = typer.Option(None, "--max-prompts", min=1, help="Use the first "
                                                          "N of each file"),
                layers: Optional[str] = typer.Option(None, "--layers", help="resid_pre layers to compute, "
                                                     "e.g. 0-20"),
                no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Tokenize raw "
                                                      "prompts (base models)"),
                system: Optional[str] = typer.Option(None, "--system", help="System prompt for the chat "
                                                     "template"),
                project_out_negative_mean: bool = typer.Option(False, "--project-out-negative-mean",
                                                               help="Orthogonalize each direction against "
                                                               "the negative mean"),
                plot: Optional[Path] = typer.Option(None, "--plot", help="Write the score plot (.svg, or "
                                                    ".png with matplotlib)"),
                force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists"),
                arch_table: Optional[Path] = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP)):
        """Difference-in-means directions at every layer, streamed block by block, and a ranking."""
        def body():
            from patcher.edit.extract import extract as run_extract
            from patcher.io.plot import plot_scores
            if output.exists() and not force:
                raise PatcherError(output, "already exists; pass --force to replace it")
            try:
                pos = [int(p) for p in positions.split(",") if p.strip()]
            except ValueError:
                raise PatcherError("--positions", f"cannot read {positions!r}; use e.g. -1,-2") from None
            from patcher.io.writer import refuse_inputs
            m = open_model(model, arch_table)
            refuse_inputs(output, m.input_paths)  # never into (or onto) the model, its shards or its cache
            with progress() as prog:
                task = prog.add_task("prompts through the model", total=None)
                result = run_extract(m, positive, negative, positions=pos, batch_size=batch_size,
                                     max_prompts=max_prompts, layers=layers,
                                     chat_template=not no_chat_template,
                                     system=system, project_out_negative_mean=project_out_negative_mean,
                                     progress=lambda n: prog.advance(task, n))
            result.save(output)
            out.print(_score_table(result))
            counts = result.metadata["prompts"]
            out.print(f"wrote {output}: direction / positive_mean / negative_mean "
                      f"[{result.direction.shape[0]}, "
                      f"{result.direction.shape[1]}] from {counts['positive']['count']} + "
                      f"{counts['negative']['count']} "
                      f"prompts at positions {result.metadata['positions']}; use it as -d {output} "
                      f"(layer {result.selected_layer}) or -d {output}:LAYER")
            if plot:
                plot_scores(plot, result.scores, result.selected_layer, f"{model.name}: difference-in-means "
                            f"scores")
                out.print(f"plot: {plot}")
        guard(body)
