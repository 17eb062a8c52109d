"""patcher and Hugging Face's PyPI `kernels` package installed in one environment: patcher's math installs
as `patcher_kernels`, so `import kernels` is HF's and both work. Run in a subprocess whose working
folder is outside the repository (the repository root on sys.path would put its kernels/ folder first)."""
import subprocess
import sys
import textwrap

from conftest import ROOT

SCRIPT = textwrap.dedent('''
    import pathlib, sys
    import numpy as np
    import torch
    import kernels
    import patcher_kernels
    from kernels import Mode, kernelize, use_kernel_forward_from_hub
    from patcher_kernels.project import project_full
    from patcher.cli import app  # the whole CLI imports beside HF's kernels

    repo = pathlib.Path(sys.argv[1]).resolve()
    hf, ours = pathlib.Path(kernels.__file__).resolve(), pathlib.Path(patcher_kernels.__file__).resolve()
    assert repo not in hf.parents and "site-packages" in hf.parts, hf
    assert ours == repo / "kernels" / "__init__.py", ours

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
''')


def test_pypi_kernels_and_patcher_kernels_work_together(tmp_path):
    env_check = subprocess.run([sys.executable, "-c", "import kernels, sys; print(kernels.__file__)"],
                               cwd=tmp_path, capture_output=True, text=True)
    assert env_check.returncode == 0, ("the PyPI `kernels` package is part of the test extra: "
                                       "pip install -e '.[test]'\n" + env_check.stderr)
    script = tmp_path / "both.py"
    script.write_text(SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(ROOT)], cwd=tmp_path, capture_output=True,
                         text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                         "HOME": str(tmp_path)}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok kernels patcher_kernels"
