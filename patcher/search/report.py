"""What a search shows: the Pareto front as rows, and a dependency-free SVG of every trial with the
front (same plain style as patcher/io/plot.py)."""

import math
from pathlib import Path

from patcher.errors import PatcherError


def params_text(params: dict) -> str:
    """Compact parameters: scope/dir, then per component peak@center (min, width)."""
    parts = [params.get("direction_scope", "")]
    if params.get("direction_scope") == "global":
        parts.append(f"dir {params['direction_index']:.2f}")
    for c in ("attn_out", "mlp_out"):
        if f"{c}_peak" in params:
            parts.append(
                f"{c.split('_')[0]} {params[f'{c}_peak']:.2f}@{params[f'{c}_center']:.1f} "
                f"(min {params[f'{c}_min_frac'] * params[f'{c}_peak']:.2f}, w {params[f'{c}_width']:.1f})"
            )
    if params.get("embed"):
        parts.append(f"embed {params.get('embed_strength', 0):.2f}")
    if params.get("norm_preserve") not in (None, "none"):
        parts.append(f"norm {params['norm_preserve']}")
    return ", ".join(parts)


def _x(kl: float, lo: float, hi: float, left: float, width: float) -> float:
    v = math.log10(max(kl, 10**lo))
    return left + (v - lo) / max(hi - lo, 1e-9) * width


def svg(
    points: list[tuple[int, float, float]],
    front: list[tuple[int, float, float]],
    title: str,
    extra: dict | None = None,
    y_label: str = "marker rate",
) -> str:
    """points/front: (trial, marker_rate, kl). extra: label -> (marker_rate, kl) reference points."""
    W, H, pad, top = 720, 420, 60, 40
    kls = [k for _, _, k in points + front if k > 0] + [k for _, k in (extra or {}).values() if k > 0]
    lo = math.floor(math.log10(min(kls))) if kls else -4
    hi = math.ceil(math.log10(max(kls))) if kls else 0
    hi = max(hi, lo + 1)
    left, width = pad, W - 2 * pad
    y = lambda r: H - pad - r * (H - pad - top)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{top}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
        f'<text x="{W / 2}" y="{H - 15}" text-anchor="middle">KL(original ‖ edited), log scale '
        f"(KL ≤ 1e{lo} drawn at the left edge)</text>",
        f'<text x="15" y="{(H - pad + top) / 2}" text-anchor="middle" transform="rotate(-90 15 '
        f'{(H - pad + top) / 2})">{y_label}</text>',
    ]
    for e in range(lo, hi + 1):
        xe = _x(10**e, lo, hi, left, width)
        parts.append(f'<text x="{xe:.1f}" y="{H - pad + 16}" text-anchor="middle">1e{e}</text>')
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{pad - 6}" y="{y(r) + 4:.1f}" text-anchor="end">{r:.2f}</text>')
    for _, rate, kl in points:
        parts.append(
            f'<circle cx="{_x(kl, lo, hi, left, width):.1f}" cy="{y(rate):.1f}" r="3" fill="#999" '
            f'fill-opacity="0.6"/>'
        )
    if front:
        pts = sorted(front, key=lambda p: p[2])
        parts.append(
            '<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="'
            + " ".join(f"{_x(k, lo, hi, left, width):.1f},{y(r):.1f}" for _, r, k in pts)
            + '"/>'
        )
        for n, rate, kl in pts:
            cx, cy = _x(kl, lo, hi, left, width), y(rate)
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" fill="#d62728"/>')
            parts.append(f'<text x="{cx + 6:.1f}" y="{cy - 6:.1f}" fill="#d62728" font-size="10">#{n}</text>')
    for i, (label, (rate, kl)) in enumerate((extra or {}).items()):
        cx, cy = _x(kl, lo, hi, left, width), y(rate)
        parts.append(f'<rect x="{cx - 5:.1f}" y="{cy - 5:.1f}" width="10" height="10" fill="#1f77b4"/>')
        parts.append(f'<text x="{cx + 8:.1f}" y="{cy + 14 + 12 * i:.1f}" fill="#1f77b4">{label}</text>')
    parts.append(
        f'<text x="{W - pad}" y="{top + 12}" text-anchor="end" fill="#d62728">Pareto front '
        f"({len(front)} of {len(points)} trials)</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts)


def write_plot(path: Path, points, front, title: str, extra=None, y_label: str = "marker rate") -> None:
    path = Path(path)
    if path.suffix != ".svg":
        raise PatcherError(path, "the search plot is written as .svg")
    from patcher.io.atomic import AtomicOutput

    with AtomicOutput(path) as tmp:
        tmp.write_text(svg(points, front, title, extra, y_label), encoding="utf-8")


COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")


def fronts_svg(series: dict[str, list[tuple[float, float]]], title: str, extra: dict | None = None) -> str:
    """Several Pareto fronts on one plot: label -> [(marker_rate, kl)], each its own colour and line;
    extra: label -> (marker_rate, kl) reference points (grey squares)."""
    W, H, pad, top = 720, 420, 60, 40
    pts = [p for s in series.values() for p in s] + list((extra or {}).values())
    kls = [k for _, k in pts if k > 0]
    lo = math.floor(math.log10(min(kls))) if kls else -4
    hi = max(math.ceil(math.log10(max(kls))) if kls else 0, lo + 1)
    left, width = pad, W - 2 * pad
    y = lambda r: H - pad - r * (H - pad - top)  # noqa: E731
    x = lambda k: _x(k, lo, hi, left, width)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{top}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
        f'<text x="{W / 2}" y="{H - 15}" text-anchor="middle">KL(original ‖ edited), log scale</text>',
        f'<text x="15" y="{(H - pad + top) / 2}" text-anchor="middle" transform="rotate(-90 15 '
        f'{(H - pad + top) / 2})">refusal (marker) rate</text>',
    ]
    parts += [
        f'<text x="{x(10**e):.1f}" y="{H - pad + 16}" text-anchor="middle">1e{e}</text>'
        for e in range(lo, hi + 1)
    ]
    parts += [
        f'<text x="{pad - 6}" y="{y(r) + 4:.1f}" text-anchor="end">{r:.2f}</text>'
        for r in (0, 0.25, 0.5, 0.75, 1)
    ]
    for i, (label, front) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        line = sorted(front, key=lambda p: p[1])
        parts.append(
            f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="'
            + " ".join(f"{x(k):.1f},{y(r):.1f}" for r, k in line)
            + '"/>'
        )
        parts += [f'<circle cx="{x(k):.1f}" cy="{y(r):.1f}" r="4.5" fill="{c}"/>' for r, k in line]
        parts.append(
            f'<text x="{W - pad}" y="{top + 14 * (i + 1)}" text-anchor="end" fill="{c}">{label}</text>'
        )
    for label, (r, k) in (extra or {}).items():
        parts.append(f'<rect x="{x(k) - 5:.1f}" y="{y(r) - 5:.1f}" width="10" height="10" fill="#777"/>')
        parts.append(f'<text x="{x(k) + 8:.1f}" y="{y(r) + 4:.1f}" fill="#777">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_fronts(path: Path, series: dict, title: str, extra: dict | None = None) -> None:
    from patcher.io.atomic import AtomicOutput

    with AtomicOutput(Path(path)) as tmp:
        tmp.write_text(fronts_svg(series, title, extra), encoding="utf-8")
