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
