"""Hostile and careless input on every command (issue 9): the input is never written, bad input is one
line on stderr (no traceback), a failed or interrupted run leaves nothing, nothing waits forever.

Every case checks the same five things (`hostile`): non-zero exit, at most 3 lines on stderr, no
traceback and no "internal error", no output left (the named output and any hidden partial file beside
it), and the sha256 of every input file unchanged. Cases are tables; each is fast because every check
happens before any work."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO, FIXTURES, fixture_path
from typer.testing import CliRunner

from patcher.cli import app

L_SRC = fixture_path("llama")
PY_CLI = [sys.executable, "-c", "import sys; from patcher.cli import main; sys.argv[0] = 'patcher'; main()"]


# --- workspace -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Copies of the inputs (a bug that writes into an input damages a copy, not the fixtures), plus
    files of the wrong kind, a FIFO, a direction file, an export, a hub-style symlinked snapshot."""
    root = tmp_path_factory.mktemp("hostile")
    w = {"root": root}
    w["L"] = root / "L"
    shutil.copytree(L_SRC, w["L"])
    w["d64"] = root / "d64.npy"
    shutil.copy(FIXTURES / "direction-64.npy", w["d64"])
    w["pos"], w["neg"] = root / "pos.txt", root / "neg.txt"
    shutil.copy(DEMO / "positive.txt", w["pos"])
    shutil.copy(DEMO / "negative.txt", w["neg"])
    w["txt"] = root / "notes.txt"
    w["txt"].write_text("just text\n")
    w["fake_npy"] = root / "fake.npy"
    w["fake_npy"].write_text("not an array")
    w["nan_npy"] = root / "nan.npy"
    v = np.ones(64)
    v[3] = np.nan
    np.save(w["nan_npy"], v)
    w["dep_npy"] = root / "dependent.npy"  # rank 2 in name only: the second row is twice the first
    r = np.random.default_rng(0).standard_normal(64)
    np.save(w["dep_npy"], np.stack([r, 2 * r]))
    w["fifo"] = root / "pipe.txt"
    os.mkfifo(w["fifo"])
    w["fifo_npy"] = root / "pipe.npy"
    os.mkfifo(w["fifo_npy"])
    # a model folder whose second shard is a FIFO
    w["L_fifo"] = root / "L_fifo"
    shutil.copytree(L_SRC, w["L_fifo"])
    shard = w["L_fifo"] / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    # a hub-cache-like snapshot: files are symlinks into blobs/
    snap = root / "models--org--tiny" / "snapshots" / "abc"
    blobs = root / "models--org--tiny" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in L_SRC.iterdir():
        blob = blobs / hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    w["snap"], w["blobs"] = snap, blobs
    w["user_dir"] = root / "user-folder"
    w["user_dir"].mkdir()
    (w["user_dir"] / "thesis.tex").write_text("years of work")
    w["user_file"] = root / "user-file.safetensors"
    w["user_file"].write_bytes(b"mine")
    w["home"] = root / "home"
    w["home"].mkdir()
    (w["home"] / ".bashrc").write_text("# mine")
    return w


