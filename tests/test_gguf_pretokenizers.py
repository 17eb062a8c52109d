"""GGUF pre-tokenizers (tokenizer.ggml.pre): every name in patcher's table tokenizes token for token as
llama.cpp (llama-cpp-python) does, on multilingual, code, digit and whitespace text; names llama.cpp
splits with hand-written code are refused by name, unknown ones with the nearest known names.

The vocabulary: SmolLM2-135M-Instruct's own (real tier) and, always, a dense one built from the
test text (every substring up to 8 byte symbols, merged from any split), so that a piece boundary in the wrong
place changes the tokens. The same vocabulary is written once per name, only tokenizer.ggml.pre changed.
"""

import struct
from pathlib import Path

import pytest

from patcher.errors import PatcherError
from patcher.io.gguf import GGUFFile, string_field
from patcher.io.gguf_header import MAGIC, GGUFHeader
from patcher.model.gguf import GGUFStorage
from patcher.model.gguf_pretokenizers import NOT_SUPPORTED, PRE_TOKENIZERS, lookup, pre_tokenizer

TEXTS = [
    "Hello world! It's a test: don't, we'll, I'M, they'RE 'quoted' O'Neil's.",
    "Numbers 1 12 123 1234 12345 1234567890 3.14159 -42 1,000,000 x2y33z444 ١٢٣ ½ Ⅻ ２０２４",
    'def f(x):\n    return x**2 + 1  # comment\n\n\tif a<=b and c!=d: print(f"{a}")\r\n}}',
    "Ünïcödé café naïve résumé — Привет мир! Γειά σου κόσμε. 你好，世界。こんにちは、カタカナ。"
    "안녕하세요 세계 漢字English混合テキスト",
    "مرحبا بالعالم، हिन्दी भाषा। ไทย ทดสอบ emoji 🙂👍🏽 <sentinel:12> IMGIMGABZ …!?",
    "   leading and trailing spaces   \n\n\n  \t \u00a0 nbsp\u3000ideographic space  end   ",
    "CamelCaseWords HTTPServer iPhone McDonald's ALLCAPS lowercase ÉCOLE Straße",
    "runs ١٢٣٤٥٦٧ ٠١٢٣ 12345678 ab1234567cd ２０２４５ 9½⅔ Ⅻ7",
]
LENGTH = 8


def _byte_level(text: str) -> str:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]


def _dense_vocab():
    """Tokens: GPT-2's 256 byte symbols, then every substring (2..LENGTH symbols) of the byte-level test
    text; merges: every split of each, shorter first. A piece of up to LENGTH symbols then becomes one
    token, so the tokens show where the pre-tokenizer cut (a wrong cut gives other tokens)."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet())
    seen = set(tokens)
    for n in range(2, LENGTH + 1):
        for text in TEXTS:
            b = _byte_level(text)
            for i in range(len(b) - n + 1):
                if b[i : i + n] not in seen:
                    seen.add(b[i : i + n])
                    tokens.append(b[i : i + n])
    merges = [
        f"{t[:k]} {t[k:]}" for t in tokens[256:] for k in range(1, len(t)) if t[:k] in seen and t[k:] in seen
    ]
    return tokens, merges


def _vocab_gguf(path: Path, tokens, merges, types=None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_context_length(64)
    w.add_head_count(4)
    w.add_feed_forward_length(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types or [1] * len(tokens))
    w.add_token_merges(merges)
    w.add_add_bos_token(False)
    w.add_tokenizer_pre("gpt-2")  # the last record: replaced per name below
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _with_pre(base: Path, name: str, out: Path) -> Path:
    """`base` (a vocabulary-only GGUF) with tokenizer.ggml.pre set to `name`: the other records as stored."""
    h = GGUFHeader(base)
    records = [h.field_bytes(k) for k in h.metadata if k != "tokenizer.ggml.pre"]
    h.close()
    records.append(string_field("tokenizer.ggml.pre", name))
    out.write_bytes(MAGIC + struct.pack("<IQQ", 3, 0, len(records)) + b"".join(records))
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _vocab_gguf(tmp_path_factory.mktemp("pretok") / "dense.gguf", *_dense_vocab())


@pytest.fixture(scope="module")
def smollm2(real_model, tmp_path_factory):
    """SmolLM2's vocabulary (tokens, merges, token types) in a vocabulary-only GGUF."""
    g = GGUFFile(real_model.gguf)
    md = g.metadata
    path = _vocab_gguf(
        tmp_path_factory.mktemp("pretok") / "smollm2.gguf",
        g.tokens(),
        md["tokenizer.ggml.merges"],
        md["tokenizer.ggml.token_type"],
    )
    g.close()
    return path


def _llama_cpp_tokens(path: Path, texts):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
    finally:
        llm.close()


def _every_name_like_llama_cpp(vocabulary: Path, tmp_path: Path) -> None:
    failures = []
    for name in sorted(PRE_TOKENIZERS):
        path = _with_pre(vocabulary, name, tmp_path / f"{name}.gguf")
        want = _llama_cpp_tokens(path, TEXTS)
        tok = GGUFStorage(path).tokenizer()
        got = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
        failures += [(name, i) for i, (a, b) in enumerate(zip(got, want)) if a != b]
        path.unlink()
    assert not failures, failures


