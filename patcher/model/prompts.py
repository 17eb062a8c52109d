"""Prompts for `patcher extract`: read prompt files, apply the model's chat template, tokenize, left-pad.

Everything here mirrors what HF transformers does (`AutoTokenizer` + `apply_chat_template`) closely enough
that the token ids are identical, without importing it: tokenizer.json is run by the `tokenizers` library
and the chat template by a sandboxed Jinja2 environment set up the way transformers sets up its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.utils
import numpy as np
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from patcher.errors import PatcherError
from patcher.io.paths import MAX_SIDE_FILE, read_bytes, read_text, regular_file

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# Named special tokens transformers passes to every template (its `special_tokens_map`), when set.
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# --- Jinja environment (the template is untrusted input: it comes with the downloaded model) ---------------


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' does, so a template cannot plant
    dunders."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2's Namespace, so namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant tokens with it): render the
    body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces Jinja's tojson, which HTML-escapes '<', '>', '&' and would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# Bounds on rendering an untrusted template: nested `range(99999)` loops or `"x" * 10**9` fail fast
# with one line instead of running for hours or filling memory.
RENDER_SECONDS = 2.0
RENDER_STEPS = 1_000_000  # range iterations and calls per render
RENDER_CHARS = 1_000_000  # output characters per render, beyond the prompt text itself
_budget = threading.local()


class _RenderLimit(Exception):
    def __str__(self):
        return self.args[0] if self.args else f"it runs longer than {RENDER_SECONDS:g} s"


def _tick(n: int = 1) -> None:
    left = getattr(_budget, "steps", None)
    if left is None:
        return
    _budget.steps = left - n
    if _budget.steps < 0 or time.monotonic() > _budget.deadline:
        raise _RenderLimit(f"it runs longer than {RENDER_STEPS} steps or {RENDER_SECONDS:g} s")


def _bounded_range(*args):
    for i in range(*args):
        _tick()
        yield i


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Budget this thread's render; a watchdog interrupts loops that call nothing (any thread)."""
    tid, lock, state = threading.get_ident(), threading.Lock(), {"running": True}
    done = threading.Event()

    def watchdog():
        if not done.wait(seconds):
            with lock:
                if state["running"]:
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(tid), ctypes.py_object(_RenderLimit)
                    )

    _budget.steps, _budget.deadline = RENDER_STEPS, time.monotonic() + seconds
    t = threading.Thread(target=watchdog, daemon=True)
    t.start()
    try:
        yield
    finally:
        with lock:
            state["running"] = False
        done.set()
        t.join()
        _budget.steps = None


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise _RenderLimit(f"exponent {right} is too large")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_CHARS:
                raise _RenderLimit(f"it builds a sequence of {len(seq) * n} items")
        if (
            operator == "+"
            and isinstance(left, (str, list))
            and isinstance(right, (str, list))
            and len(left) + len(right) > 4 * RENDER_CHARS
        ):
            raise _RenderLimit("it builds a sequence that is too long")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):
        _tick()
        return super().call(__context, __obj, *args, **kwargs)

    def unsafe_undefined(self, obj, attribute):
        # Jinja's sandbox returns an Undefined that only raises once *used*, so `{{ x.__class__ }}` would
        # quietly render "". Refuse at the first unsafe lookup instead: the user learns the template is
        # hostile or broken.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _environment(where) -> ImmutableSandboxedEnvironment:
    # the template's own way to reject input (Gemma: "System role not supported")
    def raise_exception(message):
        raise PatcherError(where, f"the chat template refused the conversation: {message}")

    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=raise_exception,
        namespace=_Namespace,
        range=_bounded_range,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
    )
    return env


@functools.lru_cache(maxsize=8)
def _compile(template: str, where: str) -> jinja2.Template:
    return _environment(where).from_string(template)


# --- tokenizer ---------------------------------------------------------------------------------------------


