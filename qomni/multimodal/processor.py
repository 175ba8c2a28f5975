"""Messages -> model inputs: chat template, tokens, media placeholders and M-RoPE positions.

Legend: S prompt tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qomni.config import OmniConfig
from qomni.multimodal.chat import ChatError, Tokenizer, load_chat_template, render_chat

MEDIA_TYPES = ("image", "audio", "video")


@dataclass
class ProcessedInputs:
    input_ids: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [3, S] (t, h, w) M-RoPE positions
    rope_delta: int  # decode position of the k-th new token = S + k + rope_delta
    prompt: str  # the rendered chat template
    media: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class Processor:
    def __init__(self, path: str | Path, config: OmniConfig):
        self.config = config
        self.tokenizer = Tokenizer(path)
        self.template = load_chat_template(path)

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        return render_chat(self.template, messages, tools=tools,
                           add_generation_prompt=add_generation_prompt,
                           special_tokens=self.tokenizer.special_tokens(), **template_kwargs)

    def __call__(self, messages: Sequence[Mapping[str, Any]], *,
                 tools: Sequence[dict] | None = None, use_audio_in_video: bool = False,
                 **template_kwargs: Any) -> ProcessedInputs:
        media = collect_media(messages)
        for kind, items in media.items():
            if items:
                raise ChatError(f"{kind} input is not supported yet ({len(items)} {kind} item(s))")
        prompt = self.render(messages, tools=tools, **template_kwargs)
        ids = torch.tensor(self.tokenizer.encode(prompt), dtype=torch.long)
        positions = torch.arange(len(ids)).expand(3, -1).clone()
        return ProcessedInputs(ids, positions, 0, prompt, media)


def collect_media(messages: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Media items by kind, in the order the template emits their placeholders."""
    media: dict[str, list[Any]] = {k: [] for k in MEDIA_TYPES}
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatError("messages must be a list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatError(f"message #{i} must be an object, got {type(message).__name__}")
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        if not isinstance(content, Sequence):
            raise ChatError(f"message #{i}: content must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise ChatError(f"message #{i} part #{j} must be an object")
            kind = part.get("type")
            if kind in MEDIA_TYPES:
                if part.get(kind) is None:
                    raise ChatError(f"message #{i} part #{j}: {kind} part has no '{kind}' field")
                media[kind].append(part[kind])
    return media
