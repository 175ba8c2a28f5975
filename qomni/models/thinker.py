"""The thinker: MoE language model (with the audio and vision encoders feeding its embeddings).

Legend: B batch, S tokens in this step, D hidden, V vocab, Nv visual tokens in the batch.

The text path follows the reference: per layer `h += attn(norm(h))`, `h += moe(norm(h))`, M-RoPE
positions [3, B, S] (t, h, w), deepstack visual features added after the first layers at visual
positions, final RMSNorm, untied lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qomni.config import SpecialTokens, TextConfig, ThinkerConfig
from qomni.models.audio_encoder import AudioEncoder
from qomni.models.layers import MLP, DecoderLayer, KVCache, RMSNorm, valid_tokens
from qomni.models.moe import SparseMoE
from qomni.models.rope import MRoPE
from qomni.models.vision_encoder import VisionEncoder


def decoder_layer(cfg: TextConfig, index: int) -> DecoderLayer:
    mlp = SparseMoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size,
                                                             cfg.intermediate_size)
    return DecoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim, cfg.rms_norm_eps, mlp, index)


@dataclass
class Deepstack:
    """Visual features to add after the first len(features) decoder layers."""

    mask: torch.Tensor  # [B, S] bool, True at image/video token positions
    features: list[torch.Tensor]  # each [Nv, D]


class TextModel(nn.Module):
    """Decoder stack shared by the thinker and the talker (the talker adds a shared expert)."""

    def __init__(self, cfg: TextConfig, embed_rows: int):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(decoder_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRoPE(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        self.embed_rows = embed_rows

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> KVCache:
        w = self.norm.weight
        return KVCache(self.cfg.num_hidden_layers, batch, self.cfg.num_key_value_heads, max_len,
                       self.cfg.head_dim, dtype or w.dtype, device or w.device)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                n_new: torch.Tensor | None = None, deepstack: Deepstack | None = None,
                capture: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [B, S, D] input embeddings; positions [3, B, S]; row b has n_new[b] valid tokens
        (right padding). Returns the final-normed hidden [B, S, D] and, if `capture` = k, the
        hidden state after k decoder layers (the reference's `hidden_states[k]`)."""
        b, s, _ = h.shape
        if n_new is None:
            n_new = torch.full((b,), s, dtype=torch.long, device=h.device)
        if int((cache.lengths + n_new).max()) > cache.max_len:
            raise ValueError(f"sequence exceeds the KV cache capacity of {cache.max_len} tokens")
        cos, sin = self.rotary(positions, h.dtype)
        slots, mask = cache.slots(n_new, s)
        keep = valid_tokens(n_new, s)
        captured = h if capture == 0 else None
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, slots, mask, keep)
            if capture == i + 1:
                captured = h  # recorded before the deepstack addition, as the reference does
            if deepstack is not None and i < len(deepstack.features):
                h = h.clone()
                h[deepstack.mask] += deepstack.features[i].to(h.dtype)
        cache.advance(n_new)
        return self.norm(h), captured


class ThinkerLM(TextModel):
    """`thinker.model`: token embeddings + decoder stack."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, cfg.vocab_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


@dataclass
class MediaInputs:
    """Encoder inputs of one prompt (any field may be empty)."""

    audio_features: torch.Tensor | None = None  # [mel, ΣL] valid frames of all audios
    audio_lengths: torch.Tensor | None = None  # [N_audio] frames per audio
    pixel_values: torch.Tensor | None = None  # [N_patches, C*T*P*P] images
    image_grid_thw: torch.Tensor | None = None  # [N_images, 3]
    pixel_values_videos: torch.Tensor | None = None  # [N_patches, C*T*P*P] videos
    video_grid_thw: torch.Tensor | None = None  # [N_videos, 3]
    video_second_per_grid: torch.Tensor | None = None  # [N_videos] float32 seconds per frame group

    def to(self, device: torch.device) -> MediaInputs:
        return MediaInputs(**{k: None if v is None else v.to(device)
                              for k, v in self.__dict__.items()})


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig, tokens: SpecialTokens):
        super().__init__()
        self.cfg, self.tokens = cfg, tokens
        self.audio_tower = AudioEncoder(cfg.audio)
        self.visual = VisionEncoder(cfg.vision)
        self.model = ThinkerLM(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def embed_inputs(self, input_ids: torch.Tensor, media: MediaInputs | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """One prompt's input embeddings [S, D], with encoder outputs in place of the audio,
        image and video placeholders; plus the visual-position mask [S] and the deepstack
        features (visual tokens in sequence order) when the prompt has images or videos."""
        h = self.embed(input_ids)
        if media is None:
            return h, None, None
        dtype = h.dtype
        if media.audio_features is not None:
            feats = self.audio_tower(media.audio_features.to(dtype), media.audio_lengths)
            h = _scatter(h, input_ids == self.tokens.audio, feats, "audio")
        visual_mask, deepstack = None, None
        parts = []
        for pixels, grid, token, kind in (
            (media.pixel_values, media.image_grid_thw, self.tokens.image, "image"),
            (media.pixel_values_videos, media.video_grid_thw, self.tokens.video, "video"),
        ):
            if pixels is None:
                continue
            embeds, ds = self.visual(pixels.to(dtype), grid)
            mask = input_ids == token
            h = _scatter(h, mask, embeds, kind)
            parts.append((mask, ds))
        if parts:
            visual_mask = parts[0][0] if len(parts) == 1 else parts[0][0] | parts[1][0]
            deepstack = []
            for level in range(len(parts[0][1])):
                joint = h.new_zeros(int(visual_mask.sum()), h.shape[-1])
                for mask, ds in parts:  # images and videos interleave in sequence order
                    joint[mask[visual_mask]] = ds[level].to(dtype)
                deepstack.append(joint)
        return h, visual_mask, deepstack

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                n_new: torch.Tensor | None = None, deepstack: Deepstack | None = None,
                capture: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model(embeds, positions, cache, n_new, deepstack, capture)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _scatter(h: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, kind: str) -> torch.Tensor:
    n = int(mask.sum())
    if n != values.shape[0]:
        raise ValueError(f"the prompt has {n} {kind} placeholder tokens but the {kind} encoder "
                         f"produced {values.shape[0]} embeddings")
    h = h.clone()
    h[mask] = values.to(h.dtype)
    return h