@dataclass
class PromptTokenizer:
    tokenizer: Tokenizer
    folder: Path
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... -> token string
    chat_template: str | None = None
    template_source: Path | None = None  # the file the template came from, for error messages
    add_bos_token: bool | None = None  # as tokenizer_config.json says; tokenization follows tokenizer.json

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def special_id(self, name: str) -> int | None:
        """Id of a special token by its role (bos_token, eos_token, ...); None when it has none."""
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self.special_id("eos_token")

    @property
    def pad_id(self) -> int:
        for name in ("pad_token", "eos_token"):
            if (i := self.special_id(name)) is not None:
                return i
        return 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render(self, user_prompt: str, system: str | None = None, add_generation_prompt: bool = True) -> str:
        """The chat template applied to [system?, user], as `apply_chat_template(..., tokenize=False)`
        renders it."""
        if self.chat_template is None:
            raise PatcherError(self.folder, "the tokenizer has no chat template")
        where = self.template_source or self.folder
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user_prompt}
        ]
        try:
            template = _compile(self.chat_template, str(where))
            # The variables transformers passes: the named special tokens that are set, tools/documents
            # (None).
            limit = RENDER_CHARS + 4 * (len(user_prompt) + len(system or ""))
            parts, size = [], 0
            with _time_limit(RENDER_SECONDS):
                for piece in template.generate(
                    messages=messages,
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self.special_tokens,
                ):
                    size += len(piece)
                    if size > limit:
                        raise _RenderLimit(f"its output passes {limit} characters")
                    _tick()
                    parts.append(piece)
            return "".join(parts)
        except PatcherError:
            raise
        except _RenderLimit as e:
            raise PatcherError(
                where, f"chat template stopped: {e} (a template that loops or grows without bound)"
            ) from None
        except SecurityError as e:
            raise PatcherError(
                where, f"the chat template tried unsafe access and was refused ({e})"
            ) from None
        except jinja2.TemplateSyntaxError as e:
            raise PatcherError(
                where, f"chat template syntax error at template line {e.lineno}: {e.message}"
            ) from None
        except TemplateError as e:  # UndefinedError, TemplateRuntimeError, ...
            raise PatcherError(where, f"chat template failed: {e}") from None
        # untrusted code: any failure (TypeError, RecursionError...) is its fault
        except Exception as e:
            raise PatcherError(where, f"chat template failed: {type(e).__name__}: {e}") from None


def _read_json(path: Path):
    try:
        return json.loads(read_text(path, "JSON file"))
    except (ValueError, RecursionError) as e:
        raise PatcherError(path, f"cannot read JSON: {e}") from None


def _token_string(value, path: Path, name: str) -> str | None:
    # HF writes special tokens either as "<s>" or as a serialized AddedToken
    # {"content": "<s>", "lstrip": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise PatcherError(path, f'{name} must be a string or an object with a string "content", got {value!r}')


def load_tokenizer(model_dir) -> PromptTokenizer:
    folder = Path(model_dir)
    tok_path = folder / TOKENIZER_FILE
    if not tok_path.exists():
        raise PatcherError(tok_path, "not found: patcher needs the fast-tokenizer file tokenizer.json")
    regular_file(tok_path, "tokenizer file", MAX_SIDE_FILE)
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise PatcherError(tok_path, f"cannot load tokenizer: {e}") from None
    # transformers ignores truncation/padding baked into tokenizer.json unless asked for them; so do we.
    tok.no_truncation()
    tok.no_padding()

    cfg_path = folder / TOKENIZER_CONFIG
    cfg = _read_json(cfg_path) if cfg_path.exists() else {}
    if not isinstance(cfg, dict):
        raise PatcherError(cfg_path, "expected a JSON object")
    specials = {n: s for n in SPECIAL_NAMES if (s := _token_string(cfg.get(n), cfg_path, n)) is not None}

    # add_bos_token is kept for callers' information only: with a tokenizer.json present, transformers
    # drops it (and add_eos_token) and lets tokenizer.json's post-processor decide which special tokens
    # to add.
    add_bos = cfg.get("add_bos_token") if isinstance(cfg.get("add_bos_token"), bool) else None

    # Template sources, as transformers orders them: chat_template.jinja wins over tokenizer_config.json.
    template, source = None, None
    if (folder / TEMPLATE_FILE).exists():
        source = folder / TEMPLATE_FILE
        template = read_text(source, "chat template")
    elif cfg.get("chat_template") is not None:
        source, template = cfg_path, cfg["chat_template"]
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {
                t["name"]: t.get("template")
                for t in template
                if isinstance(t, dict) and isinstance(t.get("name"), str)
            }
            if "default" not in named:
                raise PatcherError(
                    cfg_path, f'chat_template has no template named "default" (names: {sorted(named)})'
                )
            template = named["default"]
        if not isinstance(template, str):
            raise PatcherError(
                cfg_path, "chat_template must be a string or a list of {name, template} objects"
            )
    return PromptTokenizer(tok, folder, specials, template, source, add_bos)


def encode_prompts(tok: PromptTokenizer, prompts, chat_template: bool = True, system: str | None = None):
    """Token ids per prompt, as HF would feed them to the model."""
    if chat_template and not tok.has_chat_template:
        raise PatcherError(
            tok.folder,
            "the tokenizer has no chat template (no chat_template.jinja and no "
            "chat_template in tokenizer_config.json); pass --no-chat-template to "
            "tokenize the raw prompts",
        )
    if chat_template:
        # apply_chat_template(tokenize=True) encodes the rendered text with add_special_tokens=False:
        # the template writes BOS itself when the model wants one; adding it again would double it.
        return [tok.encode(tok.render(p, system=system), add_special_tokens=False) for p in prompts]
    return [tok.encode(p, add_special_tokens=True) for p in prompts]


