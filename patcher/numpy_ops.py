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
    poly = -x64 * x64 - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x64 >= 0, 1.0 - erfc, erfc - 1.0).astype(x.dtype)


ACTS = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / F32(math.sqrt(2.0)))),
    "gelu_pytorch_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(F32(math.sqrt(2.0 / math.pi)) * (x + F32(0.044715) * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
}
ACTS["gelu_new"] = ACTS["gelu_fast"] = ACTS["gelu_tanh"] = ACTS["gelu_pytorch_tanh"]


def rope_inv_freq(rope) -> np.ndarray:
    """Inverse frequencies for the rotated dims, with the supported scaling kinds applied."""
    dim = rope.dim
    inv = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    p = rope.params
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
    return inv.astype(F32)


class NumpyOps:
    def __init__(self, weights: dict, attention_mask: np.ndarray, position_ids: np.ndarray):
        self.weights = weights
        self.mask = attention_mask.astype(bool)  # [B, T]
        self.pos = position_ids  # [B, T]
        self._cos_sin = {}

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

    def scale(self, x, s: float, round_to_dtype: bool = False):
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
        y = x @ (w if conv1d else w.T)
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
        return [y[..., i * head_dim:(i + 1) * head_dim].reshape(B, T, heads * head_dim) for i in range(parts)]

    def heads(self, x, n: int, head_dim: int):
        B, T, _ = x.shape
        return x.reshape(B, T, n, head_dim).transpose(0, 2, 1, 3)

    def merge_heads(self, x):
        B, H, T, hd = x.shape
        return x.transpose(0, 2, 1, 3).reshape(B, T, H * hd)

    def rope(self, x, rope):
        key = (rope.theta, rope.dim, rope.kind)
        if key not in self._cos_sin:
            freqs = self.pos[:, None, :, None].astype(F32) * rope_inv_freq(rope)  # [B, 1, T, dim/2]
            self._cos_sin[key] = (np.cos(freqs), np.sin(freqs))
        cos, sin = self._cos_sin[key]
        half = rope.dim // 2
        x1, x2, rest = x[..., :half], x[..., half:rope.dim], x[..., rope.dim:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)

    def attend(self, q, k, v, layer: int, scale: float, softcap: float | None, window: int | None):
        B, H, T, hd = q.shape
        groups = H // k.shape[1]
        if groups > 1:
            k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
        scores = (q @ k.transpose(0, 1, 3, 2)) * F32(scale)
        if softcap:
            scores = np.tanh(scores / F32(softcap)) * F32(softcap)
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        allowed = (j <= i) & self.mask[:, None, None, :]
        if window:
            allowed = allowed & (i - j < window)
        scores = np.where(allowed, scores, _NEG)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        return p @ v

    def moe(self, x, router: str, top_k: int, normalize: bool, experts):
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        logits = flat @ self.weights[router].T
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        weights = np.take_along_axis(probs, top, axis=-1)
        if normalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        out = np.zeros_like(flat)
        for e, expert in enumerate(experts):
            rows, slot = np.nonzero(top == e)
            if rows.size:
                y = expert(flat[rows][None])[0]
                out[rows] += weights[rows, slot][:, None] * y
        return out.reshape(B, T, d)
