r"""llama.cpp's pre-tokenizers (the GGUF key tokenizer.ggml.pre) as data: each name -> the split regexes
llama.cpp applies in turn (src/llama-vocab.cpp, llama-cpp-python 0.3.36's llama.cpp), whether a piece that
is already a token skips the merges (ignore_merges), and whether BOS is added when the file does not say.
Each regex splits every piece the previous one left, matches and the text between them both kept; the
pieces are then mapped to GPT-2's byte alphabet. Where llama.cpp runs code instead of a regex (kimi-k2,
afmoe, tiny_aya's digits) or its std::regex reads one differently from Oniguruma (\p{Lu} as \p{L}, \d as
ASCII, non-ASCII whitespace never inside a class), the table holds what llama.cpp does.
tests/test_gguf_pretokenizers.py checks every name token for token against llama.cpp itself.
"""

import difflib
import re
from dataclasses import dataclass

from patcher.errors import PatcherError


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is already in the vocabulary is one token
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _cased(suffix: str = "", letter: str = r"\p{L}") -> str:
    r"""Words by case, as llama.cpp spells \p{Lu}.. / \p{Ll}.. ("a letter that is not a-z" / "not A-Z")."""
    upper, lower, lead = f"((?=[{letter}])([^a-z]))", f"((?=[{letter}])([^A-Z]))", r"[^\r\n\p{L}\p{N}]?"
    return f"{lead}{upper}*{lower}+{suffix}|{lead}{upper}+{lower}*{suffix}"


# youtu's and tiny_aya's words by case; llama.cpp's category table knows letters only as L, so it matches
# \p{Lu}, \p{Ll}, ... all as \p{L} (_letters says so)
_BY_CASE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + f"{_CONTRACTIONS}?"
    + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + f"{_CONTRACTIONS}?"
)


def _letters(regex: str) -> str:
    return re.sub(r"\\p\{L[ultmo]\}", r"\\p{L}", regex)


