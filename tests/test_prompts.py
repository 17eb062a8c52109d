"""patcher.model.prompts against HF transformers as the oracle: rendered chat templates and token ids must be
identical to `AutoTokenizer.apply_chat_template` / `AutoTokenizer(text)`; bad templates and prompt files give
one PatcherError naming the file."""

import hashlib
import json
import shutil
from collections.abc import Mapping

import numpy as np
import pytest
from conftest import fixture_path
from tokenizers import Tokenizer, processors

from patcher.errors import PatcherError
from patcher.io.manifest import sha256_file
from patcher.model.prompts import encode_prompts, left_pad, load_tokenizer, read_prompt_file


def hf_tokenizer(folder):
    """The HF reference (transformers' tokenizer needs no torch); only the oracle tests skip without it."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


PROMPTS = [
    "Tell me a story about a friendly robot.",
    "  How do plants grow?  ",
    "Line one\nline two",
    "Ünïcödé ✓ 日本語 <b>&amp;</b>",
    "Say <|end|> and </s> literally",
    "x",
]
SYSTEMS = [None, "You are a helpful assistant.", "  Be brief.\n"]

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Exercises trim_blocks/lstrip_blocks, namespace, loop controls, tojson (with indent; no HTML escaping).
FANCY = """{%- set ns = namespace(sys='') %}
{%- for m in messages %}
    {%- if m['role'] == 'system' %}
        {%- set ns.sys = m['content'] %}
        {%- continue %}
    {%- endif %}
<|{{ m['role'] }}|>{{ {'text': m['content'], 'sys': ns.sys} | tojson }}
{{ m | tojson(indent=2) }}
    {% if loop.last %}
    last
    {% endif %}
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>{{ eos_token }}{{ pad_token }}{% endif %}"""


def messages(prompt, system=None):
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]


def hf_ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a plain list
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def tokenizer_copy(tmp_path, model_type="llama", config_update=None, jinja=None):
    """A folder with the fixture's tokenizer files, tokenizer_config.json updated as asked."""
    folder = tmp_path / f"tok-{model_type}"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(fixture_path(model_type) / name, folder / name)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    for key, value in (config_update or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return folder


def assert_matches_hf(folder, systems=SYSTEMS):
    hf = hf_tokenizer(folder)
    tok = load_tokenizer(folder)
    assert tok.has_chat_template
    for system in systems:
        for prompt in PROMPTS:
            msgs = messages(prompt, system)
            expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert tok.render(prompt, system=system) == expected
            assert tok.render(prompt, system=system, add_generation_prompt=False) == hf.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=False
            )
        ids = encode_prompts(tok, PROMPTS, system=system)
        assert ids == [
            hf_ids(hf.apply_chat_template(messages(p, system), tokenize=True, add_generation_prompt=True))
            for p in PROMPTS
        ]
    assert encode_prompts(tok, PROMPTS, chat_template=False) == [hf(p)["input_ids"] for p in PROMPTS]
    return tok, hf


# --- chat templates vs transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma", "qwen2"])
def test_fixture_templates_match_hf(model_type):
    tok, hf = assert_matches_hf(fixture_path(model_type))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.decode(tok.encode(PROMPTS[0])) == hf.decode(hf(PROMPTS[0])["input_ids"])