# --- limits ----------------------------------------------------------------------------------------------

POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
ATTENTION_BUDGET = 4 << 30  # bytes of attention scores one batch may need in the numpy forward


def max_positions(config: dict) -> int | None:
    """The longest sequence the model was built for, as its config.json says (None: not stated)."""
    for key in POSITION_KEYS:
        v = config.get(key) if isinstance(config, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_lengths(
    token_lists, config: dict, where, extra: int = 0, heads: int | None = None, batch_size: int = 1
) -> None:
    """Refuse, before any work, prompts longer than the model's positions (plus `extra` tokens to
    generate), or whose attention scores would not fit ATTENTION_BUDGET (a 120k-token prompt)."""
    if not token_lists:
        return
    longest = max(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    n = len(token_lists[longest]) + extra
    limit = max_positions(config)
    plus = f" + {extra} to generate" if extra else ""
    if limit is not None and n > limit:
        raise PatcherError(
            where,
            f"prompt {longest + 1} has {len(token_lists[longest])} tokens{plus}; the model takes at most "
            f"{limit} positions (config.json max_position_embeddings)",
        )
    need = (heads or 1) * n * n * 4 * 3 * max(1, min(batch_size, len(token_lists)))
    if need > ATTENTION_BUDGET:
        raise PatcherError(
            where,
            f"prompt {longest + 1} has {len(token_lists[longest])} tokens{plus}: its "
            f"attention needs ~{need / 2**30:.0f} GiB (budget {ATTENTION_BUDGET >> 30} GiB); use shorter "
            "prompts or a smaller --batch-size",
        )


# --- prompt files ------------------------------------------------------------------------------------------


def _prompt(obj, path: Path, at: str) -> str:
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise PatcherError(path, f'{at}: expected a JSON object with a "prompt" field')
    if not isinstance(obj["prompt"], str):
        raise PatcherError(path, f'{at}: "prompt" must be a string, got {type(obj["prompt"]).__name__}')
    if not obj["prompt"].strip():
        raise PatcherError(path, f'{at}: "prompt" is empty')
    try:
        obj["prompt"].encode("utf-8")
    except UnicodeEncodeError as e:  # JSON "\ud800" decodes to a lone surrogate no tokenizer takes
        raise PatcherError(
            path,
            f'{at}: "prompt" holds a lone surrogate ({obj["prompt"][e.start]!r} at '
            f"character {e.start}): not valid Unicode",
        ) from None
    return obj["prompt"]


def read_prompt_file(path, limit: int | None = None) -> list[str]:
    """Prompts from .txt (one per non-empty line) or .jsonl/.json (JSON lines of {"prompt": str}, or for .json
    also one array of them). `limit` keeps the first N."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise PatcherError(
            path, "unsupported prompt file type: use .txt (one prompt per line) or .jsonl/.json"
        )
    if limit is not None and limit < 1:
        raise PatcherError(path, f"the prompt limit must be at least 1, got {limit}")
    try:
        text = read_bytes(path, "prompt file").decode("utf-8-sig")  # -sig: drop a byte-order mark
    except UnicodeDecodeError as e:
        raise PatcherError(
            path, f"prompt file is not UTF-8 text (byte {e.start}): re-save it as UTF-8"
        ) from None

    # Split on "\n" only: str.splitlines() would also break prompts at \x0b, \x1c, \u2028 and the like.
    lines = [(n, line.rstrip()) for n, line in enumerate(text.split("\n"), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if suffix == ".txt":
        prompts = [line for _, line in lines]
    elif suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise PatcherError(path, f"bad JSON: {e}") from None
        if not isinstance(items, list):
            raise PatcherError(path, 'expected a JSON array of {"prompt": ...} objects')
        prompts = [_prompt(item, path, f"item {i}") for i, item in enumerate(items)]
    else:
        prompts = []
        for n, line in lines:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise PatcherError(path, f"line {n}: bad JSON: {e}") from None
            prompts.append(_prompt(obj, path, f"line {n}"))
    if not prompts:
        raise PatcherError(path, "no prompts in file")
    return prompts[:limit]


# --- batching ----------------------------------------------------------------------------------------------


def left_pad(batch_ids, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad to the longest sequence, so every prompt's last token sits in the last column."""
    width = max((len(ids) for ids in batch_ids), default=0)
    input_ids = np.full((len(batch_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch_ids), width), dtype=np.int64)
    for row, ids in enumerate(batch_ids):
        if len(ids):
            input_ids[row, width - len(ids) :] = ids
            mask[row, width - len(ids) :] = 1
    return input_ids, mask
