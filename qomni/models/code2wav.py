"""Code2Wav: codec codes → 24 kHz waveform.

B batch, G code groups (quantizers), F frames, S samples, D hidden, H heads, K head dim,
W sliding window (frames).

codes [B, G, F] → mean of G code embeddings [B, F, D] → causal sliding-window transformer →
×2 ×2 upsampling ConvNeXt stages → causal conv decoder with ×8 ×5 ×4 ×3 SnakeBeta blocks →
clamp to [-1, 1]. F frames give `samples_per_frame`·F - 555 samples (for the real rates): the
transposed convs withhold the last samples, which also need the next frame.

Every part is causal, so a stream can carry a bounded `Code2WavState` from chunk to chunk and
emit exactly the samples a whole decode would (see code2wav_stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qomni.config import Code2WavConfig
from qomni.models.conv import (
    CausalConvNet,
    CausalTransConvNet,
    ConvNeXtBlock,
    DecoderBlock,
    SnakeBeta,
    Tails,
)
from qomni.models.layers import MLP, RMSNorm
from qomni.models.rope import RoPE, apply_rope


@dataclass
class Code2WavState:
    """What a stream carries between chunks; its size does not grow with the utterance."""

    frames: int = 0  # frames decoded so far: the RoPE position of the next frame
    tails: Tails = field(default_factory=dict)  # per-module left context (see conv.py)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.01))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class Attention(nn.Module):
    """Causal attention over the last W frames: key j is visible to query i iff i-W < j ≤ i."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, tails: Tails | None) -> Tensor:
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, F, K]
        k = self.k_proj(x).view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if tails is not None:
            if self in tails:
                k_past, v_past = tails[self]
                k, v = torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2)
                past = k_past.shape[2]
            # The next frame sees at most the W-1 frames before it.
            keep = max(0, k.shape[2] - (self.window - 1))
            tails[self] = (k[:, :, keep:].clone(), v[:, :, keep:].clone())
        out = self._banded(q, k, v, past)
        return self.o_proj(out.transpose(1, 2).reshape(B, n, -1))

    def _banded(self, q: Tensor, k: Tensor, v: Tensor, past: int) -> Tensor:
        """Queries in blocks of W against the ≤ 2W-1 keys they can see: a [W, 2W-1] mask per
        block instead of a [F, F] one, so memory stays linear in F."""
        W, n = self.window, q.shape[2]
        outs = []
        for q0 in range(0, n, W):
            q1 = min(n, q0 + W)
            k0 = max(0, past + q0 - W + 1)
            qi = torch.arange(past + q0, past + q1, device=q.device)[:, None]
            kj = torch.arange(k0, past + q1, device=q.device)[None, :]
            mask = (kj <= qi) & (kj > qi - W)
            outs.append(F.scaled_dot_product_attention(
                q[:, :, q0:q1], k[:, :, k0:past + q1], v[:, :, k0:past + q1], attn_mask=mask,
                scale=self.head_dim ** -0.5, enable_gqa=self.heads != self.kv_heads))
        return torch.cat(outs, dim=2)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, tails: Tails | None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, tails)
        x = x + self.self_attn_layer_scale(h)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class PreTransformer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RoPE(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: Tensor, start: int, tails: Tails | None) -> Tensor:
        # Positions count from the utterance's first frame, so a stream's chunks get the very
        # cos/sin values a whole decode computes for the same frames.
        positions = torch.arange(start, start + x.shape[1], device=x.device)[None]  # [1, F]
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, tails)
        return self.norm(x)


class Code2Wav(nn.Module):
    """The vocoder. `state_dict()` keys are the checkpoint's, less the `code2wav.` prefix."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        D, Q = cfg.hidden_size, cfg.num_quantizers
        self.code_embedding = nn.Embedding(cfg.codebook_size * Q, D)
        # Quantizer q owns rows q·codebook_size .. (q+1)·codebook_size-1 of the shared table.
        offset = torch.arange(Q).view(1, Q, 1) * cfg.codebook_size
        self.register_buffer("code_offset", offset, persistent=False)
        self.pre_transformer = PreTransformer(cfg)
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalTransConvNet(D, D, r, r), ConvNeXtBlock(D)])
            for r in cfg.upsampling_ratios
        )
        dims = [cfg.decoder_dim // 2**i for i in range(len(cfg.upsample_rates) + 1)]
        self.decoder = nn.ModuleList([
            CausalConvNet(D, dims[0], 7),
            *(DecoderBlock(dims[i], dims[i + 1], r) for i, r in enumerate(cfg.upsample_rates)),
            SnakeBeta(dims[-1]),
            CausalConvNet(dims[-1], 1, 7),
        ])

    def num_samples(self, frames: int) -> int:
        """Samples a whole decode of `frames` frames yields: each transposed conv of rate r
        (kernel 2r) withholds its last input's r samples; the ×2 ×2 stages (kernel r) none."""
        n = frames
        for r in self.cfg.upsampling_ratios:
            n *= r
        for r in self.cfg.upsample_rates:
            n = (n - 1) * r
        return n

    def check_codes(self, codes: Tensor) -> None:
        """Raise ValueError unless `codes` is an integer [B, G, F≥1] tensor of valid code ids."""
        G, V = self.cfg.num_quantizers, self.cfg.codebook_size
        if not isinstance(codes, Tensor) or codes.dtype not in (torch.int16, torch.int32,
                                                                torch.int64):
            raise ValueError(f"codes must be an integer tensor, got {type(codes).__name__} "
                             f"{getattr(codes, 'dtype', '')}")
        if codes.dim() != 3 or codes.shape[1] != G or codes.shape[2] < 1:
            raise ValueError(f"codes must have shape [batch, {G}, frames≥1], "
                             f"got {list(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"codes must lie in [0, {V}), got values in [{lo}, {hi}]")

    def forward(self, codes: Tensor, state: Code2WavState | None = None) -> Tensor:
        """codes [B, G, F] → waveform float32 [B, 1, S].

        Without `state`: a whole decode, S = num_samples(F). With a state: the next chunk of a
        stream; it returns the samples that become final with these frames and updates `state`.
        """
        self.check_codes(codes)
        tails = None if state is None else state.tails
        start = 0 if state is None else state.frames
        x = self.code_embedding(codes + self.code_offset).mean(1)  # [B, F, D]
        x = self.pre_transformer(x, start, tails).transpose(1, 2)  # [B, D, F]
        for stage in self.upsample:
            for block in stage:
                x = block(x, tails)
        for block in self.decoder:
            x = block(x, tails)  # ends as [B, 1, S]
        if state is not None:
            state.frames += codes.shape[2]
        return x.clamp(-1, 1).float()