def test_llama3_style_template(tmp_path):
    bos = {
        "__type": "AddedToken",
        "content": "<s>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }  # as transformers 4.x saved special tokens
    folder = tokenizer_copy(tmp_path, config_update={"chat_template": LLAMA3, "bos_token": bos})
    tok, _ = assert_matches_hf(folder)
    assert tok.render("hi").startswith("<s><|start_header_id|>user")
    # BOS comes from the template only: encoding the rendered text must not add a second one
    assert encode_prompts(tok, ["hi"])[0][:2] != [tok.bos_id, tok.bos_id]


@pytest.mark.parametrize("add_bos", [None, True, False])
@pytest.mark.parametrize("bos_post_processor", [False, True])
def test_gemma_style_template_and_bos(tmp_path, add_bos, bos_post_processor):
    """Real Gemma/Llama tokenizers add BOS in tokenizer.json's post-processor and write bos_token in the
    template: the chat path must carry exactly one BOS, the raw path follows the post-processor (not
    add_bos_token)."""
    folder = tokenizer_copy(tmp_path, config_update={"chat_template": GEMMA, "add_bos_token": add_bos})
    if bos_post_processor:
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        backend.save(str(folder / "tokenizer.json"))
    tok, hf = assert_matches_hf(folder, systems=[None])
    assert tok.add_bos_token is add_bos
    ids = encode_prompts(tok, ["hi"])[0]
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # exactly one BOS, from the template
    raw = encode_prompts(tok, ["hi"], chat_template=False)[0]
    assert (raw[0] == tok.bos_id) == bos_post_processor
    # The template rejects a system message through raise_exception; transformers raises too.
    with pytest.raises(PatcherError, match="System role not supported") as e:
        tok.render("hi", system="sys")
    assert "tokenizer_config.json" in str(e.value)
    with pytest.raises(Exception, match="System role not supported"):
        hf.apply_chat_template(messages("hi", "sys"), tokenize=False, add_generation_prompt=True)


def test_fancy_template_tojson_namespace_loopcontrols(tmp_path):
    folder = tokenizer_copy(tmp_path, config_update={"chat_template": FANCY})
    tok, _ = assert_matches_hf(folder)
    # no \\u escapes, no HTML escaping
    assert '"Ünïcödé ✓ 日本語 <b>&amp;</b>"' in tok.render(PROMPTS[3])


def test_chat_template_jinja_takes_precedence(tmp_path):
    folder = tokenizer_copy(tmp_path, jinja=LLAMA3)
    tok, _ = assert_matches_hf(folder)
    assert tok.template_source == folder / "chat_template.jinja"
    assert "<|start_header_id|>" in tok.render("hi")


def test_named_template_list_uses_default(tmp_path):
    templates = [
        {"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"},
        {"name": "default", "template": GEMMA},
    ]
    folder = tokenizer_copy(tmp_path, config_update={"chat_template": templates})
    tok, _ = assert_matches_hf(folder, systems=[None])
    assert tok.render("hi").startswith("<s><start_of_turn>user")
    bad = tokenizer_copy(tmp_path, "gemma", config_update={"chat_template": templates[:1]})
    with pytest.raises(PatcherError, match="default"):
        load_tokenizer(bad)


def test_no_template_path_matches_hf(tmp_path):
    folder = tokenizer_copy(tmp_path, config_update={"chat_template": None})
    hf = hf_tokenizer(folder)
    tok = load_tokenizer(folder)
    assert not tok.has_chat_template
    assert encode_prompts(tok, PROMPTS, chat_template=False) == [hf(p)["input_ids"] for p in PROMPTS]
    with pytest.raises(PatcherError, match="--no-chat-template"):
        encode_prompts(tok, PROMPTS)


# --- special tokens ----------------------------------------------------------------------------------------


def test_special_tokens_as_dicts_and_pad_fallback(tmp_path):
    added = {
        "__type": "AddedToken",
        "content": "</s>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "special": True,
    }
    tok = load_tokenizer(tokenizer_copy(tmp_path, config_update={"eos_token": added, "pad_token": None}))
    assert tok.eos_id == 2 and tok.pad_id == 2  # no pad token: falls back to eos
    (tmp_path / "none").mkdir()
    tok = load_tokenizer(
        tokenizer_copy(
            tmp_path / "none", config_update={"eos_token": None, "pad_token": None, "bos_token": None}
        )
    )
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, 0)


