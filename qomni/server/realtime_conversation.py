"""The realtime session's conversation: its items, how clients add them
(`conversation.item.create`, committed audio turns), their JSON, and the prompt built from them.

Turns and history: the system prompt is the session's `instructions` (default: the model card's
voice-assistant prompt, `VOICE_ASSISTANT_PROMPT`); user audio turns are stored as audio (16 kHz
float32, exactly the committed samples), assistant turns as the text that was sent (a cancelled
reply keeps its partial text). When the history holds more media items than
`Limits.max_media_items` the oldest items are dropped; when the engine refuses the prompt as
longer than its `max_model_len`, the session drops the oldest exchange (`drop_oldest_exchange`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qomni.multimodal.audio import load_audio
from qomni.multimodal.media import MediaError, MediaPolicy
from qomni.server.realtime_audio import MODEL_RATE
from qomni.server.realtime_config import RealtimeError, check_dict, decode_b64
from qomni.server.wire import new_id


@dataclass
class Item:
    id: str
    role: str  # "user" | "assistant"
    parts: list[dict[str, Any]] = field(default_factory=list)  # user: model-card content
    text: str = ""  # assistant: what was said
    output_audio: bool = False
    status: str = "completed"

    def n_media(self) -> int:
        return sum(1 for p in self.parts if p["type"] != "text")


def user_turn(images: Sequence[bytes], audio: Sequence[np.ndarray] = (),
              texts: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The model-card content of one user turn: images (video frames) first, then the audio,
    then text. The session builds the turn being spoken the same way (with the audio so far),
    so its prefixes start exactly like the committed turn."""
    return ([{"type": "image", "image": im} for im in images]
            + [{"type": "audio", "audio": a} for a in audio]
            + [{"type": "text", "text": t} for t in texts])


def part_json(item: Item, ga: bool) -> dict[str, Any]:
    """The one content part of an assistant item."""
    if item.output_audio:
        return {"type": "output_audio" if ga else "audio", "transcript": item.text}
    return {"type": "output_text" if ga else "text", "text": item.text}


def item_json(item: Item, ga: bool) -> dict[str, Any]:
    if item.role == "assistant":
        content = [part_json(item, ga)]
    else:
        content = [{"type": "input_audio", "transcript": None} if p["type"] == "audio" else
                   {"type": "input_image"} if p["type"] == "image" else
                   {"type": "input_text", "text": p["text"]} for p in item.parts]
    return {"id": item.id, "object": "realtime.item", "type": "message", "role": item.role,
            "status": item.status, "content": content}


def decode_image(v: Any, name: str, max_bytes: int) -> bytes:
    """A base64 image (bare or as a data URI), checked to be one that PIL can open."""
    if isinstance(v, str) and v.startswith("data:"):
        head, _, v = v.partition(",")
        if ";base64" not in head:
            raise RealtimeError(f"{name}: only base64 data URIs are accepted", param=name)
    data = decode_b64(v, name)
    if len(data) > max_bytes:
        raise RealtimeError(f"{name}: image larger than the {max_bytes}-byte limit", param=name,
                            code="invalid_media")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception:  # noqa: BLE001 - any failure means not an image
        raise RealtimeError(f"{name} is not a JPEG/PNG/WebP image", param=name,
                            code="invalid_media") from None
    return data


