"""Quality of an export's variants against its fp32 model (patcher/onnx/quality.py), what `patcher verify`
prints of it, the memory of verify's passes, and the per-device default variant in config.json."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO, fixture_path, run_cli

from patcher.onnx.export import DEVICE_DEFAULTS, FILES, export
from patcher.onnx.quality import FIT, Quality, compare
from patcher.onnx.runtime import OnnxModel

PROMPTS = [[5, 17, 99, 3], [8, 8, 200, 31, 7, 64], [250]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return export(fixture_path("llama"), tmp_path_factory.mktemp("q") / "x", dtype="fp32,int4,int8")


def test_compare_against_numpy_softmax_and_argmax(llama):
    """KL, top-1 and greedy agreement recomputed from each model's own logits and generations, prompt by
    prompt, with an independent float64 softmax."""
    ref, var = OnnxModel(llama, FILES["fp32"]), OnnxModel(llama, FILES["int4"])
    q = compare(ref, var, PROMPTS, tokens=6)
    kls, hits, firsts, same = [], [], [], []
    for row in PROMPTS:
        ids = np.array([row])
        args = (ids, np.ones_like(ids), np.arange(len(row))[None])
        a, b = (m.step(*args, m.empty_cache(1))[0][0].astype(np.float64) for m in (ref, var))
        p = np.exp(a[-1] - a[-1].max())
        p /= p.sum()
        r = np.exp(b[-1] - b[-1].max())
        r /= r.sum()
        kls.append(float(np.sum(p * np.log(p / r))))
        hits += list(a.argmax(-1) == b.argmax(-1))
        firsts.append(a[-1].argmax() == b[-1].argmax())
        same += list((ref.generate(ids, np.ones_like(ids), 6) == var.generate(ids, np.ones_like(ids), 6))[0])
    assert q.prompts == 3 and q.tokens == 6
    assert q.first_token_kl == pytest.approx(np.mean(kls), rel=1e-9, abs=1e-12)
    assert q.max_first_token_kl == pytest.approx(max(kls), rel=1e-9, abs=1e-12)
    assert q.top1 == np.mean(hits) and q.first_top1 == np.mean(firsts) and q.greedy == np.mean(same)
    assert q.first_token_kl > 1e-4  # int4 of random weights is visibly not fp32
    same_model = compare(ref, OnnxModel(llama, FILES["fp32"]), PROMPTS, tokens=6)
    assert same_model.first_token_kl == 0 and same_model.top1 == 1 and same_model.greedy == 1
    assert same_model.fit


@pytest.mark.parametrize(
    "kl,top1,greedy,bad",
    [
        (FIT["first_token_kl"], FIT["top1"], FIT["greedy"], []),
        (FIT["first_token_kl"] * 1.01, 1.0, 1.0, ["first-token KL"]),
        (0.0, FIT["top1"] - 0.01, 1.0, ["top-1"]),
        (0.0, 1.0, FIT["greedy"] - 0.01, ["greedy"]),
        (1.0, 0.5, 0.1, ["first-token KL", "top-1", "greedy"]),
    ],
)
def test_fit_to_ship_verdict_names_what_fails(kl, top1, greedy, bad):
    q = Quality(
        prompts=64,
        tokens=32,
        first_token_kl=kl,
        max_first_token_kl=kl,
        top1=top1,
        first_top1=top1,
        greedy=greedy,
    )
    assert q.fit == (not bad)
    v = q.verdict()
    assert v.startswith("fit to ship" if not bad else "NOT fit to ship")
    for name in ("first-token KL", "top-1", "greedy"):
        assert (name in v) == (name in bad)


def test_verify_prints_quality_and_labels_the_graph_check(llama, tmp_path):
    """The table shows both numbers an int4 run has: the graph's top-1 against numpy on the stored weights
    (100 %) and the variant's top-1 against fp32 (what --json's quality says), with the verdict."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\nwhat is this\nthe cat sat\n")
    args = [
        "verify",
        llama,
        "--reference",
        fixture_path("llama"),
        "--dtype",
        "int4",
        "--prompts",
        prompts,
        "--tokens",
        "2",
        "--quality-tokens",
        "5",
    ]
    rep = json.loads(run_cli(*args, "--json").stdout)
    q = rep["quality"]
    assert rep["top1_agreement"] == 1.0 and q["top1"] < 1.0  # the two numbers the old table conflated
    assert q["prompts"] == 3 and q["tokens"] == 5 and q["thresholds"] == FIT
    text = " ".join(run_cli(*args).stdout.split())
    assert "graph top-1 100.0% of prompt positions agree with numpy on the weights the file stores" in text
    assert f"vs fp32: top-1 {q['top1']:.1%} of prompt positions" in text
    assert f"{q['greedy']:.1%} of 3 × 5 greedy tokens identical" in text
    assert ("int4: fit to ship" if q["fit"] else "int4: NOT fit to ship") in text
    fp32 = json.loads(
        run_cli(
            "verify",
            llama,
            "--reference",
            fixture_path("llama"),
            "--prompts",
            prompts,
            "--tokens",
            "1",
            "--json",
        ).stdout
    )
    assert fp32["quality"] is None  # fp32 is the reference itself


