"""`patcher run`: recipes validated up front with line numbers, dry runs, --jobs determinism,
resume by manifest, per-layer strength kernels, and provenance manifests."""

import json
import math

import ml_dtypes
import numpy as np
from conftest import DEMO, FIXTURES, fixture_path, run_cli, unit
from patcher_kernels.codecs import ulp_distance

from patcher.io import manifest
from patcher.io.checkpoint import Checkpoint

POS = DEMO / "positive.txt"
NEG = DEMO / "negative.txt"


def write_recipe(tmp_path, body: str, models=("llama", "qwen3"), name="recipe.toml"):
    head = "".join(
        f'[[model]]\nname = "{m}"\npath = "{fixture_path(m)}"\noutput = "out/{m}"\n\n' for m in models
    )
    path = tmp_path / name
    path.write_text(head + body)
    return path


PIPELINE = f'''
[[step]]
op = "ablate"
direction = "{FIXTURES / "direction-64.npy"}"
strength = {{ kernel = "gaussian", center = 1, width = 1.0, peak = 1.0 }}

[[step]]
op = "inject"
direction = "{FIXTURES / "direction-64.npy"}"
layer = 2
alpha = 1.5

[[step]]
op = "export"
'''


def folder_bytes(root):
    """Every output file's bytes; manifests compared by their output digests (they hold timings)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            out[rel] = (
                json.loads(p.read_text())["outputs"] if p.name.endswith(manifest.MANIFEST) else p.read_bytes()
            )
    return out


def test_jobs_2_equals_jobs_1_byte_for_byte(tmp_path):
    import shutil

    results = []
    recipe = write_recipe(tmp_path, PIPELINE)
    for jobs in (1, 2):  # same recipe, same output paths: only the scheduling differs
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        run_cli("run", recipe, "--jobs", jobs)
        results.append(folder_bytes(tmp_path / "out"))
    assert results[0].keys() == results[1].keys() and len(results[0]) > 10
    for k in results[0]:
        assert results[0][k] == results[1][k], k


def test_validation_reports_every_problem_with_its_line(tmp_path):
    bad = np.zeros(32, np.float32)
    bad[0] = 1
    np.save(tmp_path / "short.npy", bad)
    recipe = write_recipe(
        tmp_path,
        f'''
[[step]]
op = "ablate"
direction = "{tmp_path / "short.npy"}"
layerz = "1-2"

[[step]]
op = "inject"
direction = "{FIXTURES / "direction-64.npy"}"
layer = 7
alpha = 1.0

[[step]]
op = "extract"
positive = "missing.txt"
negative = "{NEG}"
''',
        models=("llama",),
    )
    res = run_cli("run", recipe, expect=1)
    text = res.output
    lines = recipe.read_text().splitlines()
    assert "problem(s)" in text
    assert (
        f"line {lines.index('layerz = ' + chr(34) + '1-2' + chr(34)) + 1}: step 1 (ablate): "
        f"unknown key 'layerz'"
    ) in text
    assert "dimension 32, the model's d_model is 64" in text
    assert f"line {lines.index('layer = 7') + 1}: step 2 (inject): layer: layer 7 is out of range" in text
    assert "missing.txt does not exist" in text
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    recipe = write_recipe(tmp_path, PIPELINE)
    res = run_cli("run", recipe, "--dry-run")
    assert "model.layers.1.mlp.down_proj.weight" in res.output and "dry run" in res.output
    assert "model.layers.2.mlp.down_proj.bias" in res.output  # the injection is listed too
    assert not (tmp_path / "out").exists()


def test_resume_skips_complete_outputs_and_redoes_damaged_ones(tmp_path):
    recipe = write_recipe(tmp_path, PIPELINE, models=("llama",))
    run_cli("run", recipe)
    res = run_cli("run", recipe)
    assert res.output.count("skipped (complete") == 3
    shard = next((tmp_path / "out" / "llama" / "02-injected").glob("model-0000*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = run_cli("run", recipe)
    assert res.output.count("skipped (complete") == 2  # the damaged inject step ran again (export kept)
    assert manifest.is_complete(tmp_path / "out" / "llama" / "02-injected")


def test_gaussian_strength_per_layer(tmp_path):
    recipe = write_recipe(tmp_path, PIPELINE, models=("llama",))
    run_cli("run", recipe)
    r = unit(np.load(FIXTURES / "direction-64.npy"))
    with Checkpoint(fixture_path("llama")) as a, Checkpoint(tmp_path / "out" / "llama" / "01-ablated") as b:
        for layer in range(3):
            s = math.exp(-((layer - 1) ** 2) / 2)
            name = f"model.layers.{layer}.self_attn.o_proj.weight"
            w = a.array(name).astype(np.float64)
            want = (w - s * np.outer(r, r @ w)).astype(ml_dtypes.bfloat16)
            assert ulp_distance(b.array(name), want, "BF16").max() <= 1


def test_manifests_record_inputs_outputs_and_directions(tmp_path):
    recipe = write_recipe(tmp_path, PIPELINE, models=("llama",))
    run_cli("run", recipe)
    folder = tmp_path / "out" / "llama" / "01-ablated"
    m = manifest.read(folder)
    assert m["kind"] == "ablate" and m["recipe"]["step"] == 1 and len(m["recipe"]["fingerprint"]) == 64
    for name, digest in m["outputs"].items():
        assert manifest.sha256_file(folder / name) == digest
    for name, digest in m["inputs"].items():
        assert manifest.sha256_file(fixture_path("llama") / name) == digest
    assert m["directions"][0]["file_sha256"] == manifest.sha256_file(FIXTURES / "direction-64.npy")
    export_m = manifest.read(tmp_path / "out" / "llama" / "03-onnx")
    assert "onnx/model.onnx" in export_m["outputs"] and export_m["kind"] == "export"
    info = json.loads(run_cli("inspect", folder, "--json").output)
    assert info["manifest"]["outputs"] == m["outputs"]


def test_extract_then_ablate_uses_the_extracted_direction(tmp_path):
    recipe = write_recipe(
        tmp_path,
        f'''
[[step]]
op = "extract"
positive = "{POS}"
negative = "{NEG}"
max_prompts = 12

[[step]]
op = "ablate"
targets = ["embed"]
''',
        models=("llama",),
    )
    run_cli("run", recipe)
    out = tmp_path / "out" / "llama"
    with Checkpoint(out / "01-directions.safetensors") as ck:
        layer = json.loads(ck.files["01-directions.safetensors"].metadata["patcher"])["selected_layer"]
        r = unit(ck.array("direction")[layer])
    with Checkpoint(out / "02-ablated") as b:
        emb = b.array("model.embed_tokens.weight").astype(np.float64)
        assert np.abs(emb @ r).max() < 2e-2


def test_extract_steps_need_both_prompt_sets_and_write_safetensors(tmp_path):
    from patcher.pipelines.recipe import load, validate

    recipe = write_recipe(
        tmp_path,
        f'''
[[step]]
op = "extract"
positive = "{POS}"
output = "dirs"

[[step]]
op = "ablate"
''',
        models=("llama",),
    )
    res = run_cli("run", recipe, expect=1)
    lines = recipe.read_text().splitlines()
    assert f"line {lines.index('[[step]]') + 1}: step 1: extract needs negative" in res.output
    recipe.write_text(recipe.read_text().replace('output = "dirs"', f'negative = "{NEG}"\noutput = "dirs"'))
    (plan,) = validate(load(recipe))
    extract, ablate = plan.actions
    # an output named without a suffix is still a directions file, and the next step reads it
    assert extract.output == tmp_path / "out" / "llama" / "dirs.safetensors"
    assert ablate.options["directions"] == [str(extract.output)]
