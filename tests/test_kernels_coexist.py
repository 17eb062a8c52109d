"""patcher and Hugging Face's PyPI `kernels` package installed in one environment.

patcher's math lives in the repository's kernels/ folder and installs as `patcher_kernels`. The folder has no
`__init__.py`, so it is never a regular package named `kernels`: run from the checkout (whose root
`python -m pytest`, `python -c` and `python script.py` put first on sys.path), it is at most a namespace
portion, and Python's import system prefers any regular package, HF's, found later on the path. Each case
runs the way users run things, with the repository root as the working folder."""

import subprocess
import sys
import textwrap

from conftest import ROOT

CHECK = textwrap.dedent("""
    import pathlib, sys
    import numpy as np
    import torch
    import kernels
    import patcher_kernels.project
    from kernels import Mode, kernelize, use_kernel_forward_from_hub
    from patcher_kernels.project import project_full
    from patcher.cli import app  # the whole CLI imports beside HF's kernels
    import transformers
    from transformers.integrations import hub_kernels  # transformers' own use of HF's kernels

    repo = pathlib.Path(REPO).resolve()
    hf = pathlib.Path(kernels.__file__).resolve()
    ours = pathlib.Path(patcher_kernels.project.__file__).resolve()
    assert repo not in hf.parents and "site-packages" in hf.parts, hf
    assert ours == repo / "kernels" / "project.py", ours
    assert hub_kernels.is_kernels_available(), "transformers does not see HF's kernels"

    # patcher's projection W - r(rᵀW) against float64 by hand
    rng = np.random.default_rng(0)
    w, r = rng.standard_normal((8, 5)), rng.standard_normal(8)
    r /= np.linalg.norm(r)
    got = project_full(w.astype(np.float32), r[:, None], residual_axis=0)
    assert np.abs(got - (w - np.outer(r, r @ w))).max() < 1e-5
    assert np.abs(r @ got).max() < 1e-5

    # HF kernels: a hub-kernel layer, kernelized offline with no mapping, keeps its own forward
    @use_kernel_forward_from_hub("SiluAndMul")
    class SiluAndMul(torch.nn.Module):
        def forward(self, x):
            d = x.shape[-1] // 2
            return torch.nn.functional.silu(x[..., :d]) * x[..., d:]

    model = kernelize(torch.nn.Sequential(SiluAndMul()), mode=Mode.INFERENCE, device="cpu")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    want = x[:, :4] / (1 + torch.exp(-x[:, :4])) * x[:, 4:]
    assert torch.allclose(model(x), want, atol=1e-6)
    print("ok", kernels.__name__, patcher_kernels.__name__)
""").replace("REPO", repr(str(ROOT)))

# pytest collects this from the repository root exactly as README's `python -m pytest` does
PYTEST_CASE = textwrap.dedent("""
    def test_both():
        exec(compile(CHECK, "check", "exec"), {})
""").replace("CHECK", repr(CHECK))


def _run(args, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )


def test_hf_kernels_is_installed_for_this_check(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", "import kernels; print(kernels.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "site-packages" in res.stdout, (
        "the PyPI `kernels` package is part of the test extra: pip install -e '.[test]'\n" + res.stderr
    )


def test_no_regular_kernels_package_in_the_checkout():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py would make the folder shadow HF's `kernels` for anything run from the checkout"
    )


def test_python_c_from_the_checkout_root(tmp_path):
    res = _run(["-c", CHECK], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok kernels patcher_kernels"


def test_script_that_puts_the_checkout_first(tmp_path):
    # scripts/ put the repository root first on sys.path (bench_search.py, make_fixtures.py, ...)
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + CHECK)
    res = _run([str(script)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok kernels patcher_kernels"


def test_python_m_pytest_from_the_checkout_root(tmp_path):
    case = tmp_path / "test_coexist_inner.py"
    case.write_text(PYTEST_CASE)
    res = _run(
        [
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "--confcutdir",
            str(tmp_path),
            str(case),
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
