"""OpenAI chat messages -> qomni's conversation format (the model card's), with every media part
read through the server's resolver."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from qomni.server.wire import (
    APIError,
    AudioPart,
    AudioURLPart,
    ImagePart,
    ImageURLPart,
    InputAudioPart,
    Message,
    TextPart,
    URLRef,
    VideoPart,
    VideoURLPart,
)

# resolve(kind, reference, param) -> the media's bytes (or decoded samples); raises on anything
# not allowed.
Resolver = Callable[[str, str, str], Any]


def count_media(messages: Sequence[Message]) -> int:
    return sum(1 for m in messages if isinstance(m.content, list)
               for p in m.content if not isinstance(p, TextPart))


def to_conversation(messages: Sequence[Message], resolve: Resolver, *,
                    transcripts: Callable[[str], str | None], tools: bool) -> list[dict]:
    """OpenAI messages -> the model card's conversation format. Media parts become
    {"type": "image"|"audio"|"video", kind: what `resolve` made of the reference}."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        content: str | list[dict] = m.content if isinstance(m.content, str) else ""
        if isinstance(m.content, list):
            parts = [_part(p, resolve, f"messages[{i}].content[{j}]")
                     for j, p in enumerate(m.content)]
            if all(p["type"] == "text" for p in parts):
                content = "".join(p["text"] for p in parts)  # as OpenAI joins text parts
            elif role in ("assistant", "tool"):
                raise APIError(400, f"messages[{i}]: {role} messages can only hold text",
                               param=f"messages[{i}].content")
            elif role == "system" and tools and i == 0:
                raise APIError(400, "messages[0]: with tools, the system message must be text",
                               param="messages[0].content")
            else:
                content = parts
        if role == "assistant" and not content and m.audio is not None:
            content = transcripts(m.audio.id) or ""
        msg: dict[str, Any] = {"role": role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _url(ref: URLRef | str) -> str:
    return ref if isinstance(ref, str) else ref.url


def _part(p: BaseModel, resolve: Resolver, param: str) -> dict[str, Any]:
    if isinstance(p, TextPart):
        return {"type": "text", "text": p.text}
    if isinstance(p, InputAudioPart):
        data = p.input_audio.data.strip()
        # input_audio is base64 by definition; a data-URI prefix makes the loader decode it as
        # such instead of guessing (a short or odd string must never be taken for a file path).
        if not data.lower().startswith("data:"):
            data = "data:application/octet-stream;base64," + data
        return {"type": "audio", "audio": resolve("audio", data, f"{param}.input_audio.data")}
    kind, ref, field = {
        ImageURLPart: lambda: ("image", _url(p.image_url), "image_url"),
        AudioURLPart: lambda: ("audio", _url(p.audio_url), "audio_url"),
        VideoURLPart: lambda: ("video", _url(p.video_url), "video_url"),
        ImagePart: lambda: ("image", p.image, "image"),
        AudioPart: lambda: ("audio", p.audio, "audio"),
        VideoPart: lambda: ("video", p.video, "video"),
    }[type(p)]()
    return {"type": kind, kind: resolve(kind, ref, f"{param}.{field}")}
