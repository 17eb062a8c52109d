"""The numpy backend of patcher/forward.py: executes the forward description in float32.

Weights come from a dict (one block's tensors, or the top-level ones), decoded to float32 by the
caller. Activations are [batch, seq, features]; attention heads are [batch, heads, seq, head_dim].
The batch is left-padded: `attention_mask` marks real tokens, `position_ids` count real tokens.
"""

import math

import numpy as np

F32 = np.float32
_NEG = np.finfo(F32).min  # finite "minus infinity", as HF uses: fully masked rows stay finite


def erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1e-7 (Abramowitz & Stegun 7.1.26 refined): numpy has no erf and scipy is not a dependency."""
    x64 = x.astype(np.float64)
    t = 1.0 / (1.0 + 0.5 * np.abs(x64))
    # Numerical Recipes erfc (Chebyshev fit, fractional error < 1.2e-7 everywhere)
    poly = (
        -x64 * x64
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t
                        * (
                            0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))
                        )
                    )
                )
            )
        )
    )
    erfc = t * np.exp(poly)
    return np.where(x64 >= 0, 1.0 - erfc, erfc - 1.0).astype(x.dtype)


def silu(x: np.ndarray) -> np.ndarray:
    t = np.negative(x)  # one temporary, updated in place
    np.exp(t, out=t)
    t += 1
    return np.divide(x, t, out=t)


ACTS = {
    "silu": silu,
    "swish": silu,
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / F32(math.sqrt(2.0)))),
    "gelu_pytorch_tanh": lambda x: (
        0.5 * x * (1.0 + np.tanh(F32(math.sqrt(2.0 / math.pi)) * (x + F32(0.044715) * x**3)))
    ),
    "relu": lambda x: np.maximum(x, 0),
}
ACTS["gelu_new"] = ACTS["gelu_fast"] = ACTS["gelu_tanh"] = ACTS["gelu_pytorch_tanh"]


def _yarn(rope, inv: np.ndarray) -> tuple[np.ndarray, float]:
    """YaRN (as HF computes it): interpolate low frequencies, keep high ones, ramp between."""
    p, dim, base = rope.params, rope.dim, rope.theta
    factor, old = float(p["factor"]), float(p["original_max_position_embeddings"])
    mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
    att = p.get("attention_factor")
    if att is None:
        att = (
            mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            if p.get("mscale") and p.get("mscale_all_dim")
            else mscale(factor)
        )
    corr = lambda rot: dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low, high = corr(p.get("beta_fast") or 32), corr(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / ((high + 0.001 if high == low else high) - low), 0, 1)
    extrapolate = 1 - ramp
    return inv / factor * (1 - extrapolate) + inv * extrapolate, float(att)


def rope_inv_freq(rope) -> tuple[np.ndarray, float]:
    """Inverse frequencies for the rotated dims with the supported scaling kinds applied, and the
    factor cos/sin are multiplied by (YaRN's attention factor; 1 otherwise)."""
    dim = rope.dim
    inv = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    p = rope.params
    if rope.kind == "yarn":
        inv, att = _yarn(rope, inv.astype(F32).astype(np.float64))
        return inv.astype(F32), att
    if rope.kind == "linear":
        inv = inv / float(p["factor"])
    elif rope.kind == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen >= old / high) & (wavelen <= old / low)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.astype(F32), 1.0