# Regexes without \p{..} run in llama.cpp on text whose non-ASCII whitespace became \v, so a class that
# spans such a code point (U+3000 here) never matches it there: "&&\S" says so to Oniguruma.
_DIGITS_IN_THREES = r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"  # llama.cpp's digit code: threes from the right
_HAN = (
    "\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef"
    "\U0002f800-\U0002fa1f"
)  # unicode_cpt_is_han
_CJK = "[[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]&&\\S]+"
_PUNCT_WORDS = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+""" + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
)
_FINNISH = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_LATIN_LETTERS = (  # deepseek-llm's letters (its tokenizer.json spells the class out)
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"

# (names, pre-tokenizer): the groups llama.cpp's loader maps to one LLAMA_VOCAB_PRE_TYPE. `patcher convert`
# writes the first name whose splits match an HF tokenizer's, so common names come first.
_GROUPS = [
    (
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ),
        PreTokenizer((LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    (("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3,))),
    (
        ("jais-2",),
        PreTokenizer(
            (
                _CONTRACTIONS
                + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4))
                + r"|\s{1,2}(?!\S)|\s{1}",
            )
        ),
    ),
    (
        ("deepseek-llm",),
        PreTokenizer(
            (
                r"[\r\n]",
                r"\s?[" + _LATIN_LETTERS + "]+",
                "\\s?[[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]&&\\S]+",
                r"\s+$",
                _CJK,
                r"\p{N}+",
            )
        ),
    ),
    (
        ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
        PreTokenizer(
            (r"\p{N}{1,3}", _KANA, _PUNCT_WORDS + r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        ),
    ),
    (
        ("spark2_5",),
        PreTokenizer(
            (r"\p{N}{1,3}", _KANA, _PUNCT_WORDS + r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}")
        ),
    ),
    (
        ("youtu",),
        PreTokenizer(
            (
                "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c"
                "\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                _letters(_BY_CASE + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            ),
            ignore_merges=True,
        ),
    ),
    (("deepseek-coder",), PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"))),
    (("falcon",), PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"))),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
        PreTokenizer((r"\p{N}", GPT2)),
    ),
    (
        (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ),
        PreTokenizer((GPT2,)),
    ),
    (
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
        PreTokenizer((QWEN2,)),
    ),
    (
        ("qwen35",),
        PreTokenizer(
            (
                _CONTRACTIONS
                + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+",
            )
        ),
    ),
    (("poro-chat", "bloom", "gpt3-finnish"), PreTokenizer((_FINNISH,))),
    (("chatglm-bpe",), PreTokenizer((LLAMA3,))),
    (("glm4", "glm5"), PreTokenizer((LLAMA3,), ignore_merges=True)),
    (("viking",), PreTokenizer((_FINNISH, r"\p{N}"))),
    (
        ("tekken",),
        PreTokenizer(
            (_cased() + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
            ignore_merges=True,
            add_bos=True,
        ),
    ),
    (
        ("chameleon",),
        PreTokenizer(
            (
                r"<sentinel:[0-9]+>",
                r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                r"([\t\n]|    |  )",
                r"\p{N}",
                r"[\p{P}!-/:-@\[-`{-~]",
                GPT2,
            ),
            add_bos=True,
        ),
    ),
    (
        ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
        PreTokenizer(
            (
                _cased(_CONTRACTIONS + "?")
                + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )
        ),
    ),
    (
        ("granite-embed-multi-97m",),
        PreTokenizer(
            (
                _cased(_CONTRACTIONS + "?", r"\p{L}\p{M}")
                + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ),
            ignore_merges=True,
        ),
    ),
    (
        ("tiny_aya", "cohere2moe"),
        PreTokenizer(
            (
                _DIGITS_IN_THREES,  # llama.cpp runs this code for its \d{1,3}(?=(?:\d{3})*\b)
                _letters(_BY_CASE + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            )
        ),
    ),
    (("superbpe",), PreTokenizer((r"\p{N}+", r"(?=([0-9]{3})+(?![0-9]))"))),  # std::wregex's \d is ASCII
    (
        ("bailingmoe", "bailingmoe2", "llada-moe"),
        PreTokenizer(
            (
                r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]|\s+(?!\S)|\s+",
            )
        ),
    ),
    (
        ("seed-coder",),
        PreTokenizer(
            (
                _CONTRACTIONS
                + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
            )
        ),
    ),
    (("ufakzeka",), PreTokenizer((QWEN2[len(_CONTRACTIONS) + 1 :],))),
    (("grok-2",), PreTokenizer((QWEN2,))),
    (("laguna",), PreTokenizer((r"[^\n]+|[\n]+", QWEN2))),
    (
        ("exaone-moe",),
        PreTokenizer(
            (
                _CONTRACTIONS
                + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
                r"|\s*[\r\n]|\s+(?!\S)|\s+",
            )
        ),
    ),
    (
        ("minicpm5",),
        PreTokenizer(
            (
                r"\p{N}{1,3}",
                _CONTRACTIONS
                + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ),
            ignore_merges=True,
        ),
    ),
    (
        ("kimi-k2",),
        PreTokenizer(
            (  # llama.cpp's hand-written splitter, as one regex (letters: L only)
                f"[{_HAN}]+|[^\\r\\n\\p{{L}}\\p{{N}}]?[\\p{{L}}&&[^{_HAN}]]+{_CONTRACTIONS}?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )
        ),
    ),
    (
        ("afmoe",),
        PreTokenizer(
            (
                _DIGITS_IN_THREES,
                "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf"
                "\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af"
                "\u1100-\u11ff]+",
                _PUNCT_WORDS + r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )
        ),
    ),
    (("default",), PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))),
]
PRE_TOKENIZERS: dict[str, PreTokenizer] = {name: pre for names, pre in _GROUPS for name in names}

# names llama.cpp knows for vocabularies without GPT-2's byte alphabet
NOT_SUPPORTED = {
    "gemma4": "it is SentencePiece-style BPE on raw UTF-8, not GPT-2 byte-level BPE",
    "granite-embed-multi-311m": "it is SentencePiece-style BPE on raw UTF-8, not GPT-2 byte-level BPE",
    "sarvam-moe": "it is SentencePiece-style BPE on raw UTF-8, not GPT-2 byte-level BPE",
    "whitespace": "it splits on whitespace without GPT-2's byte alphabet (an embedding model's tokenizer)",
}


def lookup(name: str, path) -> PreTokenizer:
    """The table entry for `name`, or one line that says why not (with the nearest known names)."""
    if name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[name]
    if name in NOT_SUPPORTED:
        raise PatcherError(path, f"tokenizer.ggml.pre {name!r} is not supported: {NOT_SUPPORTED[name]}")
    near = difflib.get_close_matches(name, [*PRE_TOKENIZERS, *NOT_SUPPORTED], n=3, cutoff=0.5)
    hint = f"nearest: {', '.join(near)}" if near else f"{len(PRE_TOKENIZERS)} known, e.g. llama-bpe, qwen2"
    raise PatcherError(path, f"tokenizer.ggml.pre {name!r} is not a pre-tokenizer llama.cpp knows ({hint})")


def pre_tokenizer(name: str, path):
    """llama.cpp's pre-tokenizer `name` as a `tokenizers` pre-tokenizer: its regexes in turn, then bytes."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in lookup(name, path).regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
