"""A GGUF's vocabulary (tokenizer.ggml.*) as a `tokenizers` tokenizer with its chat template: byte-level
BPE ('gpt2') with llama.cpp's pre-tokenizer of that name, or SentencePiece BPE ('llama')."""

from collections.abc import Mapping

from patcher.errors import PatcherError
from patcher.io.gguf import GGUFFile
from patcher.model.gguf_pretokenizers import lookup, pre_tokenizer


def load_tokenizer(g: GGUFFile):
    """The GGUF's own vocabulary (tokenizer.ggml.*) as a `tokenizers` BPE, and its chat template."""
    from tokenizers import Tokenizer, decoders, models

    md = g.metadata
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise PatcherError(g.path, "the GGUF has no vocabulary (tokenizer.ggml.tokens)")
    if kind == "llama":
        return _spm_tokenizer(g, tokens)
    if kind != "gpt2":
        raise PatcherError(
            g.path,
            f"tokenizer.ggml.model {kind!r} is not supported: patcher reads 'gpt2' "
            f"(byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies",
        )
    pre_name = md.get("tokenizer.ggml.pre", "default")  # llama.cpp's choice when the key is absent
    pre = lookup(pre_name, g.path)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizer(pre_name, g.path)
    tok.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type") or []
    _add_whole(tok, tokens, types, (3,))
    names = _special_names(md, tokens)
    add_bos = md.get("tokenizer.ggml.add_bos_token", True if pre.add_bos else None)
    return _prompt_tokenizer(g, tok, names, vocab, add_bos)


def _add_whole(tok, tokens: list, types: list, special: tuple[int, ...]) -> None:
    """The tokens matched whole in any text: `special` types (UNKNOWN 2, CONTROL 3) as special ones (dropped
    by decode(skip_special_tokens=True)); USER_DEFINED (4) as plain added tokens: Gemma's newline runs and
    Qwen's <tool_call> are text, as in the models' own tokenizer.json."""
    from tokenizers import AddedToken

    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in special]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    )


def _prompt_tokenizer(g: GGUFFile, tok, names: dict, vocab: dict, add_bos):
    """Both vocabulary kinds end alike: BOS prepended when the file asks for it, the special-token names,
    the chat template; add_bos None means the file does not say."""
    from tokenizers import processors

    from patcher.model.prompts import PromptTokenizer

    if add_bos and "bos_token" in names:
        bos = names["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    template = g.metadata.get("tokenizer.chat_template")
    return PromptTokenizer(
        tok,
        g.path,
        names,
        template if isinstance(template, str) else None,
        g.path,
        None if add_bos is None else bool(add_bos),
    )


def _special_names(md: Mapping, tokens: list) -> dict:
    names = {}
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("pad_token", "padding"),
        ("unk_token", "unknown"),
    ):
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            names[name] = tokens[i]
    return names


def _spm_tokenizer(g: GGUFFile, tokens: list):
    """A SentencePiece-BPE vocabulary (tokenizer.ggml.model 'llama': tokens, scores, token types) as a
    `tokenizers` BPE: merges ranked by the score of the merged piece (llama.cpp merges the best-scoring
    bigram first), '▁' for spaces with a leading one (add_space_prefix), <0xXX> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    md = g.metadata
    scores = list(md.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(md.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, str, str]] = []
    for i, t in enumerate(tokens):
        if types[i] != 1 or len(t) < 2:  # NORMAL pieces only: specials and <0xXX> bytes never merge
            continue
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in vocab and b in vocab:
                ranked.append((-float(scores[i]), i, a, b))
    merges = [(a, b) for *_, a, b in sorted(ranked)]
    names = _special_names(md, tokens)
    tok = Tokenizer(
        models.BPE(vocab, merges, byte_fallback=True, unk_token=names.get("unk_token"), fuse_unk=True)
    )
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "\u2581")]
    if md.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    _add_whole(tok, tokens, types, (2, 3))
    add_bos = md.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for SentencePiece
    return _prompt_tokenizer(g, tok, names, vocab, add_bos)
