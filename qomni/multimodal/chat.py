"""Tokenizer and chat template of a checkpoint.

The tokenizer is the checkpoint's tokenizer.json run by the `tokenizers` library. The chat
template is the checkpoint's own Jinja template, rendered in an environment with the same
semantics as transformers' `apply_chat_template` (sandboxed, trim_blocks/lstrip_blocks,
loopcontrols, a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`).
"""

from __future__ import annotations

import json
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


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        self._tok = _HFTokenizer.from_file(str(file))
        config_file = file.parent / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.exists() else {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

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
