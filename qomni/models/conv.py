"""Causal convolution blocks of the code2wav vocoder, each able to run on a stream of chunks.

B batch, C channels, L samples at the block's own rate (frames × upsampling so far).

Every block is `forward(x [B, C, L], tails)`. With `tails=None` it decodes a whole sequence
exactly as the reference does. With a dict it runs on one chunk of a stream: it reads the left
context it kept from the previous chunk under its own key (`tails[self]`), and stores the context
the next chunk will need. Each block keeps exactly its receptive field to the left, a few samples,
so a stream carries a bounded state and its output equals one whole decode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tails = dict[nn.Module, Any]


class CausalConvNet(nn.Module):
    """Conv1d (stride 1) that sees only the present and the past: left pad (k-1)·dilation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation,
                              groups=groups)
        self.context = (kernel_size - 1) * dilation

    def forward(self, x: Tensor, tails: Tails | None = None) -> Tensor:
        if tails is None:
            x = F.pad(x, (self.context, 0))
        elif self.context:
            # The stream starts from the same zeros the whole-sequence pad would put there.
            past = tails.get(self)
            if past is None:
                past = x.new_zeros(*x.shape[:-1], self.context)
            x = torch.cat([past, x], dim=-1)
            # clone: a view would pin the whole chunk's activations until the next chunk.
            tails[self] = x[..., x.shape[-1] - self.context:].clone()
        return self.conv(x)


class CausalTransConvNet(nn.Module):
    """ConvTranspose1d(k, stride s) trimmed by k-s samples at both ends.

    With k = c·s, output block i (samples i·s .. i·s+s-1) mixes inputs i .. i+c-1, so a sequence of
    L inputs yields (L+1-c)·s samples: the trailing inputs are waiting for their successors. A
    stream keeps the last c-1 inputs and puts them in front of the next chunk, which then yields
    exactly the blocks that were missing.

    It runs as one GEMM and an overlap-add of c shifted terms (the weight is used as stored),
    not through ConvTranspose1d: on CPU that falls back to a slow path that costs ~57 ms per
    call at code2wav's widths whatever the length, which dominated small streaming chunks.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        if kernel_size % stride:
            raise ValueError(f"kernel_size {kernel_size} must be a multiple of stride {stride}")
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.context = kernel_size // stride - 1

    def forward(self, x: Tensor, tails: Tails | None = None) -> Tensor:
        if tails is not None and self.context:
            past = tails.get(self)
            if past is not None:
                x = torch.cat([past, x], dim=-1)
            tails[self] = x[..., max(0, x.shape[-1] - self.context):].clone()
        b, c_in, n_in = x.shape
        w = self.conv.weight  # [C_in, C_out, k]
        c_out, k = w.shape[1], w.shape[2]
        c, s = k // self.stride, self.stride
        n = n_in - c + 1  # output blocks that all their c inputs reach
        if n <= 0:
            return x.new_zeros(b, c_out, 0)
        # z[b, l, o, m, j] = Σ_i x[b, i, l] · w[i, o, m·s + j]; block q sums z[q + c-1-m, m].
        z = (x.transpose(1, 2).reshape(b * n_in, c_in) @ w.reshape(c_in, c_out * k))
        z = z.view(b, n_in, c_out, c, s)
        y = z[:, c - 1: c - 1 + n, :, 0]
        for m in range(1, c):
            y = y + z[:, c - 1 - m: c - 1 - m + n, :, m]
        y = y + self.conv.bias[:, None]
        return y.permute(0, 2, 1, 3).reshape(b, c_out, n * s)


class SnakeBeta(nn.Module):
    """x + sin²(x·e^α) / e^β per channel; α and β are stored in log space."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, tails: Tails | None = None) -> Tensor:
        alpha = self.alpha.exp()[None, :, None]
        beta = self.beta.exp()[None, :, None]
        # The reference's 1e-9 guard, in its place, so that low precision rounds the same way.
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv k7 → LayerNorm → Linear ×4 → GELU → Linear → ·gamma, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConvNet(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor, tails: Tails | None = None) -> Tensor:
        h = self.dwconv(x, tails).transpose(1, 2)  # [B, L, C]
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv_k7_dilated(snake(x))))."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConvNet(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConvNet(dim, dim, 1)

    def forward(self, x: Tensor, tails: Tails | None = None) -> Tensor:
        h = self.conv1(self.act1(x), tails)
        return x + self.conv2(self.act2(h), tails)


class DecoderBlock(nn.Module):
    """SnakeBeta, ×`rate` transposed conv halving the channels, residual units dilated 1, 3, 9."""

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        self.block = nn.ModuleList([
            SnakeBeta(in_dim),
            CausalTransConvNet(in_dim, out_dim, 2 * rate, rate),
            *(ResidualUnit(out_dim, d) for d in (1, 3, 9)),
        ])

    def forward(self, x: Tensor, tails: Tails | None = None) -> Tensor:
        for layer in self.block:
            x = layer(x, tails)
        return x
