"""Messages -> model inputs: chat template, tokens, media features, placeholders, M-RoPE positions.

Legend: S prompt tokens, N audios, L mel frames.

The result equals what transformers' Qwen3OmniMoeProcessor + get_rope_index produce for one
conversation: the template is rendered with one placeholder per media item, every placeholder is
expanded to its token count (audio: from its mel frames; image/video: from its patch grid), and
positions follow TMRoPE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qomni.config import OmniConfig, PreprocessorConfig
from qomni.models.thinker import MediaInputs
from qomni.multimodal.audio import load_audio, log_mel_features
from qomni.multimodal.chat import ChatError, Tokenizer, load_chat_template, render_chat
from qomni.multimodal.positions import audio_token_count, expand_placeholders, rope_index
from qomni.multimodal.vision import preprocess_image

MEDIA_TYPES = ("image", "audio", "video")


@dataclass
class ProcessedInputs:
    input_ids: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [3, S] float32 (t, h, w) M-RoPE positions
    rope_delta: float  # decode position of the k-th new token = S + k + rope_delta
    prompt: str  # the rendered chat template (one placeholder per media item)
    media: MediaInputs = field(default_factory=MediaInputs)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class Processor:
    """`media_options` go to the media loaders (allow_remote, local_root, max_bytes, ...)."""

    def __init__(self, path: str | Path, config: OmniConfig, **media_options: Any):
        self.config = config
        self.pre = PreprocessorConfig.from_file(Path(path))
        self.tokenizer = Tokenizer(path)
        self.template = load_chat_template(path)
        self.media_options = media_options

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        return render_chat(self.template, messages, tools=tools,
                           add_generation_prompt=add_generation_prompt,
                           special_tokens=self.tokenizer.special_tokens(), **template_kwargs)

    def __call__(self, messages: Sequence[Mapping[str, Any]], *,
                 tools: Sequence[dict] | None = None, use_audio_in_video: bool = False,
                 **template_kwargs: Any) -> ProcessedInputs:
        media = collect_media(messages)
        if media["video"]:
            raise ChatError(f"video input is not supported yet ({len(media['video'])} video(s))")
        if use_audio_in_video:
            raise ChatError("use_audio_in_video needs a video in the conversation")
        prompt = self.render(messages, tools=tools, **template_kwargs)
        ids = self.tokenizer.encode(prompt)
        inputs = MediaInputs()
        audio_counts: list[int] = []
        if media["audio"]:
            inputs.audio_features, inputs.audio_lengths = self._audio(media["audio"])
            n_window = self.config.thinker.audio.n_window
            audio_counts = [audio_token_count(int(n), n_window) for n in inputs.audio_lengths]
        grids: list[tuple[int, ...]] = []
        if media["image"]:
            inputs.pixel_values, inputs.image_grid_thw = self._images(media["image"])
            grids = [tuple(g) for g in inputs.image_grid_thw.tolist()]
        thinker = self.config.thinker
        expanded = expand_placeholders(
            ids, self.config.tokens, audio_token_counts=audio_counts, image_grids=grids,
            merge_size=thinker.vision.spatial_merge_size,
            position_id_per_seconds=thinker.position_id_per_seconds)
        positions, delta = rope_index(
            expanded, self.config.tokens, image_grids=grids,
            audio_lengths=inputs.audio_lengths if inputs.audio_lengths is not None else (),
            n_window=thinker.audio.n_window, merge_size=thinker.vision.spatial_merge_size,
            position_id_per_seconds=thinker.position_id_per_seconds)
        return ProcessedInputs(torch.tensor(expanded, dtype=torch.long), positions, delta, prompt,
                               inputs)

    def _audio(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of all audios of the conversation, computed as one padded batch as
        the reference processor does; returns the valid frames concatenated [mel, ΣL] and the
        frame counts [N]."""
        waves = [load_audio(src, sampling_rate=self.pre.sampling_rate, name=f"audio #{i + 1}",
                            **self.media_options) for i, src in enumerate(items)]
        feats, lengths = log_mel_features(waves, n_fft=self.pre.n_fft, hop_length=self.pre.hop_length,
                                          n_mels=self.pre.feature_size,
                                          sampling_rate=self.pre.sampling_rate)
        valid = torch.cat([feats[i, :, : int(n)] for i, n in enumerate(lengths)], dim=-1)
        return valid, lengths

    def _images(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pre
        out = [preprocess_image(src, patch_size=p.patch_size,
                                temporal_patch_size=p.temporal_patch_size,
                                merge_size=p.merge_size, min_pixels=p.min_pixels,
                                max_pixels=p.max_pixels, image_mean=p.image_mean,
                                image_std=p.image_std, name=f"image #{i + 1}")
               for i, src in enumerate(items)]
        return torch.cat([o[0] for o in out]), torch.stack([o[1] for o in out])


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
            kind = media_kind(part)
            if kind is not None:
                src = part.get(kind, part.get(f"{kind}_url"))
                if src is None:
                    raise ChatError(f"message #{i} part #{j}: {kind} part has no '{kind}' field")
                media[kind].append(src)
    return media


def media_kind(part: Mapping[str, Any]) -> str | None:
    """Which placeholder the chat template emits for a content part (its own rule: the `type`,
    or the presence of an `image`/`image_url`, `audio`/`audio_url` or `video` key)."""
    kind = part.get("type")
    for k in MEDIA_TYPES:
        if kind == k or k in part or (k != "video" and f"{k}_url" in part):
            return k
    return None
