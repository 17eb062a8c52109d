"""`patcher inspect`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from patcher.cli.common import ARCH_TABLE_HELP, guard, human, open_model, out
from patcher.io.jsonsafe import dumps
from patcher.model.architectures import ROLES

if TYPE_CHECKING:
    from patcher.model.architectures import Resolved
    from patcher.model.opened import Model


def describe(ck: Model, res: Resolved | None) -> dict:
    dtypes: Counter[str] = Counter()
    for t in ck.tensors.values():
        dtypes[t.dtype] += t.nbytes
    info = {
        "path": str(ck.path),
        "model_type": ck.model_type,
        "shards": list(ck.files),
        "tensors": len(ck.tensors),
        "total_bytes": ck.total_bytes,
        "dtypes": dict(dtypes.most_common()),
    }
    if res is not None:
        roles = {r: [t.weight for t in res.targets if t.role == r] for r in ROLES}
        biases = {r: [t.bias for t in res.targets if t.role == r and t.bias] for r in ROLES}
        info.update(
            {
                "architecture_table": res.arch.source,
                "layers": res.n_layers,
                "d_model": res.d_model,
                "tied_embeddings": res.tied,
                "post_norm_corrected": res.arch.post_norm_gain is not None,
                "roles": roles,
                "role_biases": biases,
                "missing": [{"role": r, "layer": l, "pattern": p} for r, l, p in res.missing],
            }
        )
    from patcher.io.gguf import provenance

    if getattr(ck, "is_gguf", False):
        g = ck.storage
        md = g.metadata
        info.update(
            {
                "format": "gguf",
                "gguf_architecture": g.gguf_arch,
                "name": md.get("general.name"),
                "tokenizer": md.get("tokenizer.ggml.model"),
                "vocab": g.vocab_size,
                "chat_template": isinstance(md.get("tokenizer.chat_template"), str),
            }
        )
        if res is not None:
            info["quant_types_per_role"] = {
                r: dict(Counter(ck.info(t.weight).dtype for t in res.targets if t.role == r)) for r in ROLES
            }
        prov = provenance(g)
        if prov:
            info["provenance"] = prov
        return info
    from patcher.io import manifest

    made = manifest.read(ck.folder) if ck.path.is_dir() else None
    if made:
        info["manifest"] = made
    prov = {f: sf.metadata["patcher"] for f, sf in ck.files.items() if "patcher" in sf.metadata}
    if prov:
        first = next(iter(prov.values()))
        try:
            info["provenance"] = json.loads(first)
        except (ValueError, RecursionError):
            info["provenance"] = first
    return info


def register(app) -> None:

    @app.command()
    def inspect(
        model: Path = typer.Argument(..., help="Model folder, one .safetensors or .gguf file"),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
        arch_table: Path | None = typer.Option(None, "--arch-table", help=ARCH_TABLE_HELP),
    ):
        """Architecture, layers, d_model, dtypes, shards, size, and which tensors each role maps to."""

        def body():
            from rich.table import Table

            ck = open_model(model, arch_table, need_arch=False)
            res = ck.resolved
            info = describe(ck, res)
            if as_json:
                print(dumps(info, indent=2))
                return
            t = Table(show_header=False, box=None, pad_edge=False)
            t.add_row("model", str(ck.path))
            t.add_row("model_type", str(info["model_type"]))
            if info.get("format") == "gguf":
                t.add_row(
                    "GGUF",
                    f"architecture {info['gguf_architecture']}, name {info['name']!r}, "
                    f"vocabulary {info['vocab']} ({info['tokenizer']}), chat template "
                    f"{'yes' if info['chat_template'] else 'no'}",
                )
            if res is not None:
                t.add_row("layers", str(res.n_layers))
                t.add_row("d_model", str(res.d_model))
                t.add_row("tied embeddings", "yes" if res.tied else "no")
                if res.arch.post_norm_gain:
                    t.add_row(
                        "post-norm", f"writers corrected by g = {res.arch.post_norm_gain.replace('_', ' ')}"
                    )
            t.add_row(
                "shards",
                f"{len(ck.files)} ({', '.join(list(ck.files)[:3])}{', …' if len(ck.files) > 3 else ''})",
            )
            t.add_row("tensors", f"{len(ck.tensors)}, {human(ck.total_bytes)}")
            t.add_row("dtypes", ", ".join(f"{d} {human(b)}" for d, b in info["dtypes"].items()))
            out.print(t)
            if res is not None:
                rt = Table(title="residual writers", title_justify="left")
                quants = info.get("quant_types_per_role")
                columns = ("role", "tensors", "biases", "example", "residual axis")
                for c in columns + (("types",) if quants else ()):
                    rt.add_column(c)
                for role in ROLES:
                    ts = [x for x in res.targets if x.role == role]
                    row = [
                        role,
                        str(len(ts)),
                        str(sum(1 for x in ts if x.bias)),
                        ts[0].weight if ts else "—",
                        str(ts[0].residual_axis) if ts else "",
                    ]
                    if quants:
                        row.append(", ".join(f"{k} ×{v}" for k, v in quants[role].items()) or "—")
                    rt.add_row(*row)
                out.print(rt)
                if res.missing:
                    out.print(
                        "[yellow]missing:[/] "
                        + "; ".join(
                            f"{r}{'' if l is None else f' layer {l}'} ({p})" for r, l, p in res.missing[:10]
                        )
                        + (f" … and {len(res.missing) - 10} more" if len(res.missing) > 10 else "")
                    )
            if "provenance" in info:
                out.print(f"[cyan]edited by patcher:[/] {json.dumps(info['provenance'], sort_keys=True)}")
            if "manifest" in info:
                m = info["manifest"]
                out.print(
                    f"[cyan]manifest:[/] patcher {m.get('patcher')}, {m.get('kind')}, {m.get('created')}; "
                    f"command: {m.get('command') or (m.get('recipe') or {}).get('file')}; "
                    f"{len(m.get('inputs', {}))} input and "
                    f"{len(m.get('outputs', {}))} output files with sha256"
                )

        guard(body)
