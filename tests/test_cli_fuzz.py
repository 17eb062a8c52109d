"""Hypothesis over option values across all commands (issue 9): whatever a user types, the answer is a
clean exit 0 or one short error (no traceback, no "internal error"), and the inputs stay untouched.

Runs in-process (typer's CliRunner). The expensive part of each command (the forward pass, the
writer, the ONNX build, a recipe step, the demo) is replaced by a sentinel: reaching it means every
check before the work accepted the input, which is all a fuzz of option values can judge, and keeps
the whole file well under a minute. 2 100 cases in total, derandomized so CI is reproducible."""

import hashlib
import os
import shutil

import numpy as np
import pytest
from conftest import DEMO, FIXTURES, fixture_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from patcher.cli import app


class Reached(BaseException):
    """The command got past every check to its real work (BaseException: no handler swallows it)."""


def _reach(*_a, **_k):
    raise Reached


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    L = root / "L"
    shutil.copytree(fixture_path("llama"), L)
    d64 = root / "d64.npy"
    shutil.copy(FIXTURES / "direction-64.npy", d64)
    pos, neg = root / "pos.txt", root / "neg.txt"
    shutil.copy(DEMO / "positive.txt", pos)
    shutil.copy(DEMO / "negative.txt", neg)
    fifo = root / "fifo.txt"
    os.mkfifo(fifo)
    (root / "folder").mkdir()
    (root / "user.txt").write_text("mine")
    np.save(root / "two.npy", np.stack([np.eye(64)[0], np.eye(64)[0]]))
    onnx = root / "onnx"  # an export folder is only read up to the session: a real export is not needed
    res = CliRunner().invoke(app, ["export", str(L), "-o", str(onnx)])
    assert res.exit_code == 0, res.output
    paths = [
        str(p)
        for p in (
            L,
            d64,
            pos,
            neg,
            fifo,
            root / "folder",
            root / "user.txt",
            root / "two.npy",
            root / "missing.npy",
            L / "config.json",
            L / "inside",
            onnx,
        )
    ]
    paths += [
        "",
        ".",
        "~",
        "-",
        "/",
        "nope.safetensors",
        f"{d64}:1",
        f"{L}/model-00001-of-00002.safetensors:0",
    ]
    return {
        "root": root,
        "L": L,
        "d64": d64,
        "pos": pos,
        "neg": neg,
        "onnx": onnx,
        "paths": paths,
        "out": root / "out",
        "before": _digest(root),
    }


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and "out" not in p.parts:
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


_COMMAND = []


@pytest.fixture(autouse=True)
def _no_work(monkeypatch):
    import typer.main
    import typer.testing

    if not _COMMAND:  # typer rebuilds the click command on every invoke: half of each case's time
        _COMMAND.append(typer.main.get_command(app))
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: _COMMAND[0])
    from patcher.edit import apply, audit, diff
    from patcher.model.execution import StreamedModel
    from patcher.onnx import export, verify
    from patcher.onnx.runtime import OnnxModel
    from patcher.pipelines import demo, recipe

    # every command's work starts in one of these: the fuzzed options are checked before it
    for owner, name in [
        (diff, "diff"),
        (audit, "audit"),
        (StreamedModel, "run_many"),
        (OnnxModel, "generate"),
        (apply, "execute"),
        (export, "export"),
        (verify, "verify"),
        (recipe, "run_action"),
        (demo, "run_stages"),  # after `run` checks --out
    ]:
        monkeypatch.setattr(owner, name, _reach)


NUMBERS = st.one_of(
    st.sampled_from(
        [
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e40",
            "-1e40",
            "1e308",
            "0",
            "-0",
            "1",
            "-1",
            "2",
            "-100",
            "100000",
            "99999999999999999999",
            "abc",
            "",
            " ",
            "1.5",
            "0x10",
            "1_000",
            "٣",
            "eight",
            "--force",
            "\udcff",
        ]
    ),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6),
)
LAYERS = st.one_of(
    NUMBERS,
    st.from_regex(r"\A-?\d{1,3}(--?\d{1,3})?(,-?\d{1,3}(--?\d{1,3})?){0,2}\Z"),
    st.sampled_from(["all", "2-1", "-100", "0--1", "-1--3", ",", "1,,2", "1-", "-"]),
)
WORDS = st.one_of(
    NUMBERS,
    st.sampled_from(
        [
            "embed",
            "attn_out",
            "mlp_out",
            "mlp_outt",
            "embed,mlp_out",
            "rows",
            "cols",
            "fp32",
            "fp16",
            "int4",
            "cpu",
            "cuda",
            "embed,,",
        ]
    ),
)


