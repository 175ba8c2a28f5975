"""AuT audio encoder (`thinker.audio_tower`): log-mel frames -> one embedding per `<|audio_pad|>`.

Legend: N audios, M mel bins, L mel frames, C chunks, P padded chunk frames, F conv channels,
K tokens per chunk, T tokens (all audios, packed), W attention windows, S tokens per window,
D d_model, H heads, Dh head dim, O output_dim.

Each audio is cut into chunks of 2*n_window frames; every chunk goes through the conv stem on its
own and gets sinusoid positions 0..K-1, so audio of any length works. Attention is bidirectional
inside windows of n_window_infer frames, cut per audio from its start. All windows attend in one
batched call over a [W, H, S, Dh] tensor, so memory grows linearly with the audio length.
"""

from __future__ import annotations

import math
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from qomni.config import AudioConfig

IntOrTensor = TypeVar("IntOrTensor", int, torch.Tensor)


def _stem_len(frames: IntOrTensor) -> IntOrTensor:
    """Tokens the conv stem makes from one chunk: three Conv(k=3, s=2, p=1); 0 frames -> 0."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def audio_token_count(lengths: IntOrTensor, n_window: int) -> IntOrTensor:
    """`<|audio_pad|>` tokens for audios of `lengths` mel frames (the reference's
    `_get_feat_extract_output_lengths`): full chunks give `_stem_len(2*n_window)` each (13)."""
    chunk = 2 * n_window
    return (lengths // chunk) * _stem_len(chunk) + _stem_len(lengths % chunk)


def _segments(lengths: list[int], size: int) -> tuple[list[int], list[int]]:
    """Cut each of the packed sequences into pieces of `size` from its start (the last piece keeps
    the remainder); returns the packed start and the length of every piece, in order."""
    starts, sizes, offset = [], [], 0
    for n in lengths:
        for s in range(0, n, size):
            starts.append(offset + s)
            sizes.append(min(size, n - s))
        offset += n
    return starts, sizes


def _gather_index(
    starts: list[int], sizes: list[int], width: int, fill: int, device: torch.device
) -> torch.Tensor:
    """[pieces, width] packed indices of each piece, right-padded with `fill`."""
    pos = torch.arange(width)
    index = torch.tensor(starts)[:, None] + pos
    index = torch.where(pos < torch.tensor(sizes)[:, None], index, fill)
    return index.to(device)


class _Windows(NamedTuple):
    index: torch.Tensor  # [W, S] packed token of each window slot; T marks padding
    mask: torch.Tensor | None  # [W, 1, 1, S] keys to attend; None when no window is padded
    keep: torch.Tensor  # [W*S] slots that hold a real token, in packed order


class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        if d % self.num_heads:
            raise ValueError(f"d_model {d} is not a multiple of {self.num_heads} heads")
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, windows: _Windows) -> torch.Tensor:
        # Padding slots read an appended zero row; they are masked as keys and dropped afterwards.
        x = F.pad(x, (0, 0, 0, 1))[windows.index]  # [W, S, D]
        w, s, d = x.shape
        q, k, v = (
            proj(x).view(w, s, self.num_heads, -1).transpose(1, 2)  # [W, H, S, Dh]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=windows.mask)
        out = out.transpose(1, 2).reshape(w * s, d)[windows.keep]  # [T, D]
        return self.out_proj(out)


class AudioEncoderLayer(nn.Module):
    """Pre-LN transformer layer: attention within windows, then a GELU MLP."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = AudioAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, windows: _Windows) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), windows)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # the reference keeps fp16 activations finite this way
            bound = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-bound, bound)
        return x


