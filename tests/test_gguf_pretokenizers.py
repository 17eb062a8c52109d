"""GGUF pre-tokenizers (tokenizer.ggml.pre): llama.cpp's split regexes as `tokenizers` pre-tokenizers."""

import pytest

from patcher.io.gguf import pre_tokenizer

TEXT = (
    "Hello world! It's 2024-12-04, pi=3.14159; x += 12345\n\n  def f(a):\n\treturn a**2  \n"
    "Ünïcödé café, naïve résumé — Привет мир, 你好世界 123 ١٢٣ ½ Ⅻ émojis 🙂🙂 end   "
)


def test_smollm_splits_like_its_hf_tokenizer():
    """SmolLM2's tokenizer.json: Digits(individual_digits) then ByteLevel(use_regex) -- the same pieces."""
    from tokenizers import pre_tokenizers

    hf = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ours = pre_tokenizer("smollm", "x.gguf").pre_tokenize_str(TEXT)
    assert ours == hf.pre_tokenize_str(TEXT)
    assert [p for p, _ in ours][:8] == ["Hello", "Ġworld", "!", "ĠIt", "'s", "Ġ", "2", "0"]
