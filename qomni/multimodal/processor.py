"""Messages -> model inputs: chat template, tokens, media features, placeholders, M-RoPE positions.

Legend: S prompt tokens, N audios, L mel frames.

The result equals what transformers' Qwen3OmniMoeProcessor + get_rope_index produce for one
conversation: the template is rendered with one placeholder per media item, every placeholder is
expanded to its token count (audio: from its mel frames; image/video: from its patch grid), and
positions follow TMRoPE.

Videos are sampled as the official client does (`video.load_video`, 2 fps unless the part says
`"fps": ...`). With `use_audio_in_video`, each video's sound track becomes an audio of its own,
interleaved with the video's tokens by time; all audios (standalone clips and sound tracks) are
then in placeholder order, which is the order the reference's audio tower and positions use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qomni.cancel import check_cancelled
from qomni.config import OmniConfig, PreprocessorConfig
from qomni.models.audio_encoder import window_frames
from qomni.models.thinker import MediaInputs
from qomni.multimodal.audio import MelCache, load_audio, log_mel_features
from qomni.multimodal.chat import (
    ChatError,
    LiteralText,
    PromptTooLong,
    Tokenizer,
    load_chat_template,
    render_chat,
)
from qomni.multimodal.media import MediaPolicy, resolve_media
from qomni.multimodal.positions import audio_token_count, expand_placeholders, rope_index
from qomni.multimodal.video import (
    FPS,
    is_frame_list,
    load_video,
    load_video_audio,
    preprocess_video,
)
from qomni.multimodal.vision import preprocess_image

MEDIA_TYPES = ("image", "audio", "video")


@dataclass
class ProcessedInputs:
    input_ids: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [3, S] float32 (t, h, w) M-RoPE positions
    rope_delta: float  # decode position of the k-th new token = S + k + rope_delta
    prompt: str  # the rendered chat template (one placeholder per media item)
    media: MediaInputs = field(default_factory=MediaInputs)
    use_audio_in_video: bool = False  # videos carry their sound tracks (audio-in-video blocks)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class Processor:
    """`media`: what media references may name and how large and long media may be, for every
    call that does not bring its own policy (`__call__(..., media=...)`)."""

    def __init__(self, path: str | Path, config: OmniConfig, media: MediaPolicy | None = None):
        self.config = config
        self.pre = PreprocessorConfig.from_file(Path(path))
        self.tokenizer = Tokenizer(path)
        self.template = load_chat_template(path)
        self.media = media or MediaPolicy()

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        return render_chat(self.template, messages, tools=tools,
                           add_generation_prompt=add_generation_prompt,
                           special_tokens=self.tokenizer.special_tokens(), **template_kwargs)

    def __call__(self, messages: Sequence[Mapping[str, Any]], *,
                 tools: Sequence[dict] | None = None, use_audio_in_video: bool = False,
                 media: MediaPolicy | None = None, literal_text: bool = False,
                 max_model_len: int | None = None, mel_cache: MelCache | None = None,
                 cancel: threading.Event | None = None, **template_kwargs: Any
                 ) -> ProcessedInputs:
        """`media`: this call's media policy (default: the processor's). `literal_text`:
        control-token strings in the messages' text are text, not control tokens (the
        reference, and the default, parses them). `max_model_len`: a prompt that leaves no
        room for a reply in a sequence this long is refused (`PromptTooLong`) before its
        media are decoded, and one far too long before it is even tokenized. `mel_cache`:
        log-mel blocks of audio seen before, reused. `cancel`: once set, the call stops at the
        next media item or log-mel block (`Cancelled`)."""
        policy = media or self.media
        parts = media_parts(messages)
        literal = LiteralText(self.tokenizer.control_tokens) if literal_text else None
        if literal is not None:
            messages, tools = literal.mask(messages), literal.mask(tools)
        prompt = self.render(messages, tools=tools, **template_kwargs)
        ids = self.tokenizer.encode(prompt, max_model_len=max_model_len, literal=literal)
        if max_model_len is not None and len(ids) >= max_model_len:  # media add more
            raise PromptTooLong(len(ids), max_model_len, at_least=True)
        inputs = MediaInputs()
        videos = [part for kind, part in parts if kind == "video"]
        # A video file is fetched once, for its frames and (audio in video) its sound track.
        sources = [self._video_source(part, i, policy) for i, part in enumerate(videos)]
        check_cancelled(cancel)
        slots = self._audio_slots(parts, sources, use_audio_in_video, policy)
        counts: list[int] = []
        if slots:
            inputs.audio_features, inputs.audio_lengths = self._audio(
                [w for _, w in slots], mel_cache, cancel)
            n_window = self.config.thinker.audio.n_window
            counts = [audio_token_count(int(n), n_window) for n in inputs.audio_lengths]
        images = [media_source(part, "image") for kind, part in parts if kind == "image"]
        image_grids: list[tuple[int, ...]] = []
        check_cancelled(cancel)
        if images:
            inputs.pixel_values, inputs.image_grid_thw = self._images(images, policy)
            image_grids = [tuple(g) for g in inputs.image_grid_thw.tolist()]
        video_grids: list[tuple[int, ...]] = []
        spg: list[float] = []
        check_cancelled(cancel)
        if videos:
            (inputs.pixel_values_videos, inputs.video_grid_thw,
             inputs.video_second_per_grid) = self._videos(videos, sources, policy)
            video_grids = [tuple(g) for g in inputs.video_grid_thw.tolist()]
            spg = inputs.video_second_per_grid.tolist()
        thinker = self.config.thinker
        expanded = expand_placeholders(
            ids, self.config.tokens,
            audio_token_counts=[c for c, (k, _) in zip(counts, slots) if k == "audio"],
            image_grids=image_grids, video_grids=video_grids, video_second_per_grid=spg,
            merge_size=thinker.vision.spatial_merge_size,
            position_id_per_seconds=thinker.position_id_per_seconds,
            use_audio_in_video=use_audio_in_video,
            video_audio_token_counts=[c for c, (k, _) in zip(counts, slots) if k == "video"])
        positions, delta = rope_index(
            expanded, self.config.tokens, image_grids=image_grids, video_grids=video_grids,
            video_second_per_grid=spg,
            audio_lengths=inputs.audio_lengths if inputs.audio_lengths is not None else (),
            n_window=thinker.audio.n_window, merge_size=thinker.vision.spatial_merge_size,
            position_id_per_seconds=thinker.position_id_per_seconds,
            use_audio_in_video=use_audio_in_video)
        return ProcessedInputs(torch.tensor(expanded, dtype=torch.long), positions, delta, prompt,
                               inputs, use_audio_in_video)

    @property
    def audio_window_frames(self) -> int:
        """Mel frames per attention window of the audio encoder: a window's embeddings depend
        on its frames alone, so once its audio has arrived it is final (see `log_mel_features`
        and `AudioEncoder`)."""
        return window_frames(self.config.thinker.audio)

    def finished_audio_windows(self, frames: int) -> int:
        """Encoder windows of a clip still arriving, now `frames` mel frames long, that are
        final: all their frames' STFT windows have arrived."""
        margin = -(-(self.pre.n_fft // 2) // self.pre.hop_length)
        return max(frames - margin, 0) // self.audio_window_frames

    def _video_source(self, part: Mapping[str, Any], index: int, policy: MediaPolicy) -> Any:
        src = media_source(part, "video")
        if is_frame_list(src):
            return src
        return resolve_media(src, name=f"video #{index + 1}", **policy.source_options)

    def _audio_slots(self, parts: list[tuple[str, Mapping[str, Any]]], video_sources: list[Any],
                     use_audio_in_video: bool, policy: MediaPolicy
                     ) -> list[tuple[str, np.ndarray]]:
        """(kind, 16 kHz waveform) of every audio in placeholder order: standalone clips, and with
        use_audio_in_video each video's sound track where the video stands."""
        rate = self.pre.sampling_rate
        slots = []
        n_audio = n_video = 0
        for kind, part in parts:
            if kind == "audio":
                n_audio += 1
                slots.append((kind, load_audio(media_source(part, kind), sampling_rate=rate,
                                               max_seconds=policy.max_seconds,
                                               name=f"audio #{n_audio}",
                                               **policy.source_options)))
            elif kind == "video":
                if use_audio_in_video:
                    slots.append((kind, load_video_audio(video_sources[n_video], sampling_rate=rate,
                                                         max_seconds=policy.max_seconds,
                                                         name=f"video #{n_video + 1}")))
                n_video += 1
        return slots

    def _audio(self, waves: list[np.ndarray], cache: MelCache | None = None,
               cancel: threading.Event | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of all audios of the conversation, computed as one padded batch as
        the reference processor does; returns the valid frames concatenated [mel, ΣL] and the
        frame counts [N]."""
        p = self.pre
        feats, lengths = log_mel_features(waves, n_fft=p.n_fft, hop_length=p.hop_length,
                                          n_mels=p.feature_size, sampling_rate=p.sampling_rate,
                                          block_frames=self.audio_window_frames,
                                          cache=cache, cancel=cancel)
        valid = torch.cat([feats[i, :, : int(n)] for i, n in enumerate(lengths)], dim=-1)
        return valid, lengths

    def _images(self, items: list[Any], policy: MediaPolicy
                ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pre
        out = [preprocess_image(self._image_source(src, f"image #{i + 1}", policy),
                                patch_size=p.patch_size,
                                temporal_patch_size=p.temporal_patch_size,
                                merge_size=p.merge_size, min_pixels=p.min_pixels,
                                max_pixels=p.max_pixels, image_mean=p.image_mean,
                                image_std=p.image_std, name=f"image #{i + 1}")
               for i, src in enumerate(items)]
        return torch.cat([o[0] for o in out]), torch.stack([o[1] for o in out])

    @staticmethod
    def _image_source(src: Any, name: str, policy: MediaPolicy) -> Any:
        """A reference (path, URL, base64, bytes) read under the policy; decoded images and
        arrays as they are."""
        if isinstance(src, (str, bytes, bytearray, memoryview, os.PathLike)):
            return resolve_media(src, name=name, **policy.source_options)
        return src

    def _videos(self, parts: list[Mapping[str, Any]], sources: list[Any], policy: MediaPolicy
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixel_values_videos [ΣN_patches, C*T*P*P], video_grid_thw [N_videos, 3] and
        video_second_per_grid [N_videos] (float32, as the reference's processor returns it)."""
        p = self.pre
        out = []
        for i, (part, src) in enumerate(zip(parts, sources)):
            name = f"video #{i + 1}"
            frames, fps = load_video(src, fps=part.get("fps", FPS), name=name,
                                     max_seconds=policy.max_seconds)
            out.append(preprocess_video(frames, fps, patch_size=p.patch_size,
                                        temporal_patch_size=p.temporal_patch_size,
                                        merge_size=p.merge_size, image_mean=p.image_mean,
                                        image_std=p.image_std, name=name))
        return (torch.cat([o[0] for o in out]), torch.stack([o[1] for o in out]),
                torch.tensor([o[2] for o in out], dtype=torch.float32))


def media_parts(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(kind, content part) of every media item, in the order the template emits their
    placeholders; each part is checked to name its source."""
    parts: list[tuple[str, Mapping[str, Any]]] = []
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
                if media_source(part, kind) is None:
                    raise ChatError(f"message #{i} part #{j}: {kind} part has no '{kind}' field")
                parts.append((kind, part))
    return parts


def media_source(part: Mapping[str, Any], kind: str) -> Any:
    return part.get(kind, part.get(f"{kind}_url"))


def media_kind(part: Mapping[str, Any]) -> str | None:
    """Which placeholder the chat template emits for a content part (its own rule: the `type`,
    or the presence of an `image`/`image_url`, `audio`/`audio_url` or `video` key)."""
    kind = part.get("type")
    for k in MEDIA_TYPES:
        if kind == k or k in part or (k != "video" and f"{k}_url" in part):
            return k
    return None