class AudioEncoder(nn.Module):
    """Log-mel features of a batch of audios -> packed audio embeddings, in audio order."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        if cfg.activation_function != "gelu":
            raise ValueError(f"audio encoder: unsupported activation {cfg.activation_function!r}")
        if cfg.n_window_infer < 2 * cfg.n_window:
            raise ValueError("audio encoder: n_window_infer must cover at least one chunk")
        self.cfg = cfg
        ch = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, ch, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(ch, ch, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(ch, ch, 3, 2, padding=1)
        self.conv_out = nn.Linear(ch * _stem_len(cfg.num_mel_bins), cfg.d_model, bias=False)
        # Positions restart in every chunk, so one chunk's worth of table is all that is ever read.
        table = _sinusoids(_stem_len(2 * cfg.n_window), cfg.d_model)
        self.register_buffer("positional_embedding", table, persistent=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features [M, ΣL] (the valid frames of all audios, concatenated), lengths [N]
        -> [T, O] with T = Σ audio_token_count(lengths), audio after audio."""
        lens = [int(n) for n in lengths.tolist()]
        if not lens or min(lens) < 1 or sum(lens) != features.shape[-1]:
            raise ValueError(
                f"audio encoder: lengths {lens} must be positive and sum to the "
                f"{features.shape[-1]} frames given"
            )
        chunk = 2 * self.cfg.n_window
        starts, sizes = _segments(lens, chunk)
        # The reference pads every chunk to the longest chunk of the batch, and what the conv
        # biases make of that padding reaches the chunk's last token, so we pad the same way.
        width = max(sizes)
        x = self._embed_chunks(features, starts, sizes, width)  # [T, D]
        windows = self._windows(lens, width, x.shape[0], x.device)
        for layer in self.layers:
            x = layer(x, windows)
        return self.proj2(F.gelu(self.proj1(self.ln_post(x))))

    def _embed_chunks(
        self, features: torch.Tensor, starts: list[int], sizes: list[int], width: int
    ) -> torch.Tensor:
        """Conv stem + conv_out + positions for every chunk, conv_chunksize chunks at a time
        (the stem's activations are ~6 MB per chunk at real widths)."""
        frames = F.pad(features.T.to(self.conv2d1.weight.dtype), (0, 0, 0, 1))  # [ΣL+1, M]
        index = _gather_index(starts, sizes, width, frames.shape[0] - 1, frames.device)  # [C, P]
        k = _stem_len(width)
        tokens = _stem_len(torch.tensor(sizes, device=frames.device))
        valid = torch.arange(k, device=frames.device) < tokens[:, None]  # [C, K]
        pos = self.positional_embedding[:k].to(frames.dtype)
        out = []
        for i in range(0, len(sizes), self.cfg.conv_chunksize):
            rows = slice(i, i + self.cfg.conv_chunksize)
            x = frames[index[rows]].transpose(1, 2).unsqueeze(1)  # [C, 1, M, P]
            x = F.gelu(self.conv2d1(x))
            x = F.gelu(self.conv2d2(x))
            x = F.gelu(self.conv2d3(x))  # [C, F, M/8, K]
            x = self.conv_out(x.permute(0, 3, 1, 2).flatten(2)) + pos  # [C, K, D]
            out.append(x[valid[rows]])
        return torch.cat(out)

    def _windows(self, lens: list[int], width: int, total: int, device: torch.device) -> _Windows:
        chunk = 2 * self.cfg.n_window
        # Reference quirk (notes Q7): the window is sized from the longest chunk of the batch,
        # not from a full chunk. It differs only when every audio is shorter than one chunk, and
        # then each audio fits in a single window either way.
        size = _stem_len(width) * (self.cfg.n_window_infer // chunk)
        starts, sizes = _segments([audio_token_count(n, self.cfg.n_window) for n in lens], size)
        s = max(sizes)
        index = _gather_index(starts, sizes, s, total, device)  # [W, S]
        real = index < total
        mask = None if min(sizes) == s else real[:, None, None, :]
        return _Windows(index, mask, real.flatten())


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """[length, channels] table, sin in the first half and cos in the second; built in fp32 with
    the reference's operation order so the values match bit for bit."""
    half = channels // 2
    if channels % 2 or half < 2:
        raise ValueError(f"audio encoder: d_model {channels} must be even and at least 4")
    inv_timescales = torch.exp(-(math.log(max_timescale) / (half - 1)) * torch.arange(half).float())
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)