def paths(env):
    return st.sampled_from(env["paths"]) | st.just(str(env["out"]))


def _argv(base, opts, flags):
    args = [str(a) for a in base]
    for k, v in opts.items():
        args.append(f"{k}={v}")
    return args + list(flags)


def check(args, env):
    """One case: exit 0, or reached the work, or a short clean error."""
    try:
        res = CliRunner().invoke(app, args)
    except Reached:
        return
    if res.exit_code == 0:
        return
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
    text = res.stdout + res.stderr
    assert "Traceback" not in text and "internal error" not in text, (args, text)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith(("error:", "interrupted:")), (args, res.stderr)
    extra = [line for line in lines[1:] if not (args[0] == "run" and line.startswith("  "))]
    assert len(extra) <= 2, (args, res.stderr)
    assert not list(env["root"].glob(".out.*")), (args, "partial output left")


FUZZ = settings(
    max_examples=350,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


def options(spec: dict):
    """A subset of the options, each with a fuzzed value."""
    return st.fixed_dictionaries({}, optional=spec)


@FUZZ
@given(data=st.data())
def test_fuzz_ablate(env, data):
    opts = data.draw(
        options(
            {
                "--scale": NUMBERS,
                "--layers": LAYERS,
                "--targets": WORDS,
                "--norm-preserve": WORDS,
                "--direction": paths(env),
                "--output": paths(env),
                "--arch-table": paths(env),
            }
        )
    )
    flags = data.draw(
        st.lists(st.sampled_from(["--force", "--dry-run", "--untie-embeddings", "--no-hash"]), unique=True)
    )
    base = ["ablate", data.draw(st.sampled_from([env["L"], *env["paths"][:4]]))]
    opts.setdefault("--direction", env["d64"])
    opts.setdefault("--output", env["out"])
    check(_argv(base, opts, flags), env)


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_inject(env, data):
    opts = data.draw(
        options(
            {
                "--layer": NUMBERS,
                "--alpha": NUMBERS,
                "--target": WORDS,
                "--direction": paths(env),
                "--output": paths(env),
            }
        )
    )
    opts.setdefault("--direction", env["d64"])
    opts.setdefault("--output", env["out"])
    opts.setdefault("--layer", "1")
    opts.setdefault("--alpha", "1")
    flags = data.draw(st.lists(st.sampled_from(["--force", "--dry-run"]), unique=True))
    check(_argv(["inject", env["L"]], opts, flags), env)


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_extract(env, data):
    opts = data.draw(
        options(
            {
                "--positions": LAYERS,
                "--batch-size": NUMBERS,
                "--max-prompts": NUMBERS,
                "--layers": LAYERS,
                "--plot": paths(env) | st.sampled_from(["p.jpg", "p.svg", "p"]),
                "--output": paths(env),
                "--positive": paths(env),
                "--system": NUMBERS,
            }
        )
    )
    opts.setdefault("--positive", env["pos"])
    opts.setdefault("--negative", env["neg"])
    opts.setdefault("--output", env["root"] / "out.safetensors")
    flags = data.draw(
        st.lists(
            st.sampled_from(["--force", "--no-chat-template", "--project-out-negative-mean"]), unique=True
        )
    )
    check(_argv(["extract", env["L"]], opts, flags), env)


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_fuzz_export(env, data):
    opts = data.draw(
        options(
            {
                "--dtype": WORDS,
                "--opset": NUMBERS,
                "--int4-block": NUMBERS,
                "--int4-accuracy": NUMBERS,
                "--output": paths(env),
            }
        )
    )
    opts.setdefault("--output", env["out"])
    base = ["export", data.draw(st.sampled_from([env["L"], *env["paths"][:4]]))]
    check(_argv(base, opts, data.draw(st.lists(st.just("--force"), max_size=1))), env)


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_generate(env, data):
    opts = data.draw(
        options(
            {
                "--max-new-tokens": NUMBERS,
                "--dtype": WORDS,
                "--temperature": NUMBERS,
                "--top-k": NUMBERS,
                "--seed": NUMBERS,
                "--batch-size": NUMBERS,
                "--provider": WORDS,
                "--prompts": paths(env),
                "--system": NUMBERS,
            }
        )
    )
    if "--prompts" not in opts:
        opts["--prompt"] = data.draw(NUMBERS | st.just("hello there"))
    flags = data.draw(st.lists(st.sampled_from(["--sample", "--no-chat-template"]), unique=True))
    check(_argv(["generate", env["onnx"]], opts, flags), env)


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_fuzz_verify(env, data):
    opts = data.draw(
        options(
            {
                "--tokens": NUMBERS,
                "--dtype": WORDS,
                "--provider": WORDS,
                "--prompts": paths(env),
                "--direction": paths(env),
                "--reference": paths(env),
                "--original": paths(env),
            }
        )
    )
    opts.setdefault("--reference", env["L"])
    check(_argv(["verify", env["onnx"]], opts, data.draw(st.lists(st.just("--json"), max_size=1))), env)


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_fuzz_diff_and_audit(env, data):
    opts = data.draw(
        options(
            {
                "--direction": paths(env),
                "--save-direction": paths(env) | st.just("r.npy"),
                "--arch-table": paths(env),
            }
        )
    )
    pair = [env["L"], data.draw(st.sampled_from([env["L"], *env["paths"][:6]]))]
    if data.draw(st.booleans()):  # audit: one model, and --plot instead of --direction
        opts.pop("--direction", None)
        if data.draw(st.booleans()):
            opts["--plot"] = data.draw(paths(env) | st.sampled_from(["p.svg", "p.png"]))
        pair = pair[1:]
        args = _argv(
            ["audit", *pair], opts, data.draw(st.lists(st.sampled_from(["--json", "--force"]), unique=True))
        )
        try:
            res = CliRunner().invoke(app, args)
        except Reached:
            return
        if res.exit_code == 2:
            check(args, env)
        else:
            assert res.exit_code in (0, 1), (args, res.exit_code)
        return
    res_flags = data.draw(st.lists(st.sampled_from(["--json", "--force"]), unique=True))
    args = _argv(["diff", *pair], opts, res_flags)
    try:
        res = CliRunner().invoke(app, args)
    except Reached:
        return
    assert res.exit_code in (0, 2), (args, res.exit_code)
    if res.exit_code == 2:  # diff: 0 unchanged, 1 changed, 2 error (one line)
        check(args, env)


def _toml_value(v: str) -> str:
    """A fuzzed CLI value as the TOML a recipe author might write: a number, a string, a boolean."""
    try:
        float(v)
        if v.strip() and "_" not in v and not v.strip().startswith("0x") and v.isascii():
            return v.strip().lower() if v.strip().lower() in ("nan", "inf", "-inf") else v.strip()
    except ValueError:
        pass
    return '"' + v.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_recipe_values(env, data, tmp_path_factory):
    op = data.draw(st.sampled_from(["extract", "ablate", "inject", "export", "verify"]))
    keys = {
        "extract": ["positions", "batch_size", "max_prompts", "layers", "chat_template", "system"],
        "ablate": ["layers", "targets", "scale", "norm_preserve", "untie_embeddings", "output"],
        "inject": ["layer", "alpha", "target", "output"],
        "export": ["dtype", "output"],
        "verify": ["tokens", "dtype"],
    }[op]
    chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=3))
    body = [f'op = "{op}"']
    if op == "extract":
        body += [f'positive = "{env["pos"]}"', f'negative = "{env["neg"]}"']
    if op in ("ablate", "inject"):
        body.append(f'direction = "{env["d64"]}"')
    for k in chosen:
        pool = WORDS if k in ("targets", "norm_preserve", "dtype", "target") else NUMBERS
        body.append(f"{k} = {_toml_value(data.draw(pool))}")
    pre = '[[step]]\nop = "export"\n\n' if op == "verify" else ""
    folder = tmp_path_factory.mktemp("recipe")
    recipe = folder / "r.toml"
    recipe.write_text(
        f'[[model]]\npath = "{env["L"]}"\noutput = "{folder / "out"}"\n\n{pre}[[step]]\n'
        + "\n".join(body)
        + "\n"
    )
    check(["run", str(recipe)] + data.draw(st.lists(st.just("--dry-run"), max_size=1)), env)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_inspect_and_demo(env, data):
    if data.draw(st.booleans()):
        args = ["inspect", data.draw(paths(env))] + data.draw(st.lists(st.just("--json"), max_size=1))
        arch = data.draw(st.none() | paths(env))
        args += [f"--arch-table={arch}"] if arch is not None else []
    else:
        args = ["demo", f"--out={data.draw(paths(env))}"]
    check(args, env)


def test_inputs_untouched_after_the_fuzz(env):
    assert _digest(env["root"]) == env["before"]
