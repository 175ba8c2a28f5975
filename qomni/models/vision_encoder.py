"""Vision encoder (`thinker.visual`): ViT over 3-D patches, 2x2 patch merger, deepstack mergers.

Dimensions:
  N  patches of all media in the call (every frame of every image/video)
  K  values per patch = in_channels * temporal_patch_size * patch_size**2
  G  media in the call; each has a grid (t, h, w) in patches
  D  hidden size;  Hn heads;  hd head dim = D / Hn
  m  spatial merge size; U = m*m patches per merged token
  M  merged tokens = N / U;  O out_hidden_size (the thinker's hidden size)

Patches arrive in merge-block order (frame, block row, block col, row in block, col in block), as
`multimodal/vision.py` emits them, so every U consecutive patches form one merged token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qomni.config import VisionConfig

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel covers the whole patch (kernel == stride), so the Conv3d is one matmul over
        # the flattened patch; CPU conv3d on [N, C, T, P, P] is far slower for the same numbers.
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)  # [N, K] -> [N, D]


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: list[tuple[int, int]]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each [N, Hn, hd]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out, start = [], 0
        # Attention stays inside one frame. All frames of a medium share a size, so they batch.
        for t, hw in frames:
            sl = slice(start, start + t * hw)
            qs, ks, vs = (z[sl].view(t, hw, self.num_heads, -1).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)  # [t, Hn, hw, hd]
            out.append(o.transpose(1, 2).reshape(t * hw, -1))
            start += t * hw
        return self.proj(torch.cat(out))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, in fp32 whatever the activation dtype (as the reference does)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported")
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: list[tuple[int, int]]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """U neighbouring patches -> one token of width O.

    The final merger normalises each patch (width D) before concatenating; the deepstack mergers
    (`postshuffle_norm`) normalise the concatenated U*D vector instead.
    """

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.ln_q = nn.LayerNorm(self.width if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.out_hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.ln_q(x.view(-1, self.width))
        else:
            x = self.ln_q(x).view(-1, self.width)
        return self.mlp(x)  # [N, D] -> [M, O]


class VisionEncoder(nn.Module):
    """`thinker.visual`: patches of images and videos -> merged tokens plus deepstack features."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.side = int(cfg.num_position_embeddings**0.5)
        if self.side**2 != cfg.num_position_embeddings:
            raise ValueError(
                f"vision num_position_embeddings ({cfg.num_position_embeddings}) must be a square"
            )
        head_dim = cfg.hidden_size // cfg.num_heads
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        # Axial 2-D RoPE: half of each head rotates with the row, half with the column.
        exponents = torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta**exponents, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.merger_list = nn.ModuleList(
            PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes
        )

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [N, K], grid_thw [G, 3] -> (embeds [M, O], deepstack: list of [M, O]).

        deepstack holds one tensor per entry of `deepstack_visual_indexes`, in block order.
        """
        grids = [tuple(int(v) for v in g) for g in grid_thw.reshape(-1, 3).tolist()]
        m = self.cfg.spatial_merge_size
        total = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != total or any(h % m or w % m for _, h, w in grids):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but grid_thw {grids} needs "
                f"{total}, with h and w multiples of {m}"
            )
        x = self.patch_embed(pixel_values)
        x = x + self._positions(grids).to(x.dtype)
        cos, sin = self._rope(grids, x.device)
        frames = [(t, h * w) for t, h, w in grids]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack

    def _merge_order(self, grid: torch.Tensor) -> torch.Tensor:
        """[h, w, ...] raster grid -> [h*w, ...] in merge-block order."""
        h, w, m = grid.shape[0], grid.shape[1], self.cfg.spatial_merge_size
        blocks = grid.reshape(h // m, m, w // m, m, *grid.shape[2:]).transpose(1, 2)
        return blocks.reshape(h * w, *grid.shape[2:])

    def _positions(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Learned side x side position table, resampled bilinearly (align_corners) to each grid."""
        table = self.pos_embed.weight.view(self.side, self.side, -1).permute(2, 0, 1)[None]
        out = []
        for t, h, w in grids:
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)
            out.append(self._merge_order(grid[0].permute(1, 2, 0)).repeat(t, 1))  # [t*h*w, D]
        return torch.cat(out)

    def _rope(
        self, grids: list[tuple[int, int, int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, hd] (fp32) for each patch's (row, col)."""
        inv_freq = self.inv_freq.to(device)
        angles = []
        for t, h, w in grids:
            rows = torch.arange(h, device=device, dtype=torch.float32)[:, None].expand(h, w)
            cols = torch.arange(w, device=device, dtype=torch.float32)[None, :].expand(h, w)
            rc = self._merge_order(torch.stack((rows, cols), dim=-1))  # [h*w, 2]
            freqs = (rc[:, :, None] * inv_freq).flatten(1)  # [row freqs | col freqs]
            angles.append(freqs.repeat(t, 1))
        a = torch.cat(angles)
        a = torch.cat((a, a), dim=-1)
        return a.cos(), a.sin()
