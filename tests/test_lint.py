"""The tree stays formatted and lint-clean (ruff, configured in pyproject.toml)."""

import shutil
import subprocess
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