def item_from_event(it: Any, pending_images: list[bytes], input_rate: int, media: MediaPolicy
                    ) -> Item:
    """The item of a `conversation.item.create`; a user item starts with the pending
    `input_image_buffer` frames."""
    it = check_dict(it, "item")
    if it.get("type", "message") != "message":
        raise RealtimeError(f"item.type {it.get('type')!r} is not supported (only "
                            "'message')", param="item.type", code="unsupported")
    role = it.get("role")
    if role not in ("user", "assistant"):
        raise RealtimeError("item.role must be 'user' or 'assistant' (set the system "
                            "prompt with session.update instructions)", param="item.role")
    content = it.get("content")
    if not isinstance(content, list) or not content:
        raise RealtimeError("item.content must be a non-empty list", param="item.content")
    texts: list[str] = []
    audio: list[np.ndarray] = []
    images: list[bytes] = []
    for j, c in enumerate(content):
        name = f"item.content[{j}]"
        c = check_dict(c, name)
        kind = c.get("type")
        if kind in ("input_text", "text", "output_text"):
            if not isinstance(c.get("text"), str):
                raise RealtimeError(f"{name}.text must be a string", param=f"{name}.text")
            texts.append(c["text"])
        elif kind in ("audio", "output_audio") and role == "assistant":
            transcript = c.get("transcript")
            if transcript is not None and not isinstance(transcript, str):
                raise RealtimeError(f"{name}.transcript must be a string",
                                    param=f"{name}.transcript")
            texts.append(transcript or "")
        elif kind == "input_audio" and role == "user":
            data = decode_b64(c.get("audio"), f"{name}.audio")
            if len(data) % 2:
                raise RealtimeError("audio must be PCM16", param=f"{name}.audio")
            try:
                audio.append(load_audio(
                    (np.frombuffer(data, "<i2"), input_rate), sampling_rate=MODEL_RATE,
                    max_seconds=media.max_seconds, name=f"{name}.audio"))
            except MediaError as e:
                raise RealtimeError(str(e), param=f"{name}.audio", code="invalid_media") from None
        elif kind == "input_image" and role == "user":
            images.append(decode_image(c.get("image_url") or c.get("image"),
                                       f"{name}.image_url", media.max_bytes))
        else:
            raise RealtimeError(f"{name}.type {kind!r} is not supported in a {role} item",
                                param=f"{name}.type", code="unsupported")
    item_id = it.get("id") if isinstance(it.get("id"), str) else new_id("item_")
    if role == "assistant":
        return Item(item_id, "assistant", text="".join(texts))
    return Item(item_id, "user", user_turn([*pending_images, *images], audio, texts))


class Conversation:
    """The items in order, and the prompt built from them."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    def index(self, item_id: Any) -> int:
        """Where the item is, -1 when it is not here."""
        return next((i for i, it in enumerate(self.items) if it.id == item_id), -1)

    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def insert(self, item: Item, after: str | None = "") -> str | None:
        """Insert `item` after the item `after` ("" = at the end, None or "root" = at the
        start); returns the id of the item before it."""
        if after == "":
            index = len(self.items)
        elif after is None or after == "root":
            index = 0
        else:
            index = self.index(after) + 1
            if index == 0:
                raise RealtimeError(f"previous_item_id {after!r} is not in the conversation",
                                    param="previous_item_id", code="item_not_found")
        self.items.insert(index, item)
        return self.items[index - 1].id if index else None

    def messages(self, instructions: str, max_media: int) -> list[dict[str, Any]]:
        """The conversation for the model: the system prompt, then the items; the oldest are
        dropped while there are more than `max_media` media items."""
        media = sum(it.n_media() for it in self.items)
        while media > max_media and len(self.items) > 1:
            # Gone for good: the count only grows, so every later prompt would leave it out too.
            media -= self.items.pop(0).n_media()
        out: list[dict[str, Any]] = []
        if instructions:
            out.append({"role": "system", "content": instructions})
        for it in self.items:
            if it.role == "assistant" and not it.text:
                continue  # a reply cancelled before its first word
            if it.role == "assistant":
                out.append({"role": "assistant", "content": it.text})
            elif all(p["type"] == "text" for p in it.parts):
                out.append({"role": "user", "content": "".join(p["text"] for p in it.parts)})
            else:
                out.append({"role": "user", "content": [dict(p) for p in it.parts]})
        return out

    def drop_oldest_exchange(self) -> bool:
        """Forget everything before the second user item (False when there is none)."""
        users = [i for i, it in enumerate(self.items) if it.role == "user"]
        if len(users) < 2:
            return False
        del self.items[:users[1]]
        return True
