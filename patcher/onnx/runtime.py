"""Running an exported folder through onnxruntime: prefill, KV-cache decode, batched generation."""

from pathlib import Path

import numpy as np

from patcher.errors import PatcherError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def available_providers() -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [k for k, v in PROVIDERS.items() if v[0] in have]


class OnnxModel:
    def __init__(self, folder, file: str = "model.onnx", provider: str = "cpu"):
        import onnxruntime as ort

        self.folder = Path(folder)
        path = self.folder / "onnx" / file
        if not path.is_file():
            raise PatcherError(path, "no such ONNX model (export with `patcher export`)")
        if provider not in available_providers():
            raise PatcherError(
                "--provider",
                f"{provider} is not available in this onnxruntime "
                f"(available: {', '.join(available_providers())})",
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # errors come back as exceptions, said once as one line
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=PROVIDERS[provider])
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PatcherError(path, f"onnxruntime cannot load this model ({reason[:300]})") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache_dtype = (
            np.float16
            if self.past_names and "float16" in self.inputs[self.past_names[0]].type
            else np.float32
        )

    def empty_cache(self, batch: int) -> dict:
        return {
            n: np.zeros((batch, self.inputs[n].shape[1], 0, self.inputs[n].shape[3]), self.cache_dtype)
            for n in self.past_names
        }

    def step(
        self, input_ids, attention_mask, position_ids, past: dict, keep: int = 0
    ) -> tuple[np.ndarray, dict]:
        """One forward: logits [B, S, V] (the last `keep` positions only, when the graph can; 0: all) and
        the new cache (present.* renamed to past_key_values.*)."""
        feeds = {
            "input_ids": np.asarray(input_ids, np.int64),
            "attention_mask": np.asarray(attention_mask, np.int64),
            "position_ids": np.asarray(position_ids, np.int64),
            **past,
        }
        if "num_logits_to_keep" in self.inputs:
            feeds["num_logits_to_keep"] = np.array(keep, np.int64)
        outs = dict(zip(self.output_names, self.session.run(None, feeds)))
        cache = {
            n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")
        }
        return outs["logits"], cache

    def generate(
        self,
        input_ids,
        attention_mask,
        max_new_tokens: int,
        eos_ids=(),
        sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        on_token=None,
    ) -> np.ndarray:
        """Greedy (or seeded sampling) continuation of a left-padded batch with the KV cache.
        Returns new tokens [B, max_new_tokens] (finished rows repeat their eos)."""
        rng = np.random.default_rng(seed)
        ids = np.asarray(input_ids, np.int64)
        mask = np.asarray(attention_mask, np.int64)
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, past = self.step(ids, mask, pos, self.empty_cache(ids.shape[0]), keep=1)
        done = np.zeros(ids.shape[0], bool)
        eos = np.array(sorted(set(eos_ids)), np.int64)
        out: list[np.ndarray] = []
        next_pos = pos[:, -1:] + 1
        for step in range(max_new_tokens):
            last = logits[:, -1, :].astype(np.float64)
            if np.isnan(last[~done]).any():  # argmax of NaN is token 0: it "generated" nothing, exit 0
                raise PatcherError(
                    self.folder,
                    f"the model's logits are NaN at generated token {step}: its "
                    "weights are not finite (or overflow in this dtype)",
                )
            if sample:
                last = last / max(temperature, 1e-6)
                if top_k > last.shape[-1]:
                    raise PatcherError(
                        "--top-k", f"must be <= the vocabulary size {last.shape[-1]}, got {top_k}"
                    )
                if top_k:
                    kth = np.sort(last, axis=-1)[:, -top_k][:, None]
                    last = np.where(last < kth, -np.inf, last)
                p = np.exp(last - last.max(axis=-1, keepdims=True))
                p /= p.sum(axis=-1, keepdims=True)
                tok = np.array([rng.choice(p.shape[1], p=row) for row in p])
            else:
                tok = last.argmax(axis=-1)
            tok = np.where(done, out[-1] if out else tok, tok)
            out.append(tok)
            if on_token:
                on_token(tok, done.copy())
            done |= np.isin(tok, eos)
            if done.all() or len(out) == max_new_tokens:  # no forward whose logits nobody reads
                break
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
            logits, past = self.step(tok[:, None], mask, next_pos, past, keep=1)
            next_pos = next_pos + 1
        new = np.stack(out, axis=1) if out else np.zeros((ids.shape[0], 0), np.int64)
        if new.shape[1] < max_new_tokens:  # everyone finished early: pad with their last token
            new = np.concatenate([new, np.repeat(new[:, -1:], max_new_tokens - new.shape[1], axis=1)], axis=1)
        return new
