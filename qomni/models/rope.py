"""Rotary position embeddings: interleaved M-RoPE (thinker, talker) and 1-D RoPE.

Legend: B batch, S tokens, Dh head dim, F = Dh/2 frequencies.

Both follow the reference numerics: inverse frequencies and angles in fp32, cos/sin cast to the
activation dtype before the rotation, rotate-half layout (the two halves of a head hold the same
frequencies).
"""

from __future__ import annotations

import torch
from torch import nn


def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


class _Rotary(nn.Module):
    """Holds `inv_freq` [F] in fp32 through any `.to(dtype)`: the reference computes it in fp32
    at init and a checkpoint loaded in bf16 keeps it so (it is a buffer, not a weight)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", inv_freq(head_dim, theta), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Recomputed, not cast back: a bf16 round trip would lose the low bits.
        self.inv_freq = inv_freq(self.head_dim, self.theta).to(self.inv_freq.device)
        return self


class MRoPE(_Rotary):
    """Interleaved multimodal RoPE: frequency j takes its angle from the H axis when j % 3 == 1,
    from W when j % 3 == 2 (each within its `mrope_section` share), and from T otherwise."""

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, ...]):
        super().__init__(head_dim, theta)
        f = head_dim // 2
        axis = torch.zeros(f, dtype=torch.long)  # which of (t, h, w) drives frequency j
        axis[1 : 3 * mrope_section[1] : 3] = 1
        axis[2 : 3 * mrope_section[2] : 3] = 2
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """positions [3, B, S] (t, h, w) -> cos, sin [B, S, Dh] in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq  # [3, B, S, F]
        freqs = freqs.gather(0, self.axis.expand(1, *freqs.shape[1:]))[0]  # [B, S, F]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class RoPE(_Rotary):
    """Plain 1-D RoPE (code predictor, code2wav)."""

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """positions [B, S] -> cos, sin [B, S, Dh] in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def decode_positions(lengths: torch.Tensor, rope_delta: torch.Tensor | float) -> torch.Tensor:
    """M-RoPE positions [3, B, 1] of each row's next token: after the prompt every axis moves
    together, at the row's cached length plus its prompt's `rope_delta`."""
    return (lengths + rope_delta).view(1, -1, 1).expand(3, -1, 1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, Dh]; cos, sin [B, S, Dh] (or [1, S, Dh], the same for every row)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
