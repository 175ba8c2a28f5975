"""Tokenizer and chat template of a checkpoint.

The tokenizer is the checkpoint's tokenizer.json run by the `tokenizers` library. The chat
template is the checkpoint's own Jinja template, rendered in an environment with the same
semantics as transformers' `apply_chat_template` (sandboxed, trim_blocks/lstrip_blocks,
loopcontrols, a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

Message = Mapping[str, Any]


class ChatError(ValueError):
    """A conversation that cannot be rendered (bad shape, or the template refused it)."""


class PromptTooLong(ValueError):
    """A prompt that leaves no room for a reply in a sequence of `max_model_len` tokens."""

    def __init__(self, tokens: int, max_model_len: int, *, at_least: bool = False):
        self.tokens, self.max_model_len = tokens, max_model_len
        counted = f"at least {tokens}" if at_least else str(tokens)
        super().__init__(f"the prompt has {counted} tokens; this engine holds at most "
                         f"{max_model_len} per sequence (max_model_len; raise it with "
                         "`qomni serve --max-model-len`)")


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        self._tok = _HFTokenizer.from_file(str(file))
        self._literal: _HFTokenizer | None = None  # the same, reading control tokens as text
        config_file = file.parent / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.exists() else {}
        # A text of n characters has at least n / max_token_chars tokens (byte-level BPE: a
        # token's string is never shorter than the text it stands for).
        self.max_token_chars = max(map(len, self._tok.get_vocab(with_added_tokens=True)))
        self.control_tokens = tuple(t.content for t in
                                    self._tok.get_added_tokens_decoder().values() if t.special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, max_model_len: int | None = None,
               literal: LiteralText | None = None) -> list[int]:
        """Token ids of `text`, control tokens (`<|im_start|>`, ...) parsed as such, except in
        the spans `literal` masked. `max_model_len`: a text that certainly has that many
        tokens is refused (`PromptTooLong`) from its length alone, before any tokenizing."""
        at_least = len(text) // self.max_token_chars
        if max_model_len is not None and at_least >= max_model_len:
            raise PromptTooLong(at_least, max_model_len, at_least=True)
        if literal is None or not literal.used:
            return self._encode(self._tok, text)
        if self._literal is None:
            self._literal = _HFTokenizer.from_str(self._tok.to_str())
            self._literal.encode_special_tokens = True
        ids: list[int] = []
        # The control tokens left are the template's: split there, as the tokenizer itself
        # does, and read the client's text (unmasked) with control tokens as plain text.
        for k, piece in enumerate(literal.pattern.split(text)):
            if k % 2:
                ids.append(self.token_id(piece))
            elif literal.marked(piece):
                ids += self._encode(self._literal, literal.unmask(piece))
            elif piece:
                ids += self._encode(self._tok, piece)
        return ids

    @staticmethod
    def _encode(tok: _HFTokenizer, text: str) -> list[int]:
        # encode_batch, unlike encode, lets go of the GIL while it works: a long prompt being
        # tokenized on a worker thread does not stop the others (a server's event loop).
        try:
            return tok.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError:  # what tokenizers raises for a str that is not valid Unicode
            bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
            if bad is None:
                raise
            raise ChatError(f"the prompt is not valid Unicode text (a lone surrogate at "
                            f"character {bad})") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return tid

    def special_tokens(self) -> dict[str, str]:
        """bos/eos/pad/unk token strings from tokenizer_config.json, as templates see them."""
        out = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = self.config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                out[key] = value
        return out


class LiteralText:
    """Message text read as text: the control-token strings a client writes in it
    (`<|im_end|>`, `<|im_start|>system`, `<|audio_pad|>`) are masked before the chat template
    runs and read back as plain text by `Tokenizer.encode`, so only the template writes
    control tokens. Text without such strings tokenizes exactly as before."""

    _MEDIA_KEYS = frozenset(("image", "audio", "video", "image_url", "audio_url", "video_url"))

    def __init__(self, control_tokens: Sequence[str]):
        tokens = sorted(control_tokens, key=len, reverse=True)  # longest first, as a tokenizer
        self.pattern = re.compile("(" + "|".join(map(re.escape, tokens)) + ")")
        nonce = secrets.token_hex(8)  # a client cannot write a mark it has never seen
        self._marks = {t: f"\ue000{nonce}:{k}\ue001" for k, t in enumerate(tokens)}
        self._unmarks = {m: t for t, m in self._marks.items()}
        self._mark = re.compile("\ue000" + nonce + ":[0-9]+\ue001")
        self.used = False

    def mask(self, value: Any) -> Any:
        """`value` (messages, tools) with control-token strings in its text masked; media
        sources are left alone."""
        if isinstance(value, str):
            masked, n = self.pattern.subn(lambda m: self._marks[m.group()], value)
            self.used |= n > 0
            return masked
        if isinstance(value, Mapping):
            return {k: v if k in self._MEDIA_KEYS else self.mask(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.mask(v) for v in value)
        return value

    def marked(self, text: str) -> bool:
        return self._mark.search(text) is not None

    def unmask(self, text: str) -> str:
        return self._mark.sub(lambda m: self._unmarks[m.group()], text)


class StreamDecoder:
    """Turns token ids into text incrementally without ever emitting half of a multi-byte
    character: text is held back while the decoded tail ends in U+FFFD (incomplete UTF-8)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids before this index are fully emitted
        self.emitted = ""  # text of ids[prefix:read] already emitted

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.emitted):]
        # Restart the window at the end so decoding stays O(1) per token.
        self.prefix, self.emitted = len(self.ids), ""
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix, self.emitted = len(self.ids), ""
        return text


def load_chat_template(path: str | Path) -> str:
    """The checkpoint's template: chat_template.jinja, chat_template.json, or tokenizer_config."""
    path = Path(path)
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    config = path / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    raise FileNotFoundError(f"no chat template in {path}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` for templates, refusing underscore attributes (no sandbox escapes)."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set attribute {name!r}")


class _Generation(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` blocks and renders their body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """Rebuild what the template sees from plain JSON types; media objects (arrays, images)
    become inert placeholders, as templates only test for the presence of media keys."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, (str, int, float)):
        return type(value).__mro__[-2](value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def render_chat(template: str, messages: Sequence[Message], *, tools: Sequence[dict] | None = None,
                add_generation_prompt: bool = True, special_tokens: Mapping[str, str] | None = None,
                **kwargs: Any) -> str:
    """Render one conversation as transformers' apply_chat_template(tokenize=False) does."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatError("messages must be a list of {'role': ..., 'content': ...} objects")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatError(f"message #{i} must be an object with a 'role'")
        m = _plain(m)
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    try:
        return _compile(template).render(
            messages=chat, tools=_plain(list(tools)) if tools is not None else None,
            documents=None, add_generation_prompt=add_generation_prompt,
            **dict(special_tokens or {}), **_plain(kwargs))
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"chat template error: {e}") from None
