"""`patcher demo`, the README's main job: every stage runs on the bundled data and reports."""

import re

from conftest import run_cli


def test_demo_runs_every_stage_and_reports(tmp_path):
    res = run_cli("demo", "--out", tmp_path / "demo")
    text = res.stdout
    cos = float(re.search(r"cosine with the planted direction ([0-9.]+)", text)[1])
    assert cos >= 0.99
    assert "rank-1 directional ablation along one shared direction (7 tensors)" in text
    assert "bias injection at layer 1" in text
    assert re.search(r"max \|Δ logits\| [0-9.e+-]+ \(ok\)", text)
    for folder in ("ablated", "ablated-injected", "onnx"):
        assert (tmp_path / "demo" / folder / "patcher-manifest.json").is_file()
    assert (tmp_path / "demo" / "directions.safetensors").is_file()


def test_demo_ends_with_next_commands_that_run_as_printed(tmp_path, monkeypatch):
    """The commands the demo suggests run on the files it leaves, from the user's folder, and do what
    they say: extract (no chat template, as printed) finds the planted direction, ablate removes it."""
    import shlex

    import numpy as np
    from conftest import DEMO

    from patcher.edit.directions import load_direction

    demo = tmp_path / "demo"
    text = run_cli("demo", "--out", demo).stdout
    lines = [ln.strip() for ln in text[text.index("next, on the demo's files") :].splitlines()[1:]]
    commands = [shlex.split(ln)[1:] for ln in lines if ln.startswith("patcher ")]
    assert [c[0] for c in commands] == ["inspect", "extract", "ablate", "diff", "export", "generate", "web"]
    monkeypatch.chdir(tmp_path)
    for args in commands[:-1]:  # `web --serve` would serve until Ctrl-C (tests/test_web.py builds sites)
        run_cli(*args, expect=1 if args[0] == "diff" else 0)  # diff's 1 is its finding: weights changed
    v = np.load(DEMO / "planted-direction.npy").astype(np.float64)
    d = load_direction(str(tmp_path / "my-direction.safetensors"), 64).unit[0]
    assert abs(d @ v) >= 0.99
    assert (tmp_path / "my-ablated" / "patcher-manifest.json").is_file()
    assert (tmp_path / "my-onnx" / "onnx" / "model.onnx").is_file()
