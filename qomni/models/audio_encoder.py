"""AuT audio encoder (`thinker.audio_tower`): log-mel frames -> one embedding per `<|audio_pad|>`.

Legend: N audios, M mel bins, L mel frames, C chunks, P padded chunk frames, F conv channels,
K tokens per chunk, S tokens of one window, D d_model, H heads, Dh head dim, O output_dim.

Each audio is cut into chunks of 2*n_window frames; every chunk goes through the conv stem on its
own and gets sinusoid positions 0..K-1, so audio of any length works. Attention is bidirectional
inside windows of n_window_infer frames, cut per audio from its start, so a window's embeddings
depend on its own frames (and the batch's chunk width) alone.

Windows are encoded one at a time, always with the same shapes: a window's embeddings are then
bit for bit the same whether its audio is encoded alone, whole, or beside other clips, which is
what lets speech be encoded (and prefilled) window by window while it arrives, and an earlier
turn's audio be taken from a cache instead of encoded again. (One batched call over all windows
gives other low bits when the batch changes, since matmul kernels block by the row count.)
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

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


def window_frames(cfg: AudioConfig) -> int:
    """Mel frames per attention window: whole chunks of 2*n_window within n_window_infer."""
    chunk = 2 * cfg.n_window
    return chunk * (cfg.n_window_infer // chunk)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, D] (one window) -> [S, D]."""
        s, d = x.shape
        q, k, v = (
            proj(x).view(1, s, self.num_heads, -1).transpose(1, 2)  # [1, H, S, Dh]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(s, d))


class AudioEncoderLayer(nn.Module):
    """Pre-LN transformer layer: attention within windows, then a GELU MLP."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = AudioAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
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
        self.window_cache: WindowCache | None = None

    def cache_windows(self, max_windows: int) -> None:
        """Keep the embeddings of the last `max_windows` windows encoded (0: no cache)."""
        self.window_cache = WindowCache(max_windows) if max_windows > 0 else None

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """features [M, ΣL] (the valid frames of all audios, concatenated), lengths [N]
        -> [T, O] with T = Σ audio_token_count(lengths), audio after audio."""
        lens = [int(n) for n in lengths.tolist()]
        if not lens or min(lens) < 1 or sum(lens) != features.shape[-1]:
            raise ValueError(
                f"audio encoder: lengths {lens} must be positive and sum to the "
                f"{features.shape[-1]} frames given"
            )
        # The reference pads every chunk to the longest chunk of the batch, and what the conv
        # biases make of that padding reaches the chunk's last token, so we pad the same way.
        width = min(2 * self.cfg.n_window, max(lens))
        # (The reference sizes windows from the batch's longest chunk; that differs
        # only when every audio is under one chunk, and then each audio is one window anyway.)
        size = window_frames(self.cfg)
        out, start = [], 0
        for n in lens:
            out += [self.window(features[:, start + a:start + min(a + size, n)], width)
                    for a in range(0, n, size)]
            start += n
        return torch.cat(out)

    def window(self, frames: torch.Tensor, width: int) -> torch.Tensor:
        """One attention window: frames [M, L] (at most window_frames) -> [S, O], its chunks
        padded to `width` frames. A window cache (`cache_windows`) answers repeats."""
        cache = self.window_cache
        if cache is not None and not torch.is_grad_enabled():
            return cache.get(frames, width, self._window)
        return self._window(frames, width)

    def _window(self, frames: torch.Tensor, width: int) -> torch.Tensor:
        x = self._embed_chunks(frames, width)  # [S, D]
        for layer in self.layers:
            x = layer(x)
        return self.proj2(F.gelu(self.proj1(self.ln_post(x))))

    def _embed_chunks(self, features: torch.Tensor, width: int) -> torch.Tensor:
        """Conv stem + conv_out + positions for the chunks of one window, conv_chunksize chunks
        at a time (the stem's activations are ~6 MB per chunk at real widths)."""
        chunk = 2 * self.cfg.n_window
        n = features.shape[-1]
        sizes = [min(chunk, n - a) for a in range(0, n, chunk)]
        frames = features.T.to(self.conv2d1.weight.dtype)  # [L, M]
        # [C, P, M]: chunk after chunk, right-padded with zero frames to the batch's width.
        # (A width under a full chunk means every audio of the batch is one chunk long.)
        x_all = F.pad(frames, (0, 0, 0, len(sizes) * width - n)).view(len(sizes), width, -1)
        k = _stem_len(width)
        tokens = _stem_len(torch.tensor(sizes, device=frames.device))
        valid = torch.arange(k, device=frames.device) < tokens[:, None]  # [C, K]
        pos = self.positional_embedding[:k].to(frames.dtype)
        out = []
        for i in range(0, len(sizes), self.cfg.conv_chunksize):
            rows = slice(i, i + self.cfg.conv_chunksize)
            x = x_all[rows].transpose(1, 2).unsqueeze(1)  # [C, 1, M, P]
            x = F.gelu(self.conv2d1(x))
            x = F.gelu(self.conv2d2(x))
            x = F.gelu(self.conv2d3(x))  # [C, F, M/8, K]
            x = self.conv_out(x.permute(0, 3, 1, 2).flatten(2)) + pos  # [C, K, D]
            out.append(x[valid[rows]])
        return torch.cat(out)


class WindowCache:
    """Embeddings of recently encoded windows, found by their exact frames and chunk width.
    A hit is the same tensor the encoder would compute (windows are encoded alone, with the
    same shapes), so a conversation's earlier audio is encoded once, not at every turn."""

    def __init__(self, max_windows: int):
        self.max_windows = max_windows
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # the engine thread and direct callers may share it

    def get(self, frames: torch.Tensor, width: int,
            encode: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        frames = frames.contiguous()
        digest = hashlib.blake2b(frames.view(torch.uint8).cpu().numpy().tobytes(),
                                 digest_size=16).digest()
        key = (width, tuple(frames.shape), frames.dtype, frames.device, digest)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and torch.equal(hit[0], frames):  # equal, not just same hash
                self._entries.move_to_end(key)
                self.hits += 1
                return hit[1]
        out = encode(frames, width)
        with self._lock:
            self.misses += 1
            self._entries[key] = (frames, out)
            while len(self._entries) > self.max_windows:
                self._entries.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._entries)


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """[length, channels] table, sin in the first half and cos in the second; built in fp32 with
    the reference's operation order so the values match bit for bit."""
    half = channels // 2
    if channels % 2 or half < 2:
        raise ValueError(f"audio encoder: d_model {channels} must be even and at least 4")
    inv_timescales = torch.exp(-(math.log(max_timescale) / (half - 1)) * torch.arange(half).float())
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)