@pytest.fixture(scope="module")
def exported(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-export") / "onnx-L"
    res = CliRunner().invoke(app, ["export", str(ws["L"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def dirs_file(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-dirs") / "dirs.safetensors"
    res = CliRunner().invoke(
        app,
        [
            "extract",
            str(ws["L"]),
            "--positive",
            str(ws["pos"]),
            "--negative",
            str(ws["neg"]),
            "-o",
            str(out),
            "--no-chat-template",
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def digests(paths) -> dict:
    out = {}
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for q in files:
            out[str(q)] = hashlib.sha256(q.read_bytes()).hexdigest()
    return out


def leftovers(path: Path) -> list:
    path = Path(path)
    return [p for p in path.parent.glob(f".{path.name}.*")] + ([path] if os.path.lexists(path) else [])


def hostile(args, *, inputs=(), absent=(), code=None, fragment=None, seconds=20.0, runner_env=None):
    """Run `patcher ARGS` in-process and check the five promises. Returns the result."""
    inputs = [Path(p) for p in inputs]
    before = digests(inputs)
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, [str(a) for a in args], env=runner_env)
    took = time.perf_counter() - t0
    stderr = res.stderr
    text = res.output + stderr
    assert res.exit_code != 0, f"exit 0 for {args}\n{text}"
    if code is not None:
        assert res.exit_code == code, f"exit {res.exit_code} (want {code})\n{text}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in text and "internal error" not in text, text
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, f"{len(lines)} lines on stderr:\n{stderr}"
    if fragment is not None:
        assert fragment in " ".join(stderr.split()), f"{fragment!r} not in {stderr!r}"
    for p in absent:
        assert not leftovers(Path(p)), f"left behind: {leftovers(Path(p))}"
    assert digests(inputs) == before, "an input file changed"
    assert took < seconds, f"took {took:.1f} s"
    return res


# --- data loss / input modified ----------------------------------------------------------------------


def test_extract_onto_an_input_shard_is_refused_even_with_force(ws):
    shard = ws["L"] / "model-00002-of-00002.safetensors"
    hostile(
        ["extract", ws["L"], "--positive", ws["pos"], "--negative", ws["neg"], "-o", shard, "--force"],
        inputs=[ws["L"]],
        fragment="output lies inside the input folder",
    )


def test_extract_inside_the_model_folder_is_refused(ws):
    hostile(
        [
            "extract",
            ws["L"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            ws["L"] / "d.safetensors",
        ],
        inputs=[ws["L"]],
        absent=[ws["L"] / "d.safetensors"],
        fragment="lies inside the input",
    )


def test_extract_onto_a_prompt_file_is_refused(ws):
    hostile(
        ["extract", ws["L"], "--positive", ws["pos"], "--negative", ws["neg"], "-o", ws["pos"], "--force"],
        inputs=[ws["pos"], ws["L"]],
        fragment="is the input",
    )


def write_recipe(folder: Path, body: str, output=None, name="recipe.toml", path=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    r = folder / name
    r.write_text(
        f'[[model]]\nname = "L"\npath = "{path or L_SRC}"\noutput = "{output or folder / "out"}"\n\n' + body
    )
    return r


ABLATE_STEP = f'[[step]]\nop = "ablate"\ndirection = "{FIXTURES / "direction-64.npy"}"\n'


def test_recipe_output_equal_to_its_path_is_refused(ws, tmp_path):
    r = write_recipe(tmp_path, ABLATE_STEP, output=ws["L"], path=ws["L"])
    hostile(["run", r], inputs=[ws["L"]], absent=[ws["L"] / "01-ablated"], fragment="is the input")
    assert not (ws["L"] / "patcher-manifest.json").exists()


def test_recipe_step_output_may_not_leave_the_output_folder(ws, tmp_path):
    r = write_recipe(tmp_path, ABLATE_STEP + f'output = "../../{tmp_path.name}-escaped"\n')
    hostile(
        ["run", r],
        absent=[tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-escaped"],
        fragment="leaves the model's output folder",
    )


@pytest.mark.parametrize(
    "out", ["", ".", "./", "~", "~/x"], ids=["empty", "dot", "dot-slash", "tilde", "tilde-x"]
)
def test_output_that_is_not_a_new_path_is_refused(ws, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    hostile(["ablate", ws["L"], "-d", ws["d64"], "-o", out, "--force"], inputs=[tmp_path, ws["L"]])
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_output_home_or_parent_of_cwd_is_refused(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(ws["home"]))
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", ws["home"], "--force"],
        inputs=[ws["home"]],
        fragment="home folder",
    )
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", tmp_path / "a", "--force"],
        inputs=[tmp_path],
        fragment="contains the current folder",
    )


@pytest.mark.parametrize("which", ["user_dir", "user_file"])
def test_force_never_replaces_what_patcher_did_not_write(ws, which):
    hostile(["ablate", ws["L"], "-d", ws["d64"], "-o", ws[which], "--force"], inputs=[ws[which], ws["L"]])
    hostile(
        [
            "extract",
            ws["L"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            ws["user_file"],
            "--force",
        ],
        inputs=[ws["user_file"]],
    )


@pytest.mark.parametrize("where", ["equal", "inside", "contains", "contains-direction"])
def test_output_equal_inside_or_containing_an_input(ws, where):
    out = {
        "equal": ws["L"],
        "inside": ws["L"] / "sub" / "x",
        "contains": ws["root"],
        "contains-direction": ws["root"],
    }[where]
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", out, "--force"],
        inputs=[ws["L"], ws["d64"]],
        absent=[] if where in ("equal", "contains", "contains-direction") else [out],
    )


@pytest.mark.parametrize("target", ["blob", "blobs", "snapshot"])
def test_outputs_never_touch_symlink_targets_of_a_snapshot(ws, target):
    blob = next(ws["blobs"].iterdir())
    out = {"blob": blob, "blobs": ws["blobs"], "snapshot": ws["snap"] / "x"}[target]
    hostile(["ablate", ws["snap"], "-d", ws["d64"], "-o", out, "--force"], inputs=[ws["blobs"]])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e40", "-1e40", "11"])
def test_ablate_scale_must_be_finite_and_in_range(ws, tmp_path, value):
    out = tmp_path / "o"
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", out, "--scale", value],
        inputs=[ws["L"]],
        absent=[out],
        fragment="--scale: must be",
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e40", "70000"])
def test_inject_alpha_must_be_finite_and_fit_the_bias(ws, tmp_path, value):
    out = tmp_path / "o"
    hostile(
        ["inject", ws["L"], "-d", ws["d64"], "-o", out, "--layer", "1", "--alpha", value],
        inputs=[ws["L"]],
        absent=[out],
        fragment="--alpha: must be",
    )


@pytest.mark.parametrize(
    "strength",
    [
        "scale = nan",
        "scale = inf",
        "scale = 1e40",
        "strength = [1.0, nan, 1.0]",
        'strength = { kernel = "gaussian", center = 1, width = 0.0 }',
        'strength = { kernel = "gaussian", center = nan }',
        'strength = { kernel = "linear", start = 0, end = inf }',
        'scale = "big"',
    ],
)
def test_recipe_strengths_are_checked_like_scale(tmp_path, strength):
    r = write_recipe(tmp_path, ABLATE_STEP + strength + "\n")
    hostile(["run", r], absent=[tmp_path / "out"], fragment="step 1")


def test_recipe_and_cli_give_the_same_message(ws, tmp_path):
    cli = hostile(["ablate", ws["L"], "-d", ws["d64"], "-o", tmp_path / "o", "--scale", "nan"])
    rec = hostile(["run", write_recipe(tmp_path, ABLATE_STEP + "scale = nan\n")])
    same = "must be a finite number, got nan"
    assert same in cli.stderr and same in rec.stderr


# --- silently wrong -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers,fragment",
    [
        ("-100", "layer -100 is outside 0..2"),
        ("2-1", "empty range"),
        ("3", "outside 0..2"),
        ("-4", "outside"),
        ("1-x", "cannot read"),
        ("0--100", "outside"),
    ],
)
def test_layers_never_wrap_and_say_empty_range(ws, tmp_path, layers, fragment):
    out = tmp_path / "o"
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", out, f"--layers={layers}"], absent=[out], fragment=fragment
    )


def test_negative_layers_count_from_the_end_exactly(ws, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "ablate",
            str(ws["L"]),
            "-d",
            str(ws["d64"]),
            "-o",
            str(tmp_path / "o"),
            "--layers=-1",
            "--targets",
            "mlp_out",
            "--dry-run",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "model.layers.2.mlp.down_proj.weight" in res.output
    assert "model.layers.0." not in res.output and "model.layers.1." not in res.output


@pytest.mark.parametrize("layer", ["-100", "3", "-4"])
def test_inject_layer_never_wraps(ws, tmp_path, layer):
    hostile(
        ["inject", ws["L"], "-d", ws["d64"], "-o", tmp_path / "o", f"--layer={layer}", "--alpha", "1"],
        absent=[tmp_path / "o"],
        fragment="out of range",
    )


@pytest.mark.parametrize(
    "body,fragment",
    [
        (
            '[[step]]\nop = "extract"\npositive = "{pos}"\nnegative = "{neg}"\nbatch_size = "eight"\n',
            "batch_size: must be an integer, got 'eight'",
        ),
        (
            '[[step]]\nop = "extract"\npositive = "{pos}"\nnegative = "{neg}"\npositions = 0\n',
            "positions: must be >= -1048576 and <= -1, got 0",
        ),
        (
            '[[step]]\nop = "extract"\npositive = "{pos}"\nnegative = "{neg}"\npositions = ["x"]\n',
            "must be an integer",
        ),
        (
            '[[step]]\nop = "extract"\npositive = "{pos}"\nnegative = "{neg}"\nmax_prompts = 0\n',
            "max_prompts: must be",
        ),
        (
            '[[step]]\nop = "extract"\npositive = "{pos}"\nnegative = "{neg}"\nchat_template = "yes"\n',
            "true or false",
        ),
        (ABLATE_STEP + 'targets = ["embed", "mlp_outt"]\n', "did you mean 'mlp_out'"),
        (ABLATE_STEP + "targets = []\n", "targets: is empty"),
        (ABLATE_STEP + 'layers = "2-1"\n', "empty range"),
        (ABLATE_STEP + 'norm_preserve = "row"\n', "did you mean 'rows'"),
        (ABLATE_STEP + "output = 5\n", "output: must be a file or folder name"),
        (
            f'[[step]]\nop = "inject"\ndirection = "{FIXTURES / "direction-64.npy"}"\n'
            "layer = 1\nalpha = nan\n",
            "alpha: must be a finite number",
        ),
        (
            f'[[step]]\nop = "inject"\ndirection = "{FIXTURES / "direction-64.npy"}"\n'
            'layer = "1"\nalpha = 1\n',
            "layer: must be an integer",
        ),
        ('[[step]]\nop = "export"\ndtype = "fp8"\n', "is not one of fp32"),
        (
            f'[[step]]\nop = "ablate"\ndirections = ["{FIXTURES / "direction-64.npy"}", '
            f'"{FIXTURES / "direction-64.npy"}"]\n',
            "linearly dependent",
        ),
        ('[[step]]\nop = "export"\n\n[[step]]\nop = "verify"\ntokens = -1\n', "tokens: must be >= 0"),
        ('[[step]]\nop = "extract"\npositive = "{fifo}"\nnegative = "{neg}"\n', "FIFO"),
    ],
)
def test_recipe_options_validated_up_front(ws, tmp_path, body, fragment):
    """Step 1 is valid and would write: a later step's bad value must stop the run before it starts."""
    first = (
        f'[[step]]\nop = "extract"\npositive = "{ws["pos"]}"\nnegative = "{ws["neg"]}"\n'
        "chat_template = false\n\n"
    )
    r = write_recipe(tmp_path, first + body.format(pos=ws["pos"], neg=ws["neg"], fifo=ws["fifo"]))
    hostile(["run", r], absent=[tmp_path / "out"], fragment=fragment)


def test_recipe_positions_as_one_int_is_accepted(ws, tmp_path):
    body = f'[[step]]\nop = "extract"\npositive = "{ws["pos"]}"\nnegative = "{ws["neg"]}"\npositions = -1\n'
    res = CliRunner().invoke(app, ["run", str(write_recipe(tmp_path, body)), "--dry-run"])
    assert res.exit_code == 0, res.output + res.stderr


def test_failed_verify_step_is_not_recorded_complete(tmp_path, monkeypatch):
    from patcher.onnx import verify as vmod

    monkeypatch.setitem(vmod.TOLERANCE, "fp32", -1.0)  # every parity check fails
    r = write_recipe(tmp_path, '[[step]]\nop = "export"\n\n[[step]]\nop = "verify"\ntokens = 0\n')
    res = CliRunner().invoke(app, ["run", str(r)])
    assert res.exit_code == 1 and "parity failed" in res.stderr and "Traceback" not in res.stderr
    assert not list((tmp_path / "out").glob("02-verify.json.patcher-manifest.json"))
    res = CliRunner().invoke(app, ["run", str(r)])  # re-run: export skipped, verify runs (and fails) again
    assert res.exit_code == 1 and "parity failed" in res.stderr


# --- tracebacks instead of one line ---------------------------------------------------------------------


def test_linearly_dependent_rank_k_directions(ws, tmp_path):
    hostile(
        ["ablate", ws["L"], "-d", ws["dep_npy"], "-o", tmp_path / "o"],
        absent=[tmp_path / "o"],
        fragment="linearly dependent",
    )


def _broken_config(ws, name, change):
    dst = ws["root"] / name
    if not dst.exists():
        shutil.copytree(L_SRC, dst)
        cfg = json.loads((dst / "config.json").read_text())
        change(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


CONFIG_BREAKS = {
    "no-heads": lambda c: c.pop("num_attention_heads"),
    "zero-heads": lambda c: c.update(num_attention_heads=0),
    "bad-act": lambda c: c.update(hidden_act="swoosh"),
    "more-layers": lambda c: c.update(num_hidden_layers=5),
    "fewer-layers": lambda c: c.update(num_hidden_layers=2),
}


@pytest.mark.parametrize("brk", list(CONFIG_BREAKS))
@pytest.mark.parametrize("cmd", ["extract", "export", "ablate"])
def test_config_disagreeing_with_tensors_is_one_line(ws, tmp_path, brk, cmd):
    m = _broken_config(ws, f"L-{brk}", CONFIG_BREAKS[brk])
    out = tmp_path / "o"
    args = {
        "extract": [
            "extract",
            m,
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            tmp_path / "d.safetensors",
        ],
        "export": ["export", m, "-o", out],
        "ablate": ["ablate", m, "-d", ws["d64"], "-o", out],
    }[cmd]
    if cmd == "ablate" and brk in ("no-heads", "zero-heads", "bad-act"):
        pytest.skip("ablate does not run the forward pass: heads and activation do not matter to it")
    hostile(args, inputs=[m], absent=[out, tmp_path / "d.safetensors"])


@pytest.mark.parametrize(
    "opt",
    [
        ["--dtype", "foo"],
        ["--top-k", "100000", "--sample"],
        ["--temperature", "nan"],
        ["--temperature", "0"],
        ["--temperature", "-1"],
        ["--seed", "-1"],
        ["--max-new-tokens", "0"],
        ["--batch-size", "0"],
        ["--provider", "tpu"],
        ["--top-k", "-1"],
        ["--prompt", ""],
    ],
)
def test_generate_bad_options(exported, opt):
    args = ["generate", exported, *([] if "--prompt" in opt else ["--prompt", "hi"]), *opt]
    hostile(args, inputs=[exported])


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"eos_token_id": "two"}', '{"eos_token_id": [1.5]}']
)
def test_generate_malformed_generation_config(exported, tmp_path, content):
    copy = tmp_path / "onnx-copy"
    shutil.copytree(exported, copy)
    (copy / "generation_config.json").write_text(content)
    hostile(["generate", copy, "--prompt", "hi", "--max-new-tokens", "2"], fragment="generation_config.json")


@pytest.mark.parametrize(
    "opt",
    [
        ["--tokens", "-1"],
        ["--tokens", "x"],
        ["--tokens", "100000"],
        ["--dtype", "foo"],
        ["--provider", "tpu"],
    ],
)
def test_verify_bad_options(ws, exported, opt):
    hostile(["verify", exported, "--reference", ws["L"], *opt], inputs=[exported, ws["L"]])


@pytest.fixture(scope="module")
def long_prompt(ws):
    p = ws["root"] / "long.txt"
    p.write_text(" ".join(["sea"] * 120_000) + "\n")
    return p


def test_a_120k_token_prompt_is_refused_up_front(ws, exported, long_prompt, tmp_path):
    out = tmp_path / "d.safetensors"
    hostile(
        [
            "extract",
            ws["L"],
            "--positive",
            long_prompt,
            "--negative",
            ws["neg"],
            "-o",
            out,
            "--no-chat-template",
        ],
        absent=[out],
        fragment="positions",
        seconds=30,
    )
    hostile(
        ["generate", exported, "--prompts", long_prompt, "--no-chat-template"],
        fragment="positions",
        seconds=30,
    )
    hostile(
        ["verify", exported, "--reference", ws["L"], "--prompts", long_prompt, "--no-chat-template"],
        fragment="positions",
        seconds=30,
    )


def test_attention_memory_budget():
    from patcher.errors import PatcherError
    from patcher.model.prompts import check_lengths

    with pytest.raises(PatcherError, match="GiB"):  # no position limit stated: the memory budget refuses
        check_lengths([[1] * 120_000], {}, "prompts.txt", heads=32)
    check_lengths([[1] * 500], {}, "prompts.txt", heads=32)


# --- hangs ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _alarm():
    """A test that waits on a FIFO must fail, not hang the suite."""

    def fail(*_):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifo_in_place_of_a_shard(ws, tmp_path):
    for args in (
        ["inspect", ws["L_fifo"]],
        ["ablate", ws["L_fifo"], "-d", ws["d64"], "-o", tmp_path / "o"],
        [
            "extract",
            ws["L_fifo"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            tmp_path / "d.safetensors",
        ],
        ["export", ws["L_fifo"], "-o", tmp_path / "e"],
        ["diff", ws["L"], ws["L_fifo"]],
    ):
        hostile(args, absent=[tmp_path / "o", tmp_path / "e"], seconds=10)


@pytest.mark.parametrize(
    "role", ["prompt", "direction", "config", "tokenizer", "recipe", "arch-table", "template"]
)
def test_fifo_inputs_never_block(ws, tmp_path, role):
    m = ws["root"] / f"L-fifo-{role}"
    if role in ("config", "tokenizer", "template") and not m.exists():
        shutil.copytree(L_SRC, m)
        name = {"config": "config.json", "tokenizer": "tokenizer.json", "template": "chat_template.jinja"}[
            role
        ]
        (m / name).unlink(missing_ok=True)
        os.mkfifo(m / name)
    out = tmp_path / "d.safetensors"
    args = {
        "prompt": ["extract", ws["L"], "--positive", ws["fifo"], "--negative", ws["neg"], "-o", out],
        "direction": ["ablate", ws["L"], "-d", ws["fifo_npy"], "-o", tmp_path / "o"],
        "config": ["inspect", m],
        "tokenizer": ["extract", m, "--positive", ws["pos"], "--negative", ws["neg"], "-o", out],
        "template": ["extract", m, "--positive", ws["pos"], "--negative", ws["neg"], "-o", out],
        "recipe": ["run", ws["fifo"]],
        "arch-table": ["inspect", ws["L"], "--arch-table", ws["fifo"]],
    }[role]
    hostile(args, absent=[out, tmp_path / "o"], seconds=10)


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
        "{{ 'x' * 1000000000 }}",
        "{% set l = [1,2,3,4,5,6,7,8,9,10] %}" + "{% for a in l %}" * 9 + "{% endfor %}" * 9,
    ],
    ids=["nested-range", "nested-range-output", "huge-string", "nested-lists"],
)
def test_chat_template_rendering_is_bounded(ws, tmp_path, template):
    m = tmp_path / "L-template"
    shutil.copytree(L_SRC, m)
    (m / "chat_template.jinja").write_text(template)
    out = tmp_path / "d.safetensors"
    hostile(
        ["extract", m, "--positive", ws["pos"], "--negative", ws["neg"], "-o", out],
        absent=[out],
        fragment="chat template stopped",
        seconds=8,
    )


# --- leftovers ----------------------------------------------------------------------------------------


def test_sigint_during_extract_removes_the_partial_file(ws, tmp_path):
    """A real Ctrl-C while the directions file is being written: the writer is slowed down so the
    signal lands mid-write; the hidden partial file is gone and the message says so."""
    out = tmp_path / "d.safetensors"
    slow = (
        "import sys, time; import patcher.io.writer as w; _p = w._pwrite_all\n"
        "def slow(*a):\n    time.sleep(0.5); _p(*a)\n"
        "w._pwrite_all = slow\nfrom patcher.cli import main; sys.argv[0] = 'patcher'; main()"
    )
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            slow,
            "extract",
            str(ws["L"]),
            "--positive",
            str(ws["pos"]),
            "--negative",
            str(ws["neg"]),
            "-o",
            str(out),
            "--no-chat-template",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".d.safetensors.partial-*")):
        time.sleep(0.01)
    assert list(tmp_path.glob(".d.safetensors.partial-*")), "never started writing"
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "partial files removed" in stderr and "Traceback" not in stderr
    assert not leftovers(out)


def test_plot_type_is_checked_before_any_work(ws, tmp_path):
    out = tmp_path / "d.safetensors"
    hostile(
        [
            "extract",
            ws["L"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            out,
            "--plot",
            tmp_path / "x.jpg",
        ],
        absent=[out, tmp_path / "x.jpg"],
        fragment="plot files are .svg",
    )


def test_plot_equal_to_an_input_or_the_output(ws, tmp_path):
    out = tmp_path / "d.safetensors"
    hostile(
        ["extract", ws["L"], "--positive", ws["pos"], "--negative", ws["neg"], "-o", out, "--plot", out],
        absent=[out],
        fragment="plot files are .svg",
    )
    hostile(
        [
            "extract",
            ws["L"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            out,
            "--plot",
            ws["L"] / "p.svg",
        ],
        absent=[out, ws["L"] / "p.svg"],
        inputs=[ws["L"]],
        fragment="inside the input",
    )


def test_svg_title_is_escaped(ws, tmp_path):
    m = tmp_path / "a&b<c"
    shutil.copytree(L_SRC, m)
    out, svg = tmp_path / "d.safetensors", tmp_path / "p.svg"
    res = CliRunner().invoke(
        app,
        [
            "extract",
            str(m),
            "--positive",
            str(ws["pos"]),
            "--negative",
            str(ws["neg"]),
            "-o",
            str(out),
            "--plot",
            str(svg),
            "--no-chat-template",
        ],
    )
    assert res.exit_code == 0, res.output + res.stderr
    root = ET.parse(svg).getroot()  # raises on invalid XML
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.text and "a&b<c" in t.text]
    assert titles == ["a&b<c: difference-in-means scores"]
    # the plot carries patcher's mark: --force may replace it, and only it
    res = CliRunner().invoke(
        app,
        [
            "extract",
            str(m),
            "--positive",
            str(ws["pos"]),
            "--negative",
            str(ws["neg"]),
            "-o",
            str(out),
            "--plot",
            str(svg),
            "--no-chat-template",
            "--force",
        ],
    )
    assert res.exit_code == 0, res.output + res.stderr


def _strict_json(text):
    def bad(c):
        raise ValueError(f"not JSON: {c}")

    return json.loads(text, parse_constant=bad)


def test_metadata_json_never_contains_infinity(tmp_path):
    from patcher.edit.directions import read_metadata
    from patcher.edit.extract import ExtractResult
    from patcher.io.checkpoint import Checkpoint

    t = np.ones((4, 8), np.float32)
    scores = [{"layer": 0, "snr": float("inf"), "diff_norm": float("nan")}, {"layer": 1, "snr": 2.5}]
    ExtractResult(
        t, t, t, scores, 1, metadata={"selected_layer": 1, "scores": scores, "x": np.float32("inf")}
    ).save(tmp_path / "d.safetensors")
    with Checkpoint(tmp_path / "d.safetensors") as ck:
        raw = next(iter(ck.files.values())).metadata["patcher"]
        _strict_json(raw)
        meta = read_metadata(ck)
    assert meta["scores"][0]["snr"] is None and meta["scores"][1]["snr"] == 2.5 and meta["x"] is None


def test_json_outputs_are_strict_json(ws, dirs_file, tmp_path):
    res = CliRunner().invoke(app, ["inspect", str(ws["L"]), "--json"])
    _strict_json(res.stdout)
    res = CliRunner().invoke(app, ["diff", str(ws["L"]), str(ws["L"]), "--json"])
    _strict_json(res.stdout)


# --- every command × every kind of bad input ------------------------------------------------------


def _cases(ws, exported, dirs_file, tmp):
    """(command, kind, args, inputs, absent outputs, exit code or None)."""
    L, d64, pos, neg = ws["L"], ws["d64"], ws["pos"], ws["neg"]
    o, d = tmp / "o", tmp / "d.safetensors"
    ex = ["extract", L, "--positive", pos, "--negative", neg, "-o", d]
    ab = ["ablate", L, "-d", d64, "-o", o]
    inj = ["inject", L, "-d", d64, "-o", o, "--layer", "1", "--alpha", "2"]
    exp = ["export", L, "-o", o]
    gen = ["generate", exported, "--prompt", "hi", "--max-new-tokens", "2"]
    ver = ["verify", exported, "--reference", L, "--tokens", "1"]
    rec = write_recipe(tmp / "r", ABLATE_STEP)
    cg = tmp / "c.gguf"
    cv = ["convert", L, "-o", cg]
    return [
        ("inspect", "wrong type", ["inspect", L, "--json=3"], [L], [], None),
        ("inspect", "missing file", ["inspect", tmp / "nope"], [], [], None),
        ("inspect", "wrong kind", ["inspect", d64], [d64], [], None),
        ("inspect", "wrong kind", ["inspect", L, "--arch-table", d64], [d64], [], None),
        ("inspect", "out of range", ["inspect", L, "--arch-table", ws["txt"]], [], [], None),
        ("extract", "wrong type", ex + ["--batch-size", "eight"], [L], [d], None),
        ("extract", "out of range", ex + ["--batch-size", "0"], [L], [d], None),
        ("extract", "out of range", ex + ["--positions", "0"], [L], [d], None),
        ("extract", "out of range", ex + ["--positions=-1000000000"], [L], [d], None),
        ("extract", "out of range", ex + ["--layers", "9"], [L], [d], None),
        ("extract", "out of range", ex + ["--max-prompts", "0"], [L], [d], None),
        ("extract", "NaN", ex + ["--positions", "nan"], [L], [d], None),
        (
            "extract",
            "missing file",
            ["extract", L, "--positive", tmp / "nope.txt", "--negative", neg, "-o", d],
            [L],
            [d],
            None,
        ),
        (
            "extract",
            "wrong kind",
            ["extract", L, "--positive", d64, "--negative", neg, "-o", d],
            [L],
            [d],
            None,
        ),
        (
            "extract",
            "wrong kind",
            ["extract", L, "--positive", L, "--negative", neg, "-o", d],
            [L],
            [d],
            None,
        ),
        (
            "extract",
            "wrong kind",
            ["extract", L, "--positive", pos, "--negative", neg, "-o", tmp / "d.npy"],
            [L],
            [tmp / "d.npy"],
            None,
        ),
        (
            "extract",
            "inside input",
            ["extract", L, "--positive", pos, "--negative", neg, "-o", L / "x.safetensors"],
            [L],
            [L / "x.safetensors"],
            None,
        ),
        ("ablate", "wrong type", ab + ["--scale", "abc"], [L], [o], None),
        ("ablate", "wrong type", ab + ["--targets", "embed,mlp_outt"], [L], [o], None),
        ("ablate", "wrong type", ab + ["--norm-preserve", "diag"], [L], [o], None),
        ("ablate", "out of range", ab + ["--scale", "1e40"], [L], [o], None),
        ("ablate", "out of range", ab + ["--layers=-100"], [L], [o], None),
        ("ablate", "out of range", ["ablate", L, "-d", f"{dirs_file}:99", "-o", o], [L], [o], None),
        ("ablate", "NaN", ab + ["--scale", "nan"], [L], [o], None),
        ("ablate", "NaN", ["ablate", L, "-d", ws["nan_npy"], "-o", o], [L], [o], None),
        ("ablate", "missing file", ["ablate", L, "-d", tmp / "nope.npy", "-o", o], [L], [o], None),
        ("ablate", "missing file", ["ablate", tmp / "nope", "-d", d64, "-o", o], [], [o], None),
        ("ablate", "wrong kind", ["ablate", L, "-d", ws["fake_npy"], "-o", o], [L], [o], None),
        ("ablate", "wrong kind", ["ablate", L, "-d", pos, "-o", o], [L], [o], None),
        ("ablate", "wrong kind", ["ablate", L, "-d", L, "-o", o], [L], [o], None),
        ("ablate", "wrong kind", ["ablate", d64, "-d", d64, "-o", o], [d64], [o], None),
        ("ablate", "inside input", ["ablate", L, "-d", d64, "-o", L / "edited"], [L], [L / "edited"], None),
        (
            "inject",
            "wrong type",
            ["inject", L, "-d", d64, "-o", o, "--layer", "x", "--alpha", "1"],
            [L],
            [o],
            None,
        ),
        ("inject", "wrong type", inj + ["--target", "embed"], [L], [o], None),
        (
            "inject",
            "out of range",
            ["inject", L, "-d", d64, "-o", o, "--layer", "99", "--alpha", "1"],
            [L],
            [o],
            None,
        ),
        (
            "inject",
            "out of range",
            ["inject", L, "-d", d64, "-o", o, "--layer", "1", "--alpha", "1e40"],
            [L],
            [o],
            None,
        ),
        (
            "inject",
            "NaN",
            ["inject", L, "-d", d64, "-o", o, "--layer", "1", "--alpha", "nan"],
            [L],
            [o],
            None,
        ),
        (
            "inject",
            "missing file",
            ["inject", L, "-d", tmp / "n.npy", "-o", o, "--layer", "1", "--alpha", "1"],
            [L],
            [o],
            None,
        ),
        (
            "inject",
            "wrong kind",
            ["inject", L, "-d", ws["dep_npy"], "-o", o, "--layer", "1", "--alpha", "1"],
            [L],
            [o],
            None,
        ),
        (
            "inject",
            "inside input",
            ["inject", L, "-d", d64, "-o", L / "i", "--layer", "1", "--alpha", "1"],
            [L],
            [L / "i"],
            None,
        ),
        ("export", "wrong type", exp + ["--opset", "x"], [L], [o], None),
        ("export", "wrong type", exp + ["--dtype", "fp8"], [L], [o], None),
        ("export", "out of range", exp + ["--int4-block", "3", "--dtype", "int4"], [L], [o], None),
        ("export", "out of range", exp + ["--int4-accuracy", "9", "--dtype", "int4"], [L], [o], None),
        ("export", "out of range", exp + ["--opset", "5"], [L], [o], None),
        ("export", "NaN", exp + ["--int4-block", "nan"], [L], [o], None),
        ("export", "missing file", ["export", tmp / "nope", "-o", o], [], [o], None),
        ("export", "wrong kind", ["export", pos, "-o", o], [pos], [o], None),
        ("export", "inside input", ["export", L, "-o", L / "onnx"], [L], [L / "onnx"], None),
        ("generate", "wrong type", gen + ["--max-new-tokens", "x"], [exported], [], None),
        ("generate", "out of range", gen + ["--top-k", "100000", "--sample"], [exported], [], None),
        ("generate", "out of range", gen + ["--max-new-tokens", "100000"], [exported], [], None),
        ("generate", "NaN", gen + ["--temperature", "nan", "--sample"], [exported], [], None),
        (
            "generate",
            "missing file",
            ["generate", exported, "--prompts", tmp / "nope.txt"],
            [exported],
            [],
            None,
        ),
        ("generate", "missing file", ["generate", tmp / "nope", "--prompt", "hi"], [], [], None),
        ("generate", "wrong kind", ["generate", exported, "--prompts", d64], [exported], [], None),
        ("generate", "wrong kind", ["generate", ws["txt"], "--prompt", "hi"], [], [], None),
        ("verify", "wrong type", ver + ["--tokens", "x"], [exported, L], [], None),
        ("verify", "out of range", ver + ["--tokens=-1"], [exported, L], [], None),
        ("verify", "NaN", ver + ["--tokens", "nan"], [exported, L], [], None),
        ("verify", "missing file", ["verify", exported, "--reference", tmp / "nope"], [exported], [], None),
        ("verify", "missing file", ver + ["--prompts", tmp / "nope.txt"], [exported], [], None),
        ("verify", "wrong kind", ver + ["--prompts", d64], [exported], [], None),
        ("verify", "wrong kind", ["verify", L, "--reference", L], [L], [], None),
        ("verify", "NaN", ver + ["-d", ws["nan_npy"]], [exported], [], None),
        ("diff", "wrong type", ["diff", L, L, "-d", "5"], [L], [], 2),
        ("diff", "out of range", ["diff", L, L, "-d", f"{dirs_file}:99"], [L], [], 2),
        ("diff", "NaN", ["diff", L, L, "-d", ws["nan_npy"]], [L], [], 2),
        ("diff", "missing file", ["diff", L, tmp / "nope"], [L], [], 2),
        ("diff", "wrong kind", ["diff", L, pos], [L], [], 2),
        ("diff", "wrong kind", ["diff", L, L, "--save-direction", tmp / "r.txt"], [L], [tmp / "r.txt"], 2),
        ("diff", "inside input", ["diff", L, L, "--save-direction", L / "r.npy"], [L], [L / "r.npy"], 2),
        ("diff", "inside input", ["diff", L, L, "--save-direction", d64, "--force"], [d64], [], 2),
        ("diff", "wrong type", ["diff", L, L, "--bogus"], [L], [], 2),
        (
            "run",
            "wrong type",
            ["run", write_recipe(tmp / "r1", ABLATE_STEP + "layers = 1.5\n")],
            [],
            [tmp / "r1" / "out"],
            None,
        ),
        (
            "run",
            "out of range",
            [
                "run",
                write_recipe(
                    tmp / "r2", f'[[step]]\nop = "inject"\ndirection = "{d64}"\nlayer = 99\nalpha = 1\n'
                ),
            ],
            [],
            [tmp / "r2" / "out"],
            None,
        ),
        (
            "run",
            "NaN",
            ["run", write_recipe(tmp / "r3", ABLATE_STEP + "scale = nan\n")],
            [],
            [tmp / "r3" / "out"],
            None,
        ),
        ("run", "missing file", ["run", tmp / "nope.toml"], [], [], None),
        ("run", "wrong kind", ["run", d64], [d64], [], None),
        (
            "run",
            "wrong kind",
            ["run", write_recipe(tmp / "r4", "[[step]]\nop = 3\n")],
            [],
            [tmp / "r4" / "out"],
            None,
        ),
        (
            "run",
            "wrong kind",
            ["run", write_recipe(tmp / "r5", "step = 3\n")],
            [],
            [tmp / "r5" / "out"],
            None,
        ),
        (
            "run",
            "inside input",
            ["run", write_recipe(tmp / "r6", ABLATE_STEP, output=L / "out", path=L)],
            [L],
            [L / "out"],
            None,
        ),
        (
            "run",
            "inside input",
            ["run", write_recipe(tmp / "r7", ABLATE_STEP, output=tmp / "r7")],
            [rec],
            [tmp / "r7" / "01-ablated"],
            None,
        ),
        ("run", "wrong type", ["run", rec, "--jobs", "two"], [], [], None),
        ("audit", "wrong type", ["audit", L, "--plot", tmp / "p.jpg"], [L], [tmp / "p.jpg"], 2),
        ("audit", "missing file", ["audit", tmp / "nope"], [], [], 2),
        ("audit", "wrong kind", ["audit", pos], [pos], [], 2),
        ("audit", "wrong kind", ["audit", L, "--arch-table", d64], [d64, L], [], 2),
        ("audit", "inside input", ["audit", L, "--save-direction", L / "r.npy"], [L], [L / "r.npy"], 2),
        ("audit", "inside input", ["audit", L, "--save-direction", d64, "--force"], [d64], [], 2),
        (
            "audit",
            "out of range",
            ["audit", L, "--save-direction", tmp / "x.npy", "--plot", tmp / "x.npy"],
            [L],
            [tmp / "x.npy"],
            2,
        ),
        ("convert", "wrong type", cv + ["--type", "Q4_K"], [L], [cg], None),
        ("convert", "wrong type", cv + ["--dtype", "int3"], [L], [cg], None),
        ("convert", "wrong kind", cv + ["--to", "hf"], [L], [cg], None),
        ("convert", "wrong kind", ["convert", d64, "-o", o], [d64], [o], None),
        ("convert", "missing file", ["convert", tmp / "nope", "-o", o], [], [o], None),
        ("convert", "inside input", ["convert", L, "-o", L / "x.gguf"], [L], [L / "x.gguf"], None),
        ("demo", "wrong kind", ["demo", "--out", ws["txt"]], [ws["txt"]], [], None),
        ("demo", "wrong kind", ["demo", "--out", ws["user_dir"]], [ws["user_dir"]], [], None),
        (
            "demo",
            "inside input",
            ["demo", "--out", DEMO / "model" / "x"],
            [DEMO / "model"],
            [DEMO / "model" / "x"],
            None,
        ),
        ("demo", "inside input", ["demo", "--out", DEMO], [DEMO], [], None),
        ("demo", "wrong type", ["demo", "--out"], [], [], None),
    ]


def test_every_command_every_kind(ws, exported, dirs_file, tmp_path):
    """One table over every command; `interrupted` is its own test below."""
    cases = _cases(ws, exported, dirs_file, tmp_path)
    assert {c[0] for c in cases} == {
        "inspect",
        "extract",
        "ablate",
        "inject",
        "export",
        "generate",
        "verify",
        "diff",
        "run",
        "demo",
        "audit",
        "convert",
    }
    failures = []
    for cmd, kind, args, inputs, absent, code in cases:
        try:
            hostile(args, inputs=inputs, absent=absent, code=code, seconds=15)
        except AssertionError as e:
            failures.append(f"{cmd} / {kind}: {[str(a) for a in args[1:]]}: {str(e)[:300]}")
    assert not failures, "\n".join(failures)


INTERRUPT_AT = {  # command -> (a function in the middle of its work, patched to raise Ctrl-C)
    "extract": "patcher.edit.directions.write_safetensors",
    "ablate": "patcher.edit.shards.ShardWriter",
    "inject": "patcher.edit.shards.ShardWriter",
    "export": "patcher.onnx.export.build",
    "generate": "patcher.onnx.runtime.OnnxModel.generate",
    "verify": "patcher.onnx.verify.greedy_numpy",
    "diff": "patcher.edit.diff._analyse",
    "inspect": "patcher.cli.inspect.describe",
    "run": "patcher.pipelines.recipe.run_action",
    "demo": "patcher.edit.extract.select_layer",
    "audit": "patcher.edit.audit.audit",
    "convert": "patcher.pipelines.convert.write_gguf",
}


@pytest.mark.parametrize("cmd", list(INTERRUPT_AT))
def test_interrupted_leaves_nothing_and_says_so(ws, exported, tmp_path, monkeypatch, cmd):
    import importlib

    target = INTERRUPT_AT[cmd]
    mod_name, _, attr = target.rpartition(".")
    try:
        owner = importlib.import_module(mod_name)
    except ModuleNotFoundError:
        mod_name, _, cls = mod_name.rpartition(".")
        owner = getattr(importlib.import_module(mod_name), cls)
    getattr(owner, attr)  # the patched name exists

    def interrupted(*a, **k):
        if cmd in ("extract", "ablate", "inject", "convert"):  # start the partial file, then be interrupted
            Path(a[0]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, attr, interrupted)
    o, d = tmp_path / "o", tmp_path / "d.safetensors"
    args = {
        "extract": [
            "extract",
            ws["L"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            d,
            "--no-chat-template",
        ],
        "ablate": ["ablate", ws["L"], "-d", ws["d64"], "-o", o],
        "inject": ["inject", ws["L"], "-d", ws["d64"], "-o", o, "--layer", "1", "--alpha", "1"],
        "export": ["export", ws["L"], "-o", o],
        "generate": ["generate", exported, "--prompt", "hi", "--max-new-tokens", "2"],
        "verify": ["verify", exported, "--reference", ws["L"], "--tokens", "1"],
        "diff": ["diff", ws["L"], ws["snap"]],
        "inspect": ["inspect", ws["L"]],
        "run": ["run", write_recipe(tmp_path / "r", ABLATE_STEP)],
        "demo": ["demo", "--out", o],
        "audit": ["audit", ws["L"], "--save-direction", tmp_path / "r.npy"],
        "convert": ["convert", ws["L"], "-o", tmp_path / "o.gguf"],
    }[cmd]
    if cmd == "diff":  # the snapshot is byte-identical: make it differ so the analysis runs
        args = ["diff", ws["L"], _broken_config(ws, "L-edited-for-diff", lambda c: None)]
        _edit_one_tensor(args[2])
    res = hostile(
        args,
        inputs=[ws["L"], ws["d64"]],
        absent=[o, d, tmp_path / "r" / "out" / "01-ablated", tmp_path / "o.gguf"],
        code=130,
    )
    assert "interrupted" in res.stderr
    if cmd in ("extract", "ablate", "inject", "export", "demo", "convert"):
        assert "removed" in res.stderr


def _edit_one_tensor(folder: Path):
    shard = folder / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-4] ^= 0x01
    shard.write_bytes(bytes(data))


# --- the output gate itself -----------------------------------------------------------------------


def test_force_replaces_previous_patcher_outputs_only(ws, tmp_path):
    from patcher.errors import PatcherError
    from patcher.io.paths import check_output, is_patcher_output

    o = tmp_path / "o"
    res = CliRunner().invoke(app, ["ablate", str(ws["L"]), "-d", str(ws["d64"]), "-o", str(o), "--no-hash"])
    assert res.exit_code == 0, res.stderr
    assert is_patcher_output(o)
    check_output(o, [ws["L"]], force=True)
    with pytest.raises(PatcherError, match="already exists"):
        check_output(o, [ws["L"]])
    np.save(tmp_path / "unit.npy", np.eye(4, dtype=np.float32)[0])
    np.save(tmp_path / "mine.npy", np.ones(4, dtype=np.float32))
    for name in ("unit.npy", "mine.npy"):  # a unit vector is what users own most: only a record counts
        with pytest.raises(PatcherError, match="not written by patcher"):
            check_output(tmp_path / name, force=True, kind="file")
    (tmp_path / "a.svg").write_text("<svg/>")
    with pytest.raises(PatcherError, match="not written by patcher"):
        check_output(tmp_path / "a.svg", force=True, kind="file")
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", [ws["L"]])
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(PatcherError, match="symbolic link"):
        check_output(tmp_path / "link", [ws["L"]], force=True)


# --- issue 22: races, foreign files, recorded ownership -----------------------------------------------


def _during_write(monkeypatch, module, name, action):
    """Run `action()` once, the first time `module.name` is called (mid-run, before the output is
    published): the user acting on the output path while patcher works."""
    import threading

    orig, done, once = getattr(module, name), [], threading.Lock()

    def wrapped(*a, **kw):
        with once:  # shards are written from several threads
            if not done:
                done.append(action() or True)
        return orig(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return done


def _users_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")


@pytest.mark.parametrize("force", [False, True])
def test_folder_created_during_an_ablate_is_never_replaced(ws, tmp_path, monkeypatch, force):
    """Item 1: the target is checked at the start; what the user puts there during the run survives
    (with --force, a previous patcher output swapped for the user's folder mid-run is not replaced)."""
    import patcher.io.writer as w

    out = tmp_path / "out"
    if force:
        res = CliRunner().invoke(app, [str(a) for a in ("ablate", ws["L"], "-d", ws["d64"], "-o", out)])
        assert res.exit_code == 0, res.output
    done = _during_write(monkeypatch, w, "_write_produced", lambda: _users_folder(out))
    res = hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", out, "--no-hash", *(["--force"] * force)],
        inputs=[ws["L"]],
        fragment="left untouched",
    )
    assert done and sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], res.stderr


def test_file_created_during_an_extract_is_never_replaced(ws, tmp_path, monkeypatch):
    import patcher.edit.directions as dmod

    out = tmp_path / "d.safetensors"
    done = _during_write(monkeypatch, dmod, "write_safetensors", lambda: out.write_bytes(b"mine"))
    hostile(
        [
            "extract",
            ws["L"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            out,
            "--no-chat-template",
        ],
        inputs=[ws["L"], ws["pos"], ws["neg"]],
        fragment="left untouched",
    )
    assert done and out.read_bytes() == b"mine"
    assert not list(tmp_path.glob(".d.safetensors.*"))


def test_adding_an_export_variant_keeps_the_users_files(exported, tmp_path):
    """Item 2: `export M -o E --dtype int8` onto an export holding the user's notes is refused, naming
    them; nothing in E changes."""
    e = tmp_path / "E"
    shutil.copytree(exported, e)
    (e / "NOTES.md").write_text("my notes")
    (e / "results").mkdir()
    (e / "results" / "run1.csv").write_text("1,2")
    before = digests([e])
    res = hostile(["export", L_SRC, "-o", e, "--dtype", "int8"], inputs=[e], fragment="does not list")
    assert "NOTES.md" in res.stderr and "results/" in res.stderr
    assert digests([e]) == before and not (e / "onnx" / "model_int8.onnx").exists()


@pytest.mark.parametrize(
    "manifest_text",
    ["", "{}", '{"outputs": {"thesis.tex": "x"}}', "[1, 2]", '{"patcher": 1, "kind": "edit", "outputs": {}}'],
)
def test_force_needs_a_manifest_valid_by_content(ws, tmp_path, manifest_text):
    """Item 4: a file merely named patcher-manifest.json does not make a folder patcher's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "patcher-manifest.json").write_text(manifest_text)
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", out, "--force"],
        inputs=[ws["L"], out],
        fragment="not a valid manifest",
    )


def test_recipe_rerun_keeps_the_users_files_in_a_changed_step(tmp_path):
    """Item 5: a step whose options changed is redone; a file the user added to its folder is named and
    kept, nothing is replaced."""
    r = write_recipe(tmp_path, ABLATE_STEP)
    assert CliRunner().invoke(app, ["run", str(r)]).exit_code == 0
    step = tmp_path / "out" / "01-ablated"
    (step / "NOTES.md").write_text("my notes")
    r.write_text(r.read_text() + "strength = 0.5\n")
    before = digests([step])
    res = hostile(["run", r], inputs=[step], fragment="does not list")
    assert "NOTES.md" in res.stderr and digests([step]) == before


def test_force_never_replaces_a_users_unit_vector(ws, tmp_path):
    """Item 6: ownership of --save-direction files is recorded when patcher writes them, not guessed:
    a hand-made float32 unit vector is refused; patcher's own earlier file is replaced."""
    edited = tmp_path / "edited"  # diff recovers the ablated direction: a unit float32 vector
    res = CliRunner().invoke(app, [str(a) for a in ("ablate", ws["L"], "-d", ws["d64"], "-o", edited)])
    assert res.exit_code == 0, res.output
    mine = tmp_path / "mine.npy"
    np.save(mine, np.eye(64, dtype=np.float32)[3])
    before = mine.read_bytes()
    hostile(
        ["diff", ws["L"], edited, "--save-direction", mine, "--force"],
        inputs=[ws["L"], mine],
        fragment="was not written by patcher",
    )
    assert mine.read_bytes() == before
    ours = tmp_path / "ours.npy"
    for extra in ([], ["--force"]):
        res = CliRunner().invoke(
            app, [str(a) for a in ("diff", ws["L"], edited, "--save-direction", ours, *extra)]
        )
        assert res.exit_code == 1 and ours.is_file(), res.output  # diff: 1 = the models differ
    assert abs(float(np.linalg.norm(np.load(ours))) - 1) < 1e-4
    np.save(ours, np.load(ours))  # the user rewrote it: theirs now
    hostile(
        ["diff", ws["L"], edited, "--save-direction", ours, "--force"],
        inputs=[ours],
        fragment="was not written by patcher",
    )


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_two_runs_writing_one_output_cannot_both_win(ws, tmp_path, kind):
    """The second run writing an output another run is writing stops before any work, one clear line."""
    from patcher.io.atomic import OutputLock

    out = tmp_path / ("out" if kind == "folder" else "d.safetensors")
    args = (
        ["ablate", ws["L"], "-d", ws["d64"], "-o", out]
        if kind == "folder"
        else [
            "extract",
            ws["L"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            out,
            "--no-chat-template",
        ]
    )
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(tmp_path / ('.' + out.name + '.lock'))!r}, 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 1 and "another patcher run is writing this output" in res.stderr, res.output
        assert not out.exists()
    finally:
        other.kill()
        other.wait()
    OutputLock(out).acquire().release()  # free again once the other run is gone


# --- issue 22: errors that are one clear line ---------------------------------------------------------


def test_step_error_in_a_worker_keeps_its_message(tmp_path):
    """`run --jobs 2`: a step's PatcherError pickles back from the worker (it read "internal error:
    BrokenProcessPool")."""
    import pickle

    from patcher.errors import CheckpointError, PatcherError

    for cls in (PatcherError, CheckpointError):
        e = pickle.loads(pickle.dumps(cls("f.safetensors", "bad header")))
        assert type(e) is cls and str(e) == "f.safetensors: bad header"
    models = "".join(
        f'[[model]]\nname = "{n}"\npath = "{L_SRC}"\noutput = "{tmp_path / n}"\n\n' for n in "ab"
    )
    r = tmp_path / "r.toml"
    r.write_text(models + ABLATE_STEP)
    assert CliRunner().invoke(app, ["run", str(r), "--jobs", "2"]).exit_code == 0
    (tmp_path / "b" / "01-ablated" / "NOTES.md").write_text("mine")
    r.write_text(models + ABLATE_STEP + "strength = 0.5\n")
    res = hostile(["run", r, "--jobs", 2], fragment="does not list")
    assert "NOTES.md" in res.stderr and "BrokenProcessPool" not in res.stderr


def test_disk_full_names_the_output(ws, tmp_path, monkeypatch):
    import errno

    import patcher.io.writer as w

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w, "_pwrite_all", full)
    out = tmp_path / "d.safetensors"
    hostile(
        [
            "extract",
            ws["L"],
            "--positive",
            ws["pos"],
            "--negative",
            ws["neg"],
            "-o",
            out,
            "--no-chat-template",
        ],
        absent=[out],
        fragment=f"{out}: cannot write this output (No space left",
    )


def test_a_closed_pipe_is_not_an_error(ws, tmp_path):
    """`patcher diff A B | head`: the reader leaving is not reported as "error: : Broken pipe"."""
    p = subprocess.Popen(
        [*PY_CLI, "diff", str(ws["L"]), str(ws["L"]), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # the reader is gone before the first line
    stderr = p.stderr.read()
    p.wait(timeout=60)
    assert "Broken pipe" not in stderr and "error" not in stderr and "Traceback" not in stderr, stderr


def test_output_through_an_input_file_and_missing_parent_folders(ws, tmp_path):
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", ws["d64"] / "out"],
        inputs=[ws["d64"]],
        fragment="runs through the input file",
    )
    missing = tmp_path / "nonexistent" / "x" / "o"
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", missing],
        inputs=[ws["L"]],
        fragment="does not exist; create it first",
    )
    assert not (tmp_path / "nonexistent").exists()


# --- issue 22: non-finite data ------------------------------------------------------------------------


def _poisoned_copy(tmp_path: Path, tensor: str = "model.layers.0.self_attn.o_proj.weight") -> Path:
    """A copy of tiny-llama with four BF16 NaN (0x7FC0) in one tensor."""
    import struct

    m = tmp_path / "poisoned"
    shutil.copytree(L_SRC, m)
    for f in sorted(m.glob("*.safetensors")):
        raw = bytearray(f.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        if tensor in header:
            begin = 8 + n + header[tensor]["data_offsets"][0]
            for i in (0, 5, 17, 63):
                raw[begin + 2 * i : begin + 2 * i + 2] = struct.pack("<H", 0x7FC0)
            f.write_bytes(bytes(raw))
            return m
    raise AssertionError(tensor)


def test_ablate_refuses_non_finite_writers(ws, tmp_path):
    """4 NaN in one writer used to become 256 in the output, exit 0."""
    m = _poisoned_copy(tmp_path)
    out = tmp_path / "out"
    res = hostile(["ablate", m, "-d", ws["d64"], "-o", out], inputs=[m], absent=[out], fragment="NaN or Inf")
    assert "model.layers.0.self_attn.o_proj.weight" in res.stderr


@pytest.mark.parametrize("damage", ["weights", "rms_norm_eps", "rope_theta"])
def test_extract_refuses_a_non_finite_residual_stream(ws, tmp_path, damage):
    """An all-NaN directions file with a NaN "selected" layer used to be written, exit 0."""
    if damage == "weights":
        m = _poisoned_copy(tmp_path, "model.layers.1.mlp.down_proj.weight")
    else:
        m = tmp_path / "m"
        shutil.copytree(L_SRC, m)
        cfg = json.loads((m / "config.json").read_text())
        cfg[damage] = -1.0 if damage == "rms_norm_eps" else 0.0
        (m / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "d.safetensors"
    hostile(
        ["extract", m, "--positive", ws["pos"], "--negative", ws["neg"], "-o", out, "--no-chat-template"],
        inputs=[m],
        absent=[out],
        fragment="rope_theta must be a finite positive number" if damage == "rope_theta" else "not finite",
    )  # rope_theta = 0 is caught with the config


# --- issue 22: directions and writers that cannot mean what they say ----------------------------------


def _retyped_copy(tmp_path: Path, tensor: str, dtype: str, shape=None) -> Path:
    """A copy of tiny-llama whose `tensor` is declared `dtype` (same bytes, header rewritten)."""
    import struct

    m = tmp_path / f"retyped-{dtype}"
    shutil.copytree(L_SRC, m)
    for f in sorted(m.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        if tensor in header:
            header[tensor]["dtype"] = dtype
            header[tensor]["shape"] = shape or header[tensor]["shape"]
            h = json.dumps(header).encode()
            h += b" " * (-len(h) % 8)
            f.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
            return m
    raise AssertionError(tensor)


@pytest.mark.parametrize("dtype,shape", [("I16", None), ("U8", [64, 128]), ("BOOL", [64, 128])])
def test_ablate_refuses_integer_writers(ws, tmp_path, dtype, shape):
    """An I16/U8/BOOL "writer" used to be projected and written back as integers, exit 0."""
    m = _retyped_copy(tmp_path, "model.layers.0.self_attn.o_proj.weight", dtype, shape)
    out = tmp_path / "out"
    hostile(
        ["ablate", m, "-d", ws["d64"], "-o", out],
        inputs=[m],
        absent=[out],
        fragment=f"o_proj.weight is {dtype}, not a floating-point weight",
    )


def test_directions_never_wrap_and_must_fit_the_model(ws, tmp_path):
    from patcher.edit.directions import save_directions

    table = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)  # tiny-llama: 3 layers
    wrap = tmp_path / "wrap.safetensors"
    save_directions(wrap, table, table, 0 * table, {"selected_layer": -1})
    hostile(
        ["ablate", ws["L"], "-d", wrap, "-o", tmp_path / "o"],
        absent=[tmp_path / "o"],
        fragment="selected_layer -1 is out of range",
    )  # FILE:-1 still counts from the end, as documented
    big = np.random.default_rng(0).standard_normal((41, 64)).astype(np.float32)
    forty = tmp_path / "forty.safetensors"
    save_directions(forty, big, big, 0 * big, {"selected_layer": 2})
    for cmd in (
        ["ablate", ws["L"], "-d", forty, "-o", tmp_path / "o"],
        ["inject", ws["L"], "-d", forty, "--layer", 1, "--alpha", 1, "-o", tmp_path / "o"],
    ):
        hostile(cmd, absent=[tmp_path / "o"], fragment="41 rows")


def test_a_direction_set_that_leaves_nothing_is_refused(ws, tmp_path):
    """63 independent directions in 64 dimensions zeroed every writer without a word."""
    many = tmp_path / "many.npy"
    np.save(many, np.random.default_rng(1).standard_normal((63, 64)))
    hostile(
        ["ablate", ws["L"], "-d", many, "-o", tmp_path / "o"],
        absent=[tmp_path / "o"],
        fragment="leave at most 1 dimension",
    )


def test_a_study_applies_only_to_the_model_it_searched(tmp_path):
    """`ablate --from-study` on another model printed "note: note: ..." and wrote it, exit 0."""
    from test_search import directions_file, manual_study

    from patcher.search import space as sp

    dirs = directions_file(tmp_path / "d.safetensors", 3, 64)
    free = {
        "direction_scope": "per_layer",
        **{f"{c}_{k}": 1.0 for c in sp.COMPONENTS for k in ("peak", "center", "min_frac", "width")},
    }
    manual_study(tmp_path / "s.db", L_SRC, dirs, free, {"embed": False, "norm_preserve": "none"})
    other = tmp_path / "other"
    shutil.copytree(L_SRC, other)
    hostile(
        ["ablate", other, "--from-study", tmp_path / "s.db", "--trial", 0, "-o", tmp_path / "o"],
        inputs=[other],
        absent=[tmp_path / "o"],
        fragment="is not the model this study searched",
    )
    res = CliRunner().invoke(
        app,
        [
            str(a)
            for a in ("ablate", L_SRC, "--from-study", tmp_path / "s.db", "--trial", 0, "-o", tmp_path / "o")
        ],
    )
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "key,value",
    [
        ("rope_scaling", {"rope_type": "linear", "factor": "two"}),
        ("rope_scaling", {"rope_type": "linear", "factor": 0}),
        ("rope_theta", "1e4"),
    ],
)
def test_non_numeric_rope_settings_are_one_line(ws, tmp_path, key, value):
    m = tmp_path / "m"
    shutil.copytree(L_SRC, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg[key] = value
    (m / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "d.safetensors"
    hostile(
        ["extract", m, "--positive", ws["pos"], "--negative", ws["neg"], "-o", out, "--no-chat-template"],
        inputs=[m],
        absent=[out],
        fragment=f"{key}",
    )


def test_a_lone_surrogate_in_a_jsonl_prompt_is_one_line(ws, tmp_path):
    p = tmp_path / "pos.jsonl"
    p.write_text('{"prompt": "fine"}\n{"prompt": "half \\ud800 a pair"}\n')
    out = tmp_path / "d.safetensors"
    hostile(
        ["extract", ws["L"], "--positive", p, "--negative", ws["neg"], "-o", out, "--no-chat-template"],
        inputs=[p],
        absent=[out],
        fragment='line 2: "prompt" holds a lone surrogate',
    )


def test_a_bad_study_file_is_refused_before_any_work(ws, tmp_path):
    """`search --study bad.db` extracted for seconds before saying so, with SQLAlchemy's text and URL."""
    bad = tmp_path / "bad.db"
    bad.write_text("garbage, not SQLite")
    res = hostile(
        ["search", ws["L"], "--positive", ws["pos"], "--negative", ws["neg"], "--study", bad, "--trials", 1],
        inputs=[bad],
        absent=[tmp_path / "bad.directions.safetensors"],
        fragment="is not a study database",
        seconds=5,
    )
    assert "sqlalche" not in res.stderr
    import sqlite3

    odd = tmp_path / "odd.db"  # SQLite, but not optuna's schema
    with sqlite3.connect(odd) as c:
        c.execute("create table studies (x text)")
    res = hostile(
        ["ablate", ws["L"], "--from-study", odd, "--trial", 0, "-o", tmp_path / "o"],
        inputs=[odd],
        fragment=f"{odd}: is an SQLite database but not an optuna study",
    )
    assert "sqlalche" not in res.stderr and "[SQL:" not in res.stderr


def _search(ws, study, model=None) -> list:
    return ["search", model or ws["L"], "--positive", ws["pos"], "--negative", ws["neg"], "--study", study]


def test_a_users_sqlite_database_is_never_made_a_study(ws, tmp_path):
    """search --study on a user's own SQLite file extracted first, then optuna wrote its tables into it."""
    import sqlite3

    mine = tmp_path / "mine.db"
    with sqlite3.connect(mine) as c:
        c.execute("create table notes (body text)")
        c.execute("insert into notes values ('years of work')")
    c.close()
    res = hostile(
        [*_search(ws, mine), "--trials", 1],
        inputs=[mine],
        absent=[tmp_path / "mine.directions.safetensors"],
        fragment=f"{mine}: is an SQLite database but not an optuna study (no 'studies' table)",
        seconds=5,
    )
    assert "sqlite:" not in res.stderr


def _study_of(tmp_path, model, name="s.db"):
    from test_search import directions_file, manual_study

    from patcher.search import space as sp

    dirs = directions_file(tmp_path / f"{name}.d.safetensors", 3, 64)
    free = {
        "direction_scope": "per_layer",
        **{f"{c}_{k}": 1.0 for c in sp.COMPONENTS for k in ("peak", "center", "min_frac", "width")},
    }
    manual_study(tmp_path / name, model, dirs, free, {"embed": False, "norm_preserve": "none"})
    return tmp_path / name, dirs


def test_a_study_of_another_model_is_refused_before_any_work(ws, tmp_path):
    """The model mismatch was found after the extraction (seconds to hours), and named the study
    ("patcher-search"), not its file."""
    study, dirs = _study_of(tmp_path, L_SRC)
    hostile(
        [*_search(ws, study), "--trials", 2],
        inputs=[study],
        absent=[tmp_path / "s.directions.safetensors"],
        fragment=f"{study}: is a study of another model ({L_SRC};",
        seconds=5,
    )
    same, _ = _study_of(tmp_path, ws["L"], "same.db")
    other_dirs = tmp_path / "other.npy"
    np.save(other_dirs, np.ones(64))
    hostile(
        [*_search(ws, same), "--directions", other_dirs, "--trials", 2],
        inputs=[same, other_dirs],
        fragment=f"{same}: was searched with other directions than {other_dirs}",
        seconds=5,
    )


def test_foreign_optuna_studies_are_named_by_their_file(ws, tmp_path):
    """An optuna database of someone else's studies, or a study under patcher's name that patcher did
    not write: one line naming the file (study_attrs named the study, "patcher-search")."""
    import optuna

    theirs = tmp_path / "theirs.db"
    optuna.create_study(storage=f"sqlite:///{theirs}", study_name="lr-sweep")
    hostile(
        [*_search(ws, theirs), "--trials", 1],
        inputs=[theirs],
        fragment=f"{theirs}: holds optuna studies ('lr-sweep') but not patcher's 'patcher-search'",
        seconds=5,
    )
    hostile(
        ["ablate", ws["L"], "--from-study", theirs, "--trial", 0, "-o", tmp_path / "o"],
        inputs=[theirs],
        absent=[tmp_path / "o"],
        fragment=f"{theirs}: holds optuna studies",
    )
    named = tmp_path / "named.db"
    optuna.create_study(storage=f"sqlite:///{named}", study_name="patcher-search").set_user_attr("x", 1)
    hostile(
        ["ablate", ws["L"], "--from-study", named, "--trial", 0, "-o", tmp_path / "o"],
        inputs=[named],
        absent=[tmp_path / "o"],
        fragment=f"{named}: holds a study named 'patcher-search' that patcher did not write",
    )


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "tokenizer_config.json"])
def test_huge_side_files_are_refused_before_reading(ws, tmp_path, name):
    """A 3 GB tokenizer.json took 3.2 GB of memory before failing: side files are size-capped (sparse
    file here: no disk used)."""
    from patcher.io.paths import MAX_SIDE_FILE

    m = tmp_path / "m"
    shutil.copytree(L_SRC, m)
    with open(m / name, "r+b") as f:
        f.truncate(MAX_SIDE_FILE + 1)
    out = tmp_path / "d.safetensors"
    hostile(
        ["extract", m, "--positive", ws["pos"], "--negative", ws["neg"], "-o", out, "--no-chat-template"],
        inputs=[ws["pos"]],
        absent=[out],
        fragment="patcher reads whole",
    )


def test_readme_recipe_export_int4_then_verify_runs(tmp_path):
    """README's recipe exports int4 and verifies with no dtype: verify looked for the fp32 variant."""
    prompts = tmp_path / "eval.txt"
    prompts.write_text("The sea is\nA robot can\n")
    r = write_recipe(
        tmp_path,
        f'[[step]]\nop = "export"\ndtype = "int4"\n\n[[step]]\nop = "verify"\n'
        f'prompts = "{prompts}"\ntokens = 2\n',
    )
    res = CliRunner().invoke(app, ["run", str(r)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "02-verify.json").read_text())
    assert report["dtype"] == "int4", report.get("dtype")


# --- issue 22: exports that cannot load ---------------------------------------------------------------


def _heads_that_do_not_fit(tmp_path):
    """A copy of the llama fixture whose config head_dim is half what its tensors hold."""
    m = tmp_path / "m"
    shutil.copytree(L_SRC, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    (m / "config.json").write_text(json.dumps(cfg))
    return m


def test_an_export_onnxruntime_cannot_load_is_not_written(tmp_path):
    """Tensors that do not fit each other (here k_proj stored transposed; before: config head_dim !=
    the tensors): export said "wrote", generate then failed inside onnxruntime."""
    m = _retyped_copy(tmp_path, "model.layers.0.self_attn.k_proj.weight", "BF16", [64, 32])
    out = tmp_path / "e"
    hostile(
        ["export", m, "-o", out],
        inputs=[m],
        absent=[out],
        fragment="the exported graph would not load (at model.layers.0.self_attn.k_proj.weight:",
    )


def _config_copy(tmp_path: Path, **changes) -> Path:
    m = tmp_path / "m"
    shutil.copytree(L_SRC, m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, **changes}))
    return m


def test_an_export_that_loads_but_cannot_run_is_not_written(tmp_path):
    """num_key_value_heads 4 where k_proj holds 2 heads: the graph passes shape inference (the reshape is
    dynamic) and loads; it fails on the first token. Export said "wrote", exit 0."""
    m = _config_copy(tmp_path, num_key_value_heads=4)
    out = tmp_path / "e"
    res = hostile(
        ["export", m, "-o", out],
        inputs=[m],
        absent=[out],
        fragment="onnx/model.onnx does not run in onnxruntime at model.layers.0.self_attn.k_proj.weight",
    )
    assert "requested shape:{1,3,4,16}" in res.stderr and "onnxruntime_src" not in res.stderr


def test_a_head_dim_that_does_not_fit_names_the_config_keys(tmp_path):
    m = _heads_that_do_not_fit(tmp_path)
    hostile(
        ["export", m, "-o", tmp_path / "e"],
        inputs=[m],
        absent=[tmp_path / "e"],
        fragment="num_attention_heads 4 x head_dim 8 = 32, but model.layers.0.self_attn.o_proj.weight",
    )


@pytest.mark.parametrize(
    "tensor,dtype,shape,fragment",
    [
        ("model.layers.0.mlp.down_proj.weight", "BF16", [96, 64], "down_proj.weight has shape [96, 64]"),
        ("model.layers.0.mlp.up_proj.weight", "BF16", [64, 96], "at model.layers.0.mlp.up_proj.weight"),
        ("model.layers.0.self_attn.o_proj.weight", "I16", None, "o_proj.weight is I16, not a floating"),
        ("model.embed_tokens.weight", "I16", None, "embed_tokens.weight is I16, not a floating"),
        ("model.layers.1.self_attn.q_proj.weight", "I16", None, "q_proj.weight is I16, not a floating"),
    ],
)
def test_transposed_and_integer_tensors_are_named_before_export(tmp_path, tensor, dtype, shape, fragment):
    """A transposed (non-square) tensor or integer codes of the right size: one line naming the tensor.
    The I16 tensors of the right size exported with exit 0 (onnxruntime computed with the codes)."""
    m = _retyped_copy(tmp_path, tensor, dtype, shape)
    hostile(["export", m, "-o", tmp_path / "e"], inputs=[m], absent=[tmp_path / "e"], fragment=fragment)


def test_an_export_of_non_finite_weights_is_not_written(tmp_path):
    """4 NaN in o_proj: the export was written (exit 0) and answered nothing in generate."""
    m = _poisoned_copy(tmp_path)
    out = tmp_path / "e"
    hostile(
        ["export", m, "-o", out],
        inputs=[m],
        absent=[out],
        fragment="model.layers.0.self_attn.o_proj.weight holds NaN or Inf",
    )


def test_a_variant_too_large_for_memory_is_graph_checked_and_said(tmp_path, monkeypatch):
    """onnxruntime holds a whole variant: beyond half the available memory the run is skipped, saying
    so (the export itself streams one tensor at a time)."""
    import patcher.onnx.selftest as st

    ran = []
    monkeypatch.setattr(st, "available_memory", lambda: 1000)
    monkeypatch.setattr(st, "run_one_step", lambda *a: ran.append(a))
    res = CliRunner().invoke(app, ["export", str(L_SRC), "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert not ran and "not run in onnxruntime" in " ".join(res.stderr.split()), res.stderr
    monkeypatch.undo()
    assert st.available_memory() > 2**20  # the real reading: bytes, not kB


def test_a_transposed_square_writer_is_what_cannot_be_caught(tmp_path):
    """The limit, held so that it is known: o_proj [64, 64] stored transposed has the shape the table
    expects; the export loads, runs and computes another model (its first-token logits differ)."""
    from patcher.onnx.runtime import OnnxModel

    m = tmp_path / "t"
    shutil.copytree(L_SRC, m)
    import torch
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.self_attn.o_proj.weight"
    shard = next(f for f in sorted(m.glob("*.safetensors")) if name in load_file(f))
    tensors = load_file(shard)
    tensors[name] = tensors[name].T.contiguous().to(torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    logits = []
    for src in (L_SRC, m):
        out = tmp_path / f"e-{src.name}"
        assert CliRunner().invoke(app, ["export", str(src), "-o", str(out)]).exit_code == 0
        om = OnnxModel(out)
        ids = np.array([[1, 2, 3]])
        logits.append(om.step(ids, np.ones_like(ids), np.arange(3)[None], om.empty_cache(1), keep=1)[0])
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


@pytest.mark.parametrize("cmd", ["generate", "verify"])
def test_onnxruntime_load_failures_are_one_line(exported, tmp_path, cmd):
    e = tmp_path / "e"
    shutil.copytree(exported, e)
    graph = e / "onnx" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:200])  # truncated
    args = {
        "generate": ["generate", e, "--prompt", "hi", "--max-new-tokens", 1],
        "verify": ["verify", e, "--reference", L_SRC, "--tokens", 1],
    }[cmd]
    hostile(args, inputs=[e], fragment="onnxruntime cannot load this model")


def test_a_config_whose_heads_do_not_fit_the_tensors_is_one_line(ws, tmp_path):
    m = _heads_that_do_not_fit(tmp_path)
    out = tmp_path / "d.safetensors"
    hostile(
        ["extract", m, "--positive", ws["pos"], "--negative", ws["neg"], "-o", out, "--no-chat-template"],
        inputs=[m],
        absent=[out],
        fragment="the config's sizes do not fit the tensors",
    )


@pytest.mark.parametrize(
    "old,new,fragment",
    [
        ("residual_axis = 0", "residual_axis = 7", "residual_axis must be one of"),
        ("residual_axis = 0", "residual_axis = 2", "is the residual axis"),
        ('layers = "model.layers.{layer}."', "layers = 5", "layers must be a str"),
        ("tie_word_embeddings = false", 'tie_word_embeddings = "no"', "tie_word_embeddings must be a bool"),
        (
            'config = { layers = "num_hidden_layers", d_model = "hidden_size" }',
            "config = 5",
            "config must be a dict",
        ),
        (
            'config = { layers = "num_hidden_layers", d_model = "hidden_size" }',
            "config = { layers = 3 }",
            "config.layers must be a str",
        ),
    ],
)
def test_bad_arch_table_values_are_one_line(ws, tmp_path, old, new, fragment):
    """Wrong value types in --arch-table were IndexError/TypeError/AttributeError internal errors."""
    from patcher.model.architectures import TABLE_DIR

    text = (TABLE_DIR / "llama.toml").read_text()
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.split("#")[0].strip() == old)  # first: attn writer
    lines[at] = new
    table = tmp_path / "t.toml"
    table.write_text("\n".join(lines))
    hostile(
        ["ablate", ws["L"], "-d", ws["d64"], "-o", tmp_path / "o", "--arch-table", table],
        inputs=[table],
        absent=[tmp_path / "o"],
        fragment=fragment,
    )


def test_generate_refuses_nan_logits(tmp_path):
    """An export of NaN weights: generate printed nothing (argmax of NaN) and exited 0."""
    e = tmp_path / "e"
    assert CliRunner().invoke(app, ["export", str(L_SRC), "-o", str(e)]).exit_code == 0
    data = e / "onnx" / "model.onnx_data"  # export refuses NaN weights: poison the written ones
    values = np.fromfile(data, np.float32)
    values[:: max(len(values) // 64, 1)] = np.nan
    os.chmod(data, 0o644)
    values.tofile(data)
    hostile(
        ["generate", e, "--prompt", "hi", "--max-new-tokens", 2],
        inputs=[e],
        fragment="logits are NaN at generated token 0",
    )


def test_numpy_runtime_warnings_are_one_note(capsys):
    """Raw numpy RuntimeWarnings (with source lines) reached stderr on runs that exit 0."""
    import warnings

    from patcher.cli.common import guard

    def body():
        np.float32(3e38) * np.float32(10)  # overflow
        np.float32(3e38) * np.float32(10)  # the same warning: one note
        warnings.warn("a library's own warning", FutureWarning, stacklevel=2)
        return 7

    with warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        assert guard(body) == 7
    err = capsys.readouterr().err
    assert err.count("note: numeric warning: overflow") == 1 and "RuntimeWarning" not in err, err
    assert [str(w.message) for w in passed] == ["a library's own warning"]


def test_extract_reports_progress_without_a_terminal(ws, tmp_path, monkeypatch):
    """A long extract in a log (no TTY: the bar is hidden) printed nothing for its whole run."""
    import patcher.cli.common as common

    monkeypatch.setattr(common, "PLAIN_PROGRESS_SECONDS", 0.0)
    out = tmp_path / "d.safetensors"
    res = CliRunner().invoke(
        app,
        [
            str(a)
            for a in (
                "extract",
                ws["L"],
                "--positive",
                ws["pos"],
                "--negative",
                ws["neg"],
                "-o",
                out,
                "--no-chat-template",
            )
        ],
    )
    assert res.exit_code == 0, res.output
    n = sum(1 for f in (ws["pos"], ws["neg"]) for line in f.read_text().splitlines() if line.strip())
    assert f"prompts through the model: {n} of {n} (100 %)" in res.stderr, res.stderr


def _extract_args(ws, out, *extra) -> list[str]:
    args = ["extract", ws["L"], "--positive", ws["pos"], "--negative", ws["neg"], "-o", out]
    return [str(a) for a in (*args, "--no-chat-template", *extra)]


def test_extract_progress_advances_within_a_prompt_set(ws, tmp_path, monkeypatch):
    """Progress moved once per prompt set (after the whole set): a 100 MB file showed 0 % for its whole
    first half. It now moves as each batch leaves each block."""
    import re

    import patcher.cli.common as common

    monkeypatch.setattr(common, "PLAIN_PROGRESS_SECONDS", 0.0)
    res = CliRunner().invoke(app, _extract_args(ws, tmp_path / "d.safetensors", "--batch-size", 16))
    assert res.exit_code == 0, res.output
    counts = [int(c) for c in re.findall(r"prompts through the model: (\d+) of 96", res.stderr)]
    assert counts == sorted(counts) and counts[-1] == 96, res.stderr
    assert len([c for c in counts if c < 48]) >= 3, counts  # 3 batches x 4 resid_pre steps in the first set


def test_extract_estimates_its_time_up_front(ws, tmp_path, monkeypatch):
    """Nothing said how long a run would take. The estimate, checked by hand: a matmul timed at 10 ms
    (53.7 GFLOP/s), the llama fixture's block weights, the padded tokens of the two sets."""
    import time

    from patcher.edit import extract as ex
    from patcher.model.execution import StreamedModel
    from patcher.model.prompts import encode_prompts, read_prompt_file

    res = CliRunner().invoke(app, _extract_args(ws, tmp_path / "d.safetensors"))
    assert res.exit_code == 0, res.output
    assert "96 prompts (" in res.stderr and "tokens with padding) through 3 of 3 blocks: about" in res.stderr

    clock = iter(np.arange(0.0, 100.0, 0.01))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    sm = StreamedModel(ws["L"])
    tok = sm.model.tokenizer()
    batches = []
    for f in (ws["pos"], ws["neg"]):
        toks = encode_prompts(tok, read_prompt_file(f), chat_template=False)
        batches += [b for _, b in ex._batches(toks, tok.pad_id, 8, [-1], "x")]
    tokens, seconds = ex.estimate_seconds(sm, batches, 2)
    assert tokens == sum(ids.size for ids, _ in batches)
    weights = 64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 3 + 64 * 2  # q, o, k, v, gate/up/down, 2 norms
    attention = sum(ids.size * ids.shape[1] for ids, _ in batches) * 4 * 4 * 16
    work = (2 * weights * tokens + attention) / 0.35 + 4.7e5 * tokens
    assert seconds == pytest.approx(2 * work / (2 * 256 * 1024 * 1024 / 0.01), rel=1e-9)


def test_default_max_prompts_caps_and_says_so(ws, tmp_path, monkeypatch):
    """No cap: a 100 MB prompt file ran ~50 min. The default cap is said, with the way to raise it."""
    from patcher import validate as V

    res = CliRunner().invoke(app, ["extract", "--help"])
    assert f"default {V.DEFAULT_MAX_PROMPTS}" in " ".join(res.output.split())
    monkeypatch.setattr(V, "DEFAULT_MAX_PROMPTS", 10)
    out = tmp_path / "d.safetensors"
    res = CliRunner().invoke(app, _extract_args(ws, out))
    assert res.exit_code == 0, res.output
    assert (
        "note: using the first 10 of 48 positive and 10 of 48 negative prompts (--max-prompts 10 is the "
        "default); pass --max-prompts 48 to use them all" in " ".join(res.stderr.split())
    ), res.stderr
    from safetensors import safe_open

    with safe_open(out, "np") as f:
        counts = json.loads(f.metadata()["patcher"])["prompts"]
    assert [counts[k]["count"] for k in ("positive", "negative")] == [10, 10], counts
    res = CliRunner().invoke(app, _extract_args(ws, tmp_path / "all.safetensors", "--max-prompts", 48))
    assert res.exit_code == 0 and "note: using" not in res.stderr, res.stderr


# --- issue 22: every command that writes × races and foreign files ------------------------------------


def _writers(ws, tmp_path, edited):
    """Each command that publishes an output, with the output it publishes (folder or file)."""
    L, d64, t = ws["L"], ws["d64"], tmp_path
    ex = ["extract", L, "--positive", ws["pos"], "--negative", ws["neg"], "--no-chat-template"]
    return {
        "ablate": (["ablate", L, "-d", d64, "-o", t / "out"], t / "out"),
        "inject": (["inject", L, "-d", d64, "--layer", 1, "--alpha", 1, "-o", t / "out"], t / "out"),
        "ablate --adapter folder": (["ablate", L, "-d", d64, "--adapter", t / "out"], t / "out"),
        "ablate --adapter gguf": (["ablate", L, "-d", d64, "--adapter", t / "a.gguf"], t / "a.gguf"),
        "inject --control-vector": (
            ["inject", L, "-d", d64, "--layer", 1, "--alpha", 1, "--control-vector", t / "cv.gguf"],
            t / "cv.gguf",
        ),
        "export": (["export", L, "-o", t / "out"], t / "out"),
        "extract": ([*ex, "-o", t / "d.safetensors"], t / "d.safetensors"),
        "extract --plot": ([*ex, "-o", t / "d.safetensors", "--plot", t / "p.svg"], t / "p.svg"),
        "diff --save-direction": (["diff", L, edited, "--save-direction", t / "v.npy"], t / "v.npy"),
        "audit --plot": (["audit", edited, "--plot", t / "p.svg"], t / "p.svg"),
    }


@pytest.fixture(scope="module")
def edited(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-edited") / "edited"
    res = CliRunner().invoke(app, ["ablate", str(ws["L"]), "-d", str(ws["d64"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


WRITERS = [
    "ablate",
    "inject",
    "ablate --adapter folder",
    "ablate --adapter gguf",
    "inject --control-vector",
    "export",
    "extract",
    "extract --plot",
    "diff --save-direction",
    "audit --plot",
]


@pytest.mark.parametrize("name", WRITERS)
def test_every_writer_leaves_what_appeared_meanwhile(ws, edited, tmp_path, monkeypatch, name):
    """Item 1 for every command: the user's file or folder created at the output path just before
    patcher publishes survives, and the run says so."""
    import patcher.io.atomic as atomic

    args, target = _writers(ws, tmp_path, edited)[name]
    orig = atomic.AtomicOutput._publish

    def users_first(self):
        if self.target == target.absolute():
            if self.kind == "folder":
                target.mkdir()
                (target / "thesis.tex").write_text("years of work")
            else:
                target.write_text("years of work")
        return orig(self)

    monkeypatch.setattr(atomic.AtomicOutput, "_publish", users_first)
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code != 0 and "left untouched" in res.stderr, res.output
    kept = target / "thesis.tex" if target.is_dir() else target
    assert kept.read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")]


@pytest.mark.parametrize("name", WRITERS)
def test_every_writer_under_force_keeps_what_the_user_added(ws, edited, tmp_path, name):
    """Items 3 and 6 for every command: a previous output of the same command, then the user's addition
    (a file in the folder) or rewrite (of the file): --force refuses and changes nothing."""
    args, target = _writers(ws, tmp_path, edited)[name]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code in (0, 1) and os.path.exists(target), res.output  # diff: 1 = the models differ
    if target.is_dir():
        (target / "NOTES.md").write_text("mine")
    else:
        target.write_bytes(target.read_bytes())  # rewritten by the user: theirs now
    before = digests([target])
    res = hostile([*args, "--force"], inputs=[target])
    assert (
        ("NOTES.md" in res.stderr)
        if target.is_dir()
        else ("not written by patcher" in res.stderr or "--force" in res.stderr)
    ), res.stderr
    assert digests([target]) == before
