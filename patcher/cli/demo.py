"""`patcher demo`."""

import json
import time
from pathlib import Path

import typer

from patcher.cli.common import err, guard, out


def register(app) -> None:
    @app.command()
    def demo(
        out_dir: Path | None = typer.Option(
            None, "--out", help="Where to write the artefacts (default: a new temp folder)"
        ),
    ):
        """The whole pipeline on the bundled planted-direction model: extract, rank, ablate, inject,
        export, verify, diff — with a short report of what each step measured."""

        def body():
            from rich.table import Table

            from patcher.pipelines import demo as d

            t0 = time.perf_counter()
            describe = {
                "extract": lambda f: (
                    f"selected resid_pre layer {f['selected_layer']} of {f['layers']}; cosine with the "
                    f"planted direction {f['cosine_with_planted']:.4f} (SNR {f['snr']:.1f})"
                ),
                "ablate": lambda f: (
                    f"{f['tensors']} tensors projected; leakage after bf16 rounding {f['leakage']:.2e}"
                ),
                "inject": lambda f: (
                    f"+{f['alpha']}·r̂ as {f['bias']} "
                    f"({'live in HF transformers' if f['hf_loads'] else 'ONNX only'}"
                    f"{', config ' + json.dumps(f['config']) if f['config'] else ''})"
                ),
                "export": lambda f: (
                    f"{f['folder']}: {', '.join(f['files'][:4])}{', …' if len(f['files']) > 4 else ''}"
                ),
                "verify": lambda f: (
                    f"onnxruntime vs numpy: max |Δ logits| {f['parity_max_abs']:.2e} "
                    f"({'ok' if f['parity_ok'] else 'FAILED'}), top-1 {f['top1']:.0%}, "
                    f"greedy tokens {f['greedy_match']:.0%}"
                ),
                "diff": lambda f: (
                    f"original→ablated: “{f['original_vs_ablated']}”; "
                    f"ablated→injected: “{f['ablated_vs_injected']}”"
                ),
            }
            t = Table(title="patcher demo", title_justify="left", show_lines=False)
            for c in ("step", "seconds", "what it measured"):
                t.add_column(c, overflow="fold")

            def step(name, seconds, facts):
                t.add_row(name, f"{seconds:.2f}", describe[name](facts))
                err.print(f"[dim]{name} done ({seconds:.2f} s)[/]")

            facts = d.run(out_dir, step)
            out.print(t)
            pt = Table(
                title="mean |v·h|/|h| of the planted v per resid_pre layer (positive prompts)",
                title_justify="left",
            )
            for c in ("layer", "original", "ablated"):
                pt.add_column(c, justify="right")
            for row in facts["verify"]["projections"]:
                pt.add_row(str(row["layer"]), f"{row['original']:.3f}", f"{row['edited']:.2e}")
            out.print(pt)
            out.print(f"artefacts in {facts['out']}; total {time.perf_counter() - t0:.1f} s")
            out.print(
                "\nnext, on the demo's files (a tiny random model: its text output is noise; "
                "on your own model, bring two prompt files and keep the chat template):"
            )
            for line in facts["next"]:
                out.print(f"  {line}", highlight=False, soft_wrap=True)

        guard(body, interrupted="partial files removed (a --out folder the demo created is removed entirely)")