def test_verify_memory_does_not_grow_with_the_prompt_count(llama, tmp_path, monkeypatch):
    """Every numpy forward sees at most PARITY_CHUNK prompts and every quality step one prompt, so a 262k
    vocabulary's logits are never held for all prompts at once."""
    from patcher.model.execution import StreamedModel
    from patcher.onnx import verify as vmod

    seen, steps = [], []
    run, step = StreamedModel.run, OnnxModel.step
    monkeypatch.setattr(
        StreamedModel, "run", lambda self, ids, *a, **k: seen.append(len(ids)) or run(self, ids, *a, **k)
    )
    monkeypatch.setattr(
        OnnxModel, "step", lambda self, ids, *a, **k: steps.append(len(ids)) or step(self, ids, *a, **k)
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(11)))
    rep = vmod.verify(llama, fixture_path("llama"), dtype="int8", prompts=prompts, tokens=2, quality_tokens=2)
    assert max(seen) == vmod.PARITY_CHUNK and sum(seen) >= 11 * 3  # parity, its greedy steps
    assert rep.quality.prompts == 11 and steps.count(1) >= 11 * 2 * 2
    assert max(steps) <= vmod.PARITY_CHUNK
    assert rep.tokens_compared == 11 * 2 and rep.parity_ok


@pytest.mark.parametrize(
    "dtypes,wasm,webgpu",
    [
        ("fp32,fp16,int4,q4f16,int8", "fp16", "fp16"),
        ("fp32,int4", "fp32", "fp32"),
        ("int4,q4f16,int8", "q8", "q8"),
        ("q4f16", "q4f16", "q4f16"),
    ],
)
def test_config_names_the_best_fit_variant_per_device(tmp_path, dtypes, wasm, webgpu):
    out = export(fixture_path("qwen3"), tmp_path / "x", dtype=dtypes)
    cfg = json.loads((out / "config.json").read_text())["transformers.js_config"]
    assert cfg["device_config"] == {"wasm": {"dtype": wasm}, "webgpu": {"dtype": webgpu}}
    assert cfg["dtype"] == wasm  # Node's cpu device, like WASM
    assert set(DEVICE_DEFAULTS["wasm"]) == set(DEVICE_DEFAULTS["webgpu"]) == set(FILES)


@pytest.mark.real
def test_real_smollm2_default_variant_keeps_the_answers(real_model, tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct: the variant config.json names for WASM and WebGPU passes the fit-to-ship
    thresholds against fp32; per-row int8 keeps the first token close (per-tensor int8 had KL 0.88)."""
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))
    out = export(real_model.hf, tmp_path / "x", dtype="fp32,fp16,int8")
    cfg = json.loads((out / "config.json").read_text())["transformers.js_config"]
    assert cfg["device_config"]["wasm"]["dtype"] == cfg["device_config"]["webgpu"]["dtype"] == "fp16"
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(Path("patcher/data/quality_prompts.txt").read_text().splitlines()[:8]))
    args = ["--prompts", prompts, "--tokens", "0", "--quality-tokens", "12", "--json"]
    reports = {
        d: json.loads(run_cli("verify", out, "--reference", real_model.hf, "--dtype", d, *args).stdout)
        for d in ("fp16", "int8")
    }
    assert reports["fp16"]["quality"]["fit"], reports["fp16"]["quality"]
    assert reports["int8"]["quality"]["first_token_kl"] < 0.3, reports["int8"]["quality"]


def test_verify_prints_the_leakage_along_the_direction(tmp_path):
    """An ablated model's int8 export: the table's leakage line is --json's worst edited tensor."""
    planted, direction = DEMO / "model", DEMO / "planted-direction.npy"
    run_cli("ablate", planted, "-d", direction, "-o", tmp_path / "edited")
    out = export(tmp_path / "edited", tmp_path / "onnx", dtype="int8")
    args = [
        "verify",
        out,
        "--reference",
        tmp_path / "edited",
        "--original",
        planted,
        "-d",
        direction,
        "--dtype",
        "int8",
        "--tokens",
        "1",
        "--quality-tokens",
        "0",
    ]
    rep = json.loads(run_cli(*args, "--json").stdout)
    leak = rep["leakage"]["summary"]
    assert rep["quality"] is None and leak["stored_of_original_max"] < 0.02  # orthogonal rounding kept it
    text = " ".join(run_cli(*args).stdout.split())
    assert (
        f"leakage along r̂ stored weights keep {leak['stored_of_original_max']:.2%} of the original's "
        f"component (worst of {leak['tensors']} edited tensors"
    ) in text


def test_docs_name_the_defaults_the_table_picks():
    """docs/onnx.md's quality table says which variant each device loads by default: the one
    DEVICE_DEFAULTS picks from a full export, and one the table marks fit to ship."""
    readme = (Path(__file__).parents[1] / "docs" / "onnx.md").read_text()
    table = readme[readme.index("| variant | MiB | first-token KL |") :].split("\n\n")[0].splitlines()[3:]
    rows = [r.split("|")[1:-1] for r in table]  # the rows after fp32's
    marked = {dev: [r[0].split()[0].strip() for r in rows if dev in r[-1]] for dev in ("WASM", "WebGPU")}
    assert marked == {"WASM": [DEVICE_DEFAULTS["wasm"][0]], "WebGPU": [DEVICE_DEFAULTS["webgpu"][0]]}
    assert all(r[-2].strip() == "yes" for r in rows if r[-1].strip())
