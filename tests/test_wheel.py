"""patcher installed the way users install a tool: a wheel built from the checkout, in a fresh venv, run
from a folder outside the repository (so nothing can come from the checkout by accident)."""

import re
import subprocess
import zipfile
from pathlib import Path

from conftest import ROOT


def test_wheel_holds_the_package_its_math_and_the_demo_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in (
        "patcher/cli/__init__.py",
        "patcher_kernels/project.py",
        "patcher/model/tables/llama.toml",
        "patcher/data/demo/model/config.json",
        "patcher/data/demo/model/model.safetensors.index.json",
        "patcher/data/demo/positive.txt",
        "patcher/data/demo/planted-direction.npy",
    ):
        assert need in names, need
    assert not any(n.startswith(("kernels/", "tests/", "fixtures/", "scripts/")) for n in names)
    assert sum(zipfile.ZipFile(wheel).getinfo(n).file_size for n in names) < 5_000_000


def test_demo_runs_from_the_wheel_outside_the_checkout(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run = lambda *a: subprocess.run(a, cwd=work, capture_output=True, text=True, timeout=600)  # noqa: E731
    where = run(
        str(venv / "bin" / "python"),
        "-c",
        "import patcher, patcher_kernels.project as k; print(patcher.__file__); print(k.__file__)",
    )
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(venv) and not Path(line).is_relative_to(ROOT), line
    res = run(str(venv / "bin" / "patcher"), "demo", "--out", str(work / "demo"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert float(re.search(r"cosine with the planted direction ([0-9.]+)", res.stdout)[1]) >= 0.99
    assert "next, on the demo's files" in res.stdout
    assert (work / "demo" / "original" / "config.json").is_file()
