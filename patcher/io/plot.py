"""A dependency-free SVG line chart of the per-layer extraction scores (PNG through matplotlib,
when it happens to be installed)."""

import math
from pathlib import Path
from xml.sax.saxutils import escape

from patcher.errors import PatcherError
from patcher.io.paths import SVG_MARK

SERIES = (
    ("snr", "signal-to-noise", "#1f77b4"),
    ("diff_norm", "|mean difference|", "#ff7f0e"),
    ("relative_norm", "|mean difference| / |resid|", "#2ca02c"),
    ("neighbour_cos", "cos with neighbours", "#9467bd"),
)


def _xml_text(text: str) -> str:
    """Escaped, and without what XML 1.0 forbids even escaped (control characters, lone surrogates)."""
    text = str(text).encode("utf-8", "replace").decode("utf-8")
    text = "".join(c for c in text if c in "\t\n" or ord(c) >= 0x20 and c not in "\ufffe\uffff")
    return escape(text)


def _svg(scores: list[dict], selected: int, title: str) -> str:
    W, H, pad, top = 720, 380, 50, 40
    layers = [s["layer"] for s in scores]
    lo, hi = min(layers), max(max(layers), min(layers) + 1)
    x = lambda l: pad + (l - lo) / (hi - lo) * (W - 2 * pad)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        'font-size="12">',
        SVG_MARK,
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{_xml_text(title)}</text>',
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
        f'<line x1="{x(selected):.1f}" y1="{top}" x2="{x(selected):.1f}" y2="{H - pad}" stroke="red" '
        f'stroke-dasharray="4"/>',
        f'<text x="{x(selected) + 4:.1f}" y="{top + 12}" fill="red">selected {selected}</text>',
    ]
    for l in layers:
        parts.append(f'<text x="{x(l):.1f}" y="{H - pad + 16}" text-anchor="middle">{l}</text>')
    parts.append(
        f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">resid_pre layer (each series scaled '
        f"to its own max)</text>"
    )
    for i, (key, label, color) in enumerate(SERIES):
        pts = [
            (s["layer"], s[key])
            for s in scores
            if isinstance(s.get(key), (int, float)) and s[key] == s[key] and abs(s[key]) != float("inf")
        ]
        if not pts:
            continue
        m = max(abs(v) for _, v in pts) or 1.0
        y = lambda v: H - pad - (v / m) * (H - pad - top - 20)  # noqa: E731
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
            + " ".join(f"{x(l):.1f},{y(v):.1f}" for l, v in pts)
            + '"/>'
        )
        parts.append(
            f'<text x="{pad + 10}" y="{top + 20 + 15 * i}" fill="{color}">{label} (max {m:.3g})</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def check_plot_path(path) -> None:
    """Before any work: the plot's type must be one we can write."""
    path = Path(path)
    if path.suffix.lower() not in (".svg", ".png"):
        raise PatcherError(path, "plot files are .svg (built in) or .png (needs matplotlib)")
    if path.suffix.lower() == ".png":
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise PatcherError(
                path, "PNG plots need matplotlib (pip install matplotlib); .svg works without it"
            )


def plot_scores(path, scores: list[dict], selected: int, title: str = "difference-in-means scores") -> None:
    """Write the plot atomically (a hidden partial file renamed into place)."""
    path = Path(path)
    check_plot_path(path)
    from patcher.io.atomic import AtomicOutput

    with AtomicOutput(path) as tmp:
        if path.suffix.lower() == ".svg":
            tmp.write_text(_svg(scores, selected, title), encoding="utf-8")
        else:
            _png(tmp, scores, selected, title)


def _png(path: Path, scores: list[dict], selected: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label, color in SERIES:
        pts = [
            (s["layer"], s[key])
            for s in scores
            if isinstance(s.get(key), (int, float)) and math.isfinite(s[key])
        ]
        if pts:
            m = max(abs(v) for _, v in pts) or 1.0
            ax.plot([p[0] for p in pts], [p[1] / m for p in pts], label=f"{label} (max {m:.3g})", color=color)
    ax.axvline(selected, color="red", linestyle="--")
    ax.set_xlabel("resid_pre layer")
    ax.set_title(str(title).replace("$", r"\$"))  # '$' would start matplotlib math text
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png", metadata={"Software": "patcher"})
    plt.close(fig)