class NumpyOps:
    def __init__(self, weights: dict, attention_mask: np.ndarray, position_ids: np.ndarray):
        self.weights = weights
        self.mask = attention_mask.astype(bool)  # [B, T]
        self.pos = position_ids  # [B, T]
        self._cos_sin: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    # --- weights -------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.weights

    def w(self, name: str) -> np.ndarray:
        return self.weights[name]

    # --- elementwise ---------------------------------------------------------------------------
    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def scale(self, x, s: float):
        return x * F32(s)

    def sigmoid(self, x):
        return 1.0 / (1.0 + np.exp(-x))

    def act(self, x, kind: str):
        return ACTS[kind](x)

    def softcap(self, x, cap: float):
        return np.tanh(x / F32(cap)) * F32(cap)

    # --- layers --------------------------------------------------------------------------------
    def embedding(self, name: str, ids):
        rows = getattr(self.weights, "rows", None)  # lazy weights decode only the rows used
        return rows(name, ids) if rows else self.weights[name][ids]

    def linear(self, x, weight: str, bias: str | None, conv1d: bool = False):
        w = self.weights[weight]
        # one [B*T, d] GEMM: numpy runs a 3-D matmul as B small ones, ~2x slower
        y = (x.reshape(-1, x.shape[-1]) @ (w if conv1d else w.T)).reshape(*x.shape[:-1], -1)
        return y + self.weights[bias] if bias else y

    def rms_norm(self, x, weight: str, eps: float, offset: float = 0.0):
        var = np.mean(np.square(x), axis=-1, keepdims=True)
        return x / np.sqrt(var + F32(eps)) * (F32(offset) + self.weights[weight])

    def layer_norm(self, x, weight: str, bias: str, eps: float):
        mu = np.mean(x, axis=-1, keepdims=True)
        var = np.mean(np.square(x - mu), axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + F32(eps)) * self.weights[weight] + self.weights[bias]

    # --- attention -----------------------------------------------------------------------------
    def split(self, x, sizes):
        sizes = [x.shape[-1] // sizes] * sizes if isinstance(sizes, int) else sizes
        return np.split(x, np.cumsum(sizes)[:-1], axis=-1)

    def split_per_head(self, x, heads: int, parts: int, head_dim: int):
        B, T, _ = x.shape
        y = x.reshape(B, T, heads, parts * head_dim)
        return [
            y[..., i * head_dim : (i + 1) * head_dim].reshape(B, T, heads * head_dim) for i in range(parts)
        ]

    def heads(self, x, n: int, head_dim: int):
        B, T, _ = x.shape
        return x.reshape(B, T, n, head_dim).transpose(0, 2, 1, 3)

    def merge_heads(self, x):
        B, H, T, hd = x.shape
        return x.transpose(0, 2, 1, 3).reshape(B, T, H * hd)

    def rope(self, x, rope):
        """Rotate the first rope.dim dims: halves (rotate_half) or, if interleaved, even/odd pairs
        (DeepSeek), whose output is laid out as [evens', odds'] exactly as HF does."""
        key = (rope.theta, rope.dim, rope.kind)
        if key not in self._cos_sin:
            inv, att = rope_inv_freq(rope)
            freqs = self.pos[:, None, :, None].astype(F32) * inv  # [B, 1, T, dim/2]
            self._cos_sin[key] = (np.cos(freqs) * F32(att), np.sin(freqs) * F32(att))
        cos, sin = self._cos_sin[key]
        half = rope.dim // 2
        rot, rest = x[..., : rope.dim], x[..., rope.dim :]
        x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if rope.interleaved else (rot[..., :half], rot[..., half:])
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)

    def concat(self, xs, axis: int = -1):
        return np.concatenate(xs, axis=axis)

    def expand_heads(self, x, n: int):
        return np.broadcast_to(x, (x.shape[0], n, *x.shape[2:]))

    def attend(self, q, k, v, layer: int, scale: float, softcap: float | None, window: int | None):
        """Causal attention of T queries over S >= T keys (the queries are the last T positions: S > T
        when keys come from a decode cache); self.mask covers the S key positions."""
        B, H, T, hd = q.shape
        kvh, S = k.shape[1], k.shape[2]
        # grouped-query attention without copying k/v: queries as [B, kv_heads, groups*T, hd]
        qg = q.reshape(B, kvh, (H // kvh) * T, hd)
        scores = (qg @ k.transpose(0, 1, 3, 2)).reshape(B, H, T, S) * F32(scale)
        if softcap:
            scores = np.tanh(scores / F32(softcap)) * F32(softcap)
        i, j = (S - T) + np.arange(T)[:, None], np.arange(S)[None, :]
        allowed = (j <= i) & self.mask[:, None, None, :]
        if window:  # by position, not column: padding may sit between a shared prefix and a row's tokens
            kpos = np.cumsum(self.mask, 1)
            allowed = allowed & ((kpos[:, -T:, None] - kpos[:, None, :]) < window)[:, None]
        scores = np.where(allowed, scores, _NEG)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        return (p.reshape(B, kvh, (H // kvh) * T, S) @ v).reshape(B, H, T, v.shape[-1])

    def moe(self, x, router: str, top_k: int, normalize: bool, experts, grouped: dict | None = None):
        """Route each token to top_k experts. Softmax routing (Mixtral, Qwen) by default; `grouped`
        selects DeepSeek-V3's sigmoid scores + correction bias, best groups first, then top_k."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        logits = flat @ self.weights[router].T
        if grouped is None:
            probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            choice = probs
        else:
            probs = 1.0 / (1.0 + np.exp(-logits))
            choice = probs + self.weights[grouped["bias"]] if grouped["bias"] in self.weights else probs
            E, G = choice.shape[1], grouped["n_group"]
            per_group = np.sort(choice.reshape(-1, G, E // G), axis=-1)[..., -2:].sum(axis=-1)
            keep = np.argsort(-per_group, axis=-1, kind="stable")[:, : grouped["topk_group"]]
            group_mask = np.zeros_like(per_group, dtype=bool)
            np.put_along_axis(group_mask, keep, True, axis=-1)
            choice = np.where(np.repeat(group_mask, E // G, axis=-1), choice, -np.inf)
        top = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]
        weights = np.take_along_axis(probs, top, axis=-1)
        if normalize:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + (1e-20 if grouped else 0.0))
        if grouped:
            weights = weights * F32(grouped["scaling"])
        out = np.zeros_like(flat)
        for e, expert in enumerate(experts):
            rows, slot = np.nonzero(top == e)
            if rows.size:
                y = expert(flat[rows][None])[0]
                out[rows] += weights[rows, slot][:, None] * y
        return out.reshape(B, T, d)
