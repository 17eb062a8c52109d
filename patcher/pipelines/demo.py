"""`patcher demo`: the whole pipeline on the bundled planted-direction model, with no network and no
user files: extract -> rank -> ablate -> inject -> export -> verify -> diff, and a short report.

The demo model is tiny-llama with a known unit vector v added to the embeddings of the tokens of a
few neutral marker words ("sea", "robot", ...); the bundled prompt sets end in a marker word or in a
neutral word. A working pipeline recovers v, removes it everywhere, and proves both.
"""

import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from patcher.errors import PatcherError

# the demo's data ships inside the package (pip install, wheel or checkout alike): a 300 kB model, its
# prompt sets and the planted direction; scripts/make_fixtures.py rebuilds them
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def bundled() -> dict:
    paths = {
        "model": DEMO / "model",
        "positive": DEMO / "positive.txt",
        "negative": DEMO / "negative.txt",
        "planted": DEMO / "planted-direction.npy",
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise PatcherError(
            missing[0],
            "bundled demo data missing from this installation of patcher "
            "(reinstall it; in a checkout: python scripts/make_fixtures.py)",
        )
    return paths


def run(out: Path | None = None, step=None) -> dict:
    """Run every stage; `step(name, seconds, facts)` is called after each. Returns all facts."""
    from patcher.io import manifest
    from patcher.io.paths import check_output

    data = bundled()
    if out is not None:  # a new or empty folder, or a previous demo's (it has patcher-manifest.json)
        check_output(out, list(data.values()), resume=True, option="--out")
    fresh = out is None or not Path(out).exists() or not any(Path(out).iterdir())
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="patcher-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        facts = run_stages(out, data, step)
    except BaseException:
        if fresh:  # a failed or interrupted demo leaves nothing in a folder it made
            shutil.rmtree(out, ignore_errors=True)
        raise
    manifest.write(out, kind="demo", command="patcher demo", inputs={}, outputs={})
    return facts


def next_commands(out: Path) -> list[str]:
    """What to try next, on the demo's own copies (the tiny model is random: its text output is noise).
    The prompt sets are plain text, so extract runs without the chat template, as the demo does."""
    o = lambda name: shlex.quote(str(out / name))  # noqa: E731
    return [
        f"patcher inspect {o('original')}",
        f"patcher extract {o('original')} --positive {o('positive.txt')} --negative {o('negative.txt')} "
        f"--no-chat-template -o my-direction.safetensors",
        f"patcher ablate {o('original')} -d my-direction.safetensors -o my-ablated",
        f"patcher diff {o('original')} my-ablated",
        "patcher export my-ablated -o my-onnx",
        "patcher generate my-onnx --prompt 'Tell me about the sea' --max-new-tokens 16",
        "patcher web my-onnx -o my-site --serve",
    ]


def run_stages(out: Path, data: dict, step: Callable[[str, float, dict], None] | None) -> dict:
    """The demo's stages on its bundled inputs `data`, writing under `out` (checked by `run`)."""
    from patcher.edit.apply import execute
    from patcher.edit.directions import load_direction
    from patcher.edit.extract import extract
    from patcher.edit.plan import plan_ablation, plan_injection
    from patcher.io.paths import check_output
    from patcher.model.execution import StreamedModel
    from patcher.model.opened import Model
    from patcher.onnx.export import export
    from patcher.onnx.verify import load_prompts, projections, verify

    planted = data["planted"]
    v = np.load(planted).astype(np.float64)
    facts = {"out": str(out), "next": next_commands(out)}
    # copies of the inputs, so the next commands run on files the user has (a wheel's are in site-packages)
    shutil.copytree(data["model"], out / "original", dirs_exist_ok=True)
    for name in ("positive", "negative"):
        shutil.copyfile(data[name], out / f"{name}.txt")

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        if step:
            step(name, time.perf_counter() - t0, result)
        facts[name] = result
        return result

    def do_extract():
        r = extract(data["model"], data["positive"], data["negative"], chat_template=False, batch_size=16)
        check_output(out / "directions.safetensors", list(data.values()), kind="file", replace_ok=True)
        r.save(out / "directions.safetensors")
        d = r.direction[r.selected_layer]
        return {
            "selected_layer": r.selected_layer,
            "layers": len(r.scores),
            "cosine_with_planted": float(abs(d @ v) / np.linalg.norm(d)),
            "snr": r.scores[r.selected_layer]["snr"],
            "file": str(out / "directions.safetensors"),
        }

    ex = timed("extract", do_extract)
    spec = f"{out / 'directions.safetensors'}:{ex['selected_layer']}"

    def edit(kind, src, dst, **kw):
        with Model.open(src) as m:
            d = load_direction(spec, m.d_model)
            plan = plan_ablation(m, d, **kw) if kind == "ablate" else plan_injection(m, d, **kw)
            report = execute(plan, dst, force=True, command=f"patcher demo ({kind})")
        return plan, report

    def do_ablate():
        plan, rep = edit("ablate", data["model"], out / "ablated")
        return {"tensors": len(plan.edits), "leakage": rep.overall_leakage(), "folder": str(out / "ablated")}

    timed("ablate", do_ablate)

    def do_inject():
        plan, _ = edit(
            "inject", out / "ablated", out / "ablated-injected", layer=1, alpha=4.0, target="mlp_out"
        )
        return {
            "layer": 1,
            "alpha": 4.0,
            "bias": plan.record["bias"],
            "hf_loads": plan.record["hf_loads"],
            "config": plan.config_updates,
            "folder": str(out / "ablated-injected"),
        }

    timed("inject", do_inject)

    def do_export():
        export(out / "ablated-injected", out / "onnx", force=True)
        files = sorted(str(p.relative_to(out / "onnx")) for p in (out / "onnx").rglob("*") if p.is_file())
        return {"folder": str(out / "onnx"), "files": files}

    timed("export", do_export)

    def do_verify():
        rep = verify(out / "onnx", out / "ablated-injected", tokens=8)
        # the ablation alone, measured against the planted v on the positive prompts
        p = load_prompts(data["model"], data["positive"], chat_template=False)
        ids, mask = p.batch()
        proj = projections(
            StreamedModel(Model.open(out / "ablated")),
            StreamedModel(Model.open(data["model"])),
            ids,
            mask,
            load_direction(str(planted), 64),
        )
        return {
            "parity_max_abs": rep.max_abs_diff,
            "parity_ok": rep.parity_ok,
            "top1": rep.top1_agreement,
            "greedy_match": rep.generation_match,
            "projections": proj,
        }

    timed("verify", do_verify)

    def do_diff():
        from patcher.edit.diff import diff

        a = diff(data["model"], out / "ablated", direction=load_direction(str(planted), 64))
        b = diff(out / "ablated", out / "ablated-injected", direction=load_direction(str(planted), 64))
        return {
            "original_vs_ablated": a["verdict"],
            "ablated_vs_injected": b["verdict"],
            "recovered_cosine": a.get("direction_cosine"),
        }

    timed("diff", do_diff)
    return facts