def test_missing_or_corrupt_tokenizer_files(tmp_path):
    folder = tokenizer_copy(tmp_path)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(PatcherError, match="tokenizer_config.json"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text('{"model": 42}')
    with pytest.raises(PatcherError, match="tokenizer.json"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(PatcherError, match="tokenizer.json.*not found"):
        load_tokenizer(folder)


# --- untrusted templates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.__class__ }}",
        "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",  # immutable sandbox: no mutation
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}{{ ns }}",
        "{{ namespace(__class__=1) }}",
    ],
)
def test_unsafe_templates_refused(tmp_path, template):
    # loading alone is fine (--no-chat-template)
    tok = load_tokenizer(tokenizer_copy(tmp_path, jinja=template))
    with pytest.raises(PatcherError, match="unsafe access") as e:
        tok.render("hi")
    assert "chat_template.jinja" in str(e.value)
    with pytest.raises(PatcherError, match="unsafe access"):
        encode_prompts(tok, ["hi"])


@pytest.mark.parametrize(
    "template, problem",
    [
        ("{% for m in messages %}{{ m['content'] }}", "syntax error"),
        ("{{ messages[0]['content'].nope.deeper }}", "chat template failed"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_broken_templates_give_patcher_error(tmp_path, template, problem):
    tok = load_tokenizer(tokenizer_copy(tmp_path, config_update={"chat_template": template}))
    with pytest.raises(PatcherError, match=problem) as e:
        tok.render("hi")
    assert "tokenizer_config.json" in str(e.value)


# --- prompt files ------------------------------------------------------------------------------------------


def test_read_txt(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"first prompt  \r\n\n   \n  inner  text kept\nlast\tline\t\n")
    assert read_prompt_file(p) == ["first prompt", "  inner  text kept", "last\tline"]
    assert read_prompt_file(p, limit=2) == ["first prompt", "  inner  text kept"]
    p.write_bytes("\ufeffwith bom\n".encode())
    assert read_prompt_file(p) == ["with bom"]


def test_read_jsonl_and_json(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a\\nb", "label": 1}\n\n{"prompt": "Ünï"}\n{"prompt": "c"}\n', encoding="utf-8")
    assert read_prompt_file(p) == ["a\nb", "Ünï", "c"]
    assert read_prompt_file(p, limit=1) == ["a\nb"]
    q = tmp_path / "p.json"
    q.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    assert read_prompt_file(q) == ["x", "y"]
    q.write_text('\ufeff[{"prompt": "x"}, {"prompt": "z"}]', encoding="utf-8")
    assert read_prompt_file(q) == ["x", "z"]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.txt", b"\n  \n\n", "no prompts"),
        ("empty.jsonl", b"", "no prompts"),
        ("bad.jsonl", b'{"prompt": "ok"}\n\n{"prompt": oops}\n', "line 3: bad JSON"),
        ("field.jsonl", b'{"prompt": "ok"}\n{"text": "no prompt"}\n', 'line 2: .*"prompt"'),
        ("type.jsonl", b'{"prompt": 42}\n', 'line 1: "prompt" must be a string'),
        ("array.json", b'[{"prompt": "ok"}, "bare"]', "item 1"),
        ("broken.json", b'[{"prompt": "ok"},', "bad JSON"),
        ("blank.jsonl", b'{"prompt": "ok"}\n{"prompt": "  "}\n', 'line 2: "prompt" is empty'),
        ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "not UTF-8"),
        ("p.csv", b"a,b\n", "unsupported"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, problem):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(PatcherError, match=problem) as e:
        read_prompt_file(p)
    assert e.value.where == str(p)


def test_missing_prompt_file_and_bad_limit(tmp_path):
    with pytest.raises(PatcherError, match="not found"):
        read_prompt_file(tmp_path / "nope.txt")
    p = tmp_path / "p.txt"
    p.write_text("a\n")
    with pytest.raises(PatcherError, match="at least 1"):
        read_prompt_file(p, limit=0)


# --- batching and hashing ----------------------------------------------------------------------------------


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4], [5, 6]], pad_id=9)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (3, 3)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