def test_every_name_tokenizes_like_llama_cpp(dense, tmp_path):
    _every_name_like_llama_cpp(dense, tmp_path)


@pytest.mark.real
def test_every_name_tokenizes_like_llama_cpp_on_smollm2s_vocabulary(smollm2, tmp_path):
    _every_name_like_llama_cpp(smollm2, tmp_path)


def test_the_dense_vocabulary_sees_piece_boundaries(dense):
    """The check above can fail: a pre-tokenizer that splits differently gives other tokens."""
    tok = GGUFStorage(dense).tokenizer().tokenizer
    by_name = {}
    for name in ("gpt-2", "llama-bpe", "qwen2", "smollm", "deepseek-coder", "tekken", "gpt-4o", "falcon"):
        tok.pre_tokenizer = pre_tokenizer(name, "x.gguf")
        by_name[name] = tuple(tuple(tok.encode(t).ids) for t in TEXTS)
    assert len(set(by_name.values())) == len(by_name)


@pytest.mark.real
def test_real_smollm2_tokenizes_like_llama_cpp(real_model):
    tok = GGUFStorage(real_model.gguf).tokenizer()
    assert [tok.encode(t) for t in TEXTS] == _llama_cpp_tokens(real_model.gguf, TEXTS)


def test_smollm_splits_like_its_hf_tokenizer():
    """SmolLM2's tokenizer.json: Digits(individual_digits) then ByteLevel(use_regex) -- the same pieces."""
    from tokenizers import pre_tokenizers

    hf = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in TEXTS:
        assert pre_tokenizer("smollm", "x.gguf").pre_tokenize_str(text) == hf.pre_tokenize_str(text)
    pieces = [p for p, _ in pre_tokenizer("smollm", "x.gguf").pre_tokenize_str(TEXTS[1])]
    assert pieces[:6] == ["Numbers", "Ġ", "1", "Ġ", "1", "2"]


def test_unknown_and_unsupported_names_are_refused_by_name(dense, tmp_path):
    with pytest.raises(PatcherError) as e:
        lookup("smolm", Path("m.gguf"))
    msg = str(e.value)
    assert "'smolm'" in msg and "nearest: smollm" in msg and "m.gguf" in msg and "\n" not in msg
    with pytest.raises(PatcherError, match="'llama4-bpe'.*nearest: .*llama-bpe"):
        lookup("llama4-bpe", "m.gguf")
    for name in NOT_SUPPORTED:  # names llama.cpp loads, for vocabularies that are not byte-level BPE
        with pytest.raises(PatcherError, match=f"{name!r} is not supported: "):
            lookup(name, "m.gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_cpp.Llama(
        model_path=str(_with_pre(dense, "gemma4", tmp_path / "k.gguf")), vocab_only=True, verbose=False
    ).close()
    with pytest.raises(ValueError):  # llama.cpp refuses the unknown name as well
        llama_cpp.Llama(
            model_path=str(_with_pre(dense, "smolm", tmp_path / "u.gguf")), vocab_only=True, verbose=False
        )


def test_a_model_with_an_unknown_pre_tokenizer_is_refused_in_one_line(tmp_path):
    """extract on a GGUF whose tokenizer.ggml.pre llama.cpp does not know: exit 1, one line, nearest names."""
    import sys

    from conftest import ROOT, run_cli

    from patcher.io.gguf import OutTensorGGUF, write_gguf

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_gguf_fixtures as mk

    g = GGUFFile(mk.convert("llama", tmp_path / "src.gguf"))
    fields = [string_field(k, "qwen-2") if k == "tokenizer.ggml.pre" else raw for k, raw in g.field_bytes()]
    tensors = [OutTensorGGUF(t.name, t.qtype, t.ne, t.nbytes, source=t) for t in g.shard_tensors(g.path.name)]
    bad = tmp_path / "bad.gguf"
    write_gguf(bad, fields, tensors, g.alignment)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me a story.\nHow do plants grow?\n")
    out = tmp_path / "d.safetensors"
    r = run_cli("extract", bad, "--positive", prompts, "--negative", prompts, "-o", out, expect=1)
    assert r.output.count("\n") == 1 and "bad.gguf" in r.output and "'qwen-2'" in r.output, r.output
    assert "nearest: qwen2" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_user_defined_tokens_are_text_control_tokens_are_not(tmp_path):
    """USER_DEFINED tokens (type 4: Gemma's newline runs, Qwen's <tool_call>) are matched whole and kept by
    decode(skip_special_tokens=True); CONTROL ones (3) are matched whole and dropped, as llama.cpp renders
    them (detokenize without special). Before, both were special: Gemma replies lost every newline."""
    tokens, merges = _dense_vocab()
    tokens, types = [*tokens, "<ctl>", "<ud>"], [1] * len(tokens) + [3, 4]
    path = _vocab_gguf(tmp_path / "types.gguf", tokens, merges, types)
    tok = GGUFStorage(path).tokenizer()
    ids = tok.encode("a<ud>b<ctl>c", add_special_tokens=False)
    assert tokens.index("<ud>") in ids and tokens.index("<ctl>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a<ud>bc"
    assert tok.decode(ids, skip_special_tokens=False) == "a<ud>b<ctl>c"
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(b"a<ud>b<ctl>c", add_bos=False, special=True) == ids
        assert llm.detokenize(ids, special=False).decode() == "a<ud>bc"
    finally:
        llm.close()
