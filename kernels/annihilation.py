"""Directions a set of weight matrices cannot write: the fingerprint weight orthogonalization leaves.

Each group of residual writers (one layer's attention output, one layer's MLP output with all its
experts, the embeddings) is summarised by the low end of its normalised Gram G = Σ W Wᵀ / Σ‖W‖²
(eigenvalues divided by their mean, so a typical direction carries energy 1): the K smallest eigenpairs
and the mean of the others. The energy a group puts along a unit vector is then exact inside that
K-dimensional subspace and the expected one outside it. A scaled ablation of strength s leaves
(1 − s)² of a typical energy along r̂ in every edited group; a clean group is that low only along its
own smallest eigenvectors, which no other group shares.

Candidates are every group's smallest eigenvectors. A candidate's evidence sums, over the groups other
than the one it came from, the decades by which their energy along it falls below 1. The null is
calibrated on the model itself: the same spectra with each group's low eigenvectors in an independent
random orientation (what "no direction shared between groups" looks like with exactly these spectra),
scanned the same way; the observed best evidence is compared with the null's best.
"""

from dataclasses import dataclass

import numpy as np

K = 8  # smallest eigenpairs kept per group
TAU = 0.25  # a group annihilates v when its energy along v is below this (strength ≥ 0.5)
PER_GROUP = 2  # candidate directions contributed by each group (its smallest eigenvectors)


@dataclass
class Spectrum:
    """The low end of one group's normalised Gram (eigenvalues / mean eigenvalue)."""

    low: np.ndarray  # [K] smallest eigenvalues, ascending
    basis: np.ndarray  # [d, K] their eigenvectors
    rest: float  # mean of the other eigenvalues: the expected energy outside the low subspace
    gain: np.ndarray | None = None  # post-norm gain g: the group writes g ⊙ RMSNorm(W x)
    floor: float = 0.0  # energy storage rounding leaves along any direction: nothing reads below it


