"""The tree stays formatted, lint-clean and type-clean (ruff and mypy, configured in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff(*args):
    exe = shutil.which("ruff") or pytest.skip("ruff is not installed (it comes with the test extra)")
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_lint_passes():
    done = ruff("check", "--output-format", "concise", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_is_applied():
    done = ruff("format", "--check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_lint_catches_a_defect(tmp_path):
    # the check is live: an unused import in a copy of a module fails it
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    done = ruff("check", "--config", str(REPO / "pyproject.toml"), str(bad))
    assert done.returncode == 1 and "F401" in done.stdout, done.stdout


def mypy(*args):
    pytest.importorskip("mypy", reason="mypy is not installed (it comes with the test extra)")
    # the cache (.mypy_cache, gitignored) makes a rerun take seconds; a cold run ~40 s of CPU
    return subprocess.run(
        [sys.executable, "-m", "mypy", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_mypy_passes():
    done = mypy()  # packages, search path and per-module settings come from pyproject.toml
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_catches_a_defect(tmp_path):
    # the check is live: an Optional used without a check fails it
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: int | None) -> int:\n    return x + 1\n")
    done = mypy("--config-file", str(REPO / "pyproject.toml"), str(bad))
    assert done.returncode == 1 and "[operator]" in done.stdout, done.stdout + done.stderr
