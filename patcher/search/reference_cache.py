"""The original model's reference (greedy completions, log-probs for the KL) kept beside the study
(STUDY.reference.npz), so a resumed or repeated study never computes it again.

The file holds the key it was made for: a sha256 over the model's identity, the evaluation
settings, the prompts as token ids, EOS ids, batch size, provider and padding id. Another key, or a
file that cannot be read, means the reference is computed again and the file rewritten (a cache:
losing it only costs time). Arrays only (no pickle): completions as one flat token array + lengths.
"""

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from patcher import __version__

VERSION = 1


def key(
    model_identity: str, evaluation: dict, positive, negative, eos, batch_size: int, provider, pad
) -> str:
    blob = json.dumps(
        {
            "version": VERSION,
            "patcher": __version__,
            "model": model_identity,
            "evaluation": evaluation,
            "positive": positive,
            "negative": negative,
            "eos": [int(e) for e in eos],
            "batch_size": batch_size,
            "provider": provider,
            "pad": pad,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def path_for(study: Path) -> Path:
    study = Path(study)
    return study.with_name(study.stem + ".reference.npz")


def _flat(lists: list) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(x) for x in lists], np.int64)
    return np.array([t for x in lists for t in x], np.int64), lengths


def _lists(flat: np.ndarray, lengths: np.ndarray) -> list:
    ends = np.cumsum(lengths)
    return [flat[e - n : e].tolist() for e, n in zip(ends, lengths)]


def save(path: Path, key: str, ref: dict) -> None:
    """Published atomically (a run killed while writing leaves no half file) and recorded as patcher's
    own, so the next run may replace it."""
    from patcher.io.atomic import AtomicOutput
    from patcher.io.paths import check_output

    check_output(
        path, kind="file", option="--study", replace_ok=True
    )  # a previous cache, never a user's file
    pos, pos_len = _flat(ref["positive_completions"])
    neg, neg_len = _flat(ref["negative_completions"])
    neg_rate = ref["negative_marker_rate"]
    with AtomicOutput(Path(path)) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            key=np.array(key),
            positive=pos,
            positive_lengths=pos_len,
            negative=neg,
            negative_lengths=neg_len,
            marker_rate=np.float64(ref["marker_rate"]),
            negative_marker_rate=np.float64(np.nan if neg_rate is None else neg_rate),
            log_probs=ref["log_probs"],
            seconds=np.float64(ref["seconds"]),
        )


def load(path: Path, key: str) -> dict | None:
    """The reference stored for this key, or None (no file, another key, unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            neg_rate = float(z["negative_marker_rate"])
            return {
                "positive_completions": _lists(z["positive"], z["positive_lengths"]),
                "negative_completions": _lists(z["negative"], z["negative_lengths"]),
                "marker_rate": float(z["marker_rate"]),
                "negative_marker_rate": None if np.isnan(neg_rate) else neg_rate,
                "log_probs": z["log_probs"],
                "seconds": float(z["seconds"]),
            }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