def low_eigs(gram: np.ndarray, k: int, iters: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest eigenpairs of a symmetric PSD matrix: subspace iteration on (G + σI)⁻¹ with a
    block of 2k, then Rayleigh–Ritz. An isolated smallest eigenvalue (an ablated direction) converges in
    one or two steps; a continuum is approximated to well under a percent — at ~1/7 the cost of eigh."""
    d = gram.shape[0]
    if d <= 4 * k:
        values, vectors = np.linalg.eigh(gram)
        return values[:k], vectors[:, :k]
    mean = max(float(np.trace(gram)) / d, 1e-300)
    inverse = np.linalg.inv(gram + 1e-3 * mean * np.eye(d))
    x = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, 2 * k)))[0]
    for _ in range(iters):
        x = np.linalg.qr(inverse @ x)[0]
    values, u = np.linalg.eigh(x.T @ gram @ x)
    return values[:k], x @ u[:, :k]


def summarize(gram: np.ndarray, k: int = K, gain: np.ndarray | None = None, floor: float = 0.0) -> Spectrum:
    d = gram.shape[0]
    k = min(k, d - 1)
    gram = np.asarray(gram, dtype=np.float64)
    mean = max(float(np.trace(gram)) / d, 1e-300)
    values, vectors = low_eigs(gram, k)
    values = np.maximum(values / mean, floor)
    rest = max((d - float(values.sum())) / (d - k), floor)  # normalised eigenvalues sum to d
    return Spectrum(
        values, vectors, rest, None if gain is None else np.asarray(gain, dtype=np.float64), floor
    )


def _unit_cols(m: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(m, axis=0, keepdims=True)
    return m / np.where(n > 0, n, 1.0)


def seen_by(s: Spectrum, v: np.ndarray) -> np.ndarray:
    """What the group's weights must not write for the residual direction(s) v [d, m]: a post-norm
    block writes g ⊙ RMSNorm(W x), so removing r̂ from its output removes u ∝ g ⊙ r̂ from W."""
    return v if s.gain is None else _unit_cols(s.gain[:, None] * v)


def to_residual(s: Spectrum, u: np.ndarray) -> np.ndarray:
    """The inverse map: a direction u the weights cannot write → the residual direction r̂ ∝ u / g."""
    if s.gain is None:
        return u
    g = np.where(np.abs(s.gain) > 1e-12, s.gain, 1e-12)
    return _unit_cols(u / g[:, None])


def energy(s: Spectrum, v: np.ndarray) -> np.ndarray:
    """Energy (mean eigenvalue = 1) the group puts along each residual direction v [d, m] → [m]:
    exact inside its low subspace, the mean of the other eigenvalues outside it."""
    t = seen_by(s, np.asarray(v, dtype=np.float64).reshape(s.basis.shape[0], -1))
    c2 = (s.basis.T @ t) ** 2
    inside = np.clip(c2.sum(axis=0), 0.0, 1.0)
    return np.maximum(s.low @ c2 + s.rest * (1.0 - inside), s.floor)


def energies(spectra: list[Spectrum], v: np.ndarray) -> np.ndarray:
    """[groups, m]."""
    return np.stack([energy(s, v) for s in spectra])


def evidence(e: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """Decades below a typical direction's energy, summed over groups (axis 0) except each column's
    `source` group (a group's own smallest eigenvector is low in it by construction)."""
    score = np.maximum(0.0, -np.log10(np.maximum(e, 1e-300)))
    if source is not None:
        score[source, np.arange(score.shape[1])] = 0.0
    return score.sum(axis=0)


def candidates(spectra: list[Spectrum], per_group: int = PER_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """[d, m] residual directions to test (each group's smallest eigenvectors, mapped to r̂-space)
    and the group each came from."""
    cols = [to_residual(s, s.basis[:, :per_group]) for s in spectra]
    source = np.concatenate([np.full(c.shape[1], i) for i, c in enumerate(cols)])
    return np.concatenate(cols, axis=1), source


def best_direction(spectra: list[Spectrum], exclude: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The candidate with the most evidence (orthogonal to `exclude` [d, j], if given) and that evidence."""
    v, source = candidates(spectra)
    if exclude is not None:
        v = v - exclude @ (exclude.T @ v)
        keep = np.linalg.norm(v, axis=0) > 0.5  # mostly inside the excluded span: not a new direction
        v, source = _unit_cols(v[:, keep]), source[keep]
        if v.shape[1] == 0:
            return np.zeros(spectra[0].basis.shape[0]), 0.0
    ev = evidence(energies(spectra, v), source)
    i = int(np.argmax(ev))
    return v[:, i], float(ev[i])


def refine(spectra: list[Spectrum], v: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Average, over the groups that annihilate v, of the direction each one cannot write (the unit
    vector in its low subspace closest to v, mapped back to r̂-space), weighted by evidence."""
    e = energies(spectra, v)[:, 0]
    acc = np.zeros_like(v)
    for s, ei in zip(spectra, e):
        if ei >= TAU:
            continue
        t = seen_by(s, v[:, None])[:, 0]
        u = s.basis @ (s.basis.T @ t)
        u = to_residual(s, u[:, None])[:, 0]
        acc += np.sign(u @ v or 1.0) * u * -np.log10(max(ei, 1e-300))
    if exclude is not None:
        acc -= exclude @ (exclude.T @ acc)
    n = np.linalg.norm(acc)
    return acc / n if n > 0 else v


def random_twin(s: Spectrum, rng: np.random.Generator) -> Spectrum:
    """The same spectrum with its low eigenvectors in an independent random orientation."""
    q, _ = np.linalg.qr(rng.normal(size=s.basis.shape))
    return Spectrum(s.low, q, s.rest, s.gain, s.floor)


def null_evidence(spectra: list[Spectrum], samples: int, seed: int = 0) -> np.ndarray:
    """Best evidence of a scan over `samples` models with these spectra and no shared direction."""
    rng = np.random.default_rng(seed)
    return np.array([best_direction([random_twin(s, rng) for s in spectra])[1] for _ in range(samples)])


def strength(e: np.ndarray) -> np.ndarray:
    """Rough edit strength from the energy left along r̂: a clean direction carries about the mean
    eigenvalue (1), a scaled ablation (1 − s)² of it."""
    return np.clip(1.0 - np.sqrt(np.maximum(e, 0.0)), 0.0, 1.0)


# --- shared structure across groups: what a real model's natural low directions do not have -------


def isolation(gram: np.ndarray, k: int = K) -> tuple[float, np.ndarray, float]:
    """How far the smallest eigenvalue of a mean of normalised Grams stands below the low edge of the
    rest (its ratio to the median of the next k): ~1 when no direction is shared by the groups, (1 − s)²
    when every group was ablated with strength s along one direction. Returns (ratio, v, λ₁)."""
    values, vectors = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
    edge = float(np.median(values[1 : k + 1]))
    return float(values[0] / max(edge, 1e-300)), vectors[:, 0], float(values[0])


def layer_directions(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the direction its attention and MLP writers together write least (the smallest
    eigenvector of G_attn + G_mlp) and the two energies along it: [L, d], [L, 2]."""
    dirs, energy_pairs = [], []
    for a, m in pairs:
        _, vectors = np.linalg.eigh(a + m)
        u = vectors[:, 0]
        dirs.append(u)
        energy_pairs.append([u @ a @ u, u @ m @ u])
    return np.array(dirs), np.maximum(np.array(energy_pairs), 1e-300)


def tracks(dirs: np.ndarray, link: float) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of consecutive layers whose directions stay linked (|cos| ≥ link):
    a per-layer difference of means moves smoothly, a clean model's per-layer minima do not."""
    runs, start = [], 0
    for i in range(1, len(dirs) + 1):
        if i == len(dirs) or abs(float(dirs[i] @ dirs[i - 1])) < link:
            runs.append((start, i))
            start = i
    return runs
