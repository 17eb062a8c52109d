"""The peer benchmark's own pieces: the prompt splits (disjoint, fixed), the peer's config (the same
prompts, tokens and trials patcher gets), and the plot of several fronts."""

import sys
import tomllib

from conftest import ROOT

from patcher.search.report import fronts_svg, write_fronts

sys.path.insert(0, str(ROOT / "scripts"))
import bench_peer
import prompt_sets


def test_splits_are_disjoint_fixed_and_sized():
    pool = [f"prompt {i}" for i in range(50)]
    sizes = {"train": 20, "search": 10, "test": 15}
    a, b = prompt_sets.split(pool, sizes), prompt_sets.split(pool, sizes)
    assert a == b and {k: len(v) for k, v in a.items()} == sizes
    seen = [p for v in a.values() for p in v]
    assert len(set(seen)) == len(seen) == 45
    harmless = prompt_sets.harmless_pool()
    assert len(harmless) >= 200 and len(set(harmless)) == len(harmless)
    assert sum(prompt_sets.SPLITS["harmless"].values()) <= len(harmless)


def test_peer_config_matches_patchers_settings(tmp_path):
    P = {k: tmp_path / f"{k}.txt" for k in prompt_sets.paths(tmp_path)}
    cfg = tomllib.loads(bench_peer.heretic_config(tmp_path / "m", P, 8, 2, 48, 0, 64))
    assert cfg["n_trials"] == 8 and cfg["n_startup_trials"] == 2 and cfg["max_response_length"] == 48
    assert cfg["bad_evaluation_prompts"]["dataset"] == str(P["harmful-search"])
    assert cfg["good_prompts"]["dataset"] == str(P["harmless-train"])
    assert cfg["system_prompt"] == bench_peer.SYSTEM and cfg["model"] == str(tmp_path / "m")


def test_fronts_plot_has_one_line_per_series():
    svg = fronts_svg(
        {"patcher": [(0.1, 0.05), (0.3, 0.01)], "heretic": [(0.2, 0.1)]}, "t", {"original": (0.5, 0)}
    )
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 3
    assert "patcher" in svg and "heretic" in svg and "original" in svg


def test_fronts_plot_is_written_whole(tmp_path):
    # write_fronts (bench_peer's last step) once called a helper the storage merge removed
    path = tmp_path / "peer.svg"
    series = {"patcher": [(0.1, 0.05)], "heretic": [(0.2, 0.1)]}
    write_fronts(path, series, "t")
    assert path.read_text(encoding="utf-8") == fronts_svg(series, "t")
    assert [p.name for p in tmp_path.iterdir()] == ["peer.svg"]  # no partial file left beside it
