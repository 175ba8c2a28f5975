"""The code predictor (the reference's MTP module): codebooks 1..G-1 of one codec frame.

Legend: B frames predicted together, D hidden, G codebooks per frame (16), V codes per codebook
(2048), L layers, Hkv key/value heads, Dh head dim, P = G positions per frame.

A small dense Qwen3 decoder with plain 1-D RoPE. Each frame is its own sequence: prefill
[talker hidden, talker.codec_embedding(code0)] at positions 0, 1 -> lm_head[0] -> code1, then
for g = 2..G-1 feed codec_embedding[g-2](code_{g-1}) at position g -> lm_head[g-1] -> code_g.
Every frame walks the same G positions, so all rows advance in lockstep and everything a step
needs (KV cache, rotary tables, slots, causal masks) is built once per batch size and reused;
a step only slices views of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qomni.config import CodePredictorConfig
from qomni.models.layers import MLP, DecoderLayer, KVCache, RMSNorm
from qomni.models.rope import RoPE

SampleFn = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> ids [B]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


@dataclass
class FrameState:
    """Per-batch-size scratch for one frame; positions 0..P-1 are identical for every frame."""

    cache: KVCache  # slots 0..P-1; each frame overwrites a slot before any query reads it
    cos: torch.Tensor  # [1, P, Dh]
    sin: torch.Tensor
    slots: torch.Tensor  # [B, P] = 0..P-1 in every row
    mask: torch.Tensor  # [1, 1, P, P] causal


class CodePredictorModel(nn.Module):
    """`talker.code_predictor.model`: decoder stack, final norm, G-1 codec embeddings."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, cfg.rms_norm_eps, MLP(cfg.hidden_size,
                                                             cfg.intermediate_size), i)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.hidden_size) for _ in range(cfg.num_code_groups - 1))
        self.rotary = RoPE(cfg.head_dim, cfg.rope_theta)

    def new_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> FrameState:
        cfg, p = self.cfg, self.cfg.num_code_groups
        cache = KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, p, cfg.head_dim,
                        dtype, device)
        positions = torch.arange(p, device=device)
        cos, sin = self.rotary(positions[None], dtype)
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        return FrameState(cache, cos, sin, positions.expand(batch, p), causal[None, None])

    def forward(self, h: torch.Tensor, state: FrameState, start: int) -> torch.Tensor:
        """h [B, S, D] at positions start..start+S-1 of the frame -> final-normed [B, S, D]."""
        end = start + h.shape[1]
        cos, sin = state.cos[:, start:end], state.sin[:, start:end]
        slots = state.slots[:, start:end]
        mask = state.mask[..., start:end, :end]  # its width is how many cached keys attention reads
        for layer in self.layers:
            h = layer(h, cos, sin, state.cache, slots, mask)
        return self.norm(h)


class CodePredictor(nn.Module):
    """`talker.code_predictor`: predicts codebooks 1..G-1 given the talker's step."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.model = CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            for _ in range(cfg.num_code_groups - 1))
        self._states: dict[tuple, FrameState] = {}  # scratch, not weights: never in state_dict

    def frame_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> FrameState:
        key = (batch, dtype, torch.device(device))
        if key not in self._states:
            self._states[key] = self.model.new_state(batch, dtype, device)
        return self._states[key]

    def predict(self, talker_hidden: torch.Tensor, code0_embed: torch.Tensor,
                sample_fn: SampleFn = greedy) -> torch.Tensor:
        """Codes 1..G-1 of B frames.

        talker_hidden [B, D]: post-final-norm talker hidden of the step that produced code0;
        code0_embed [B, D]: talker.codec_embedding(code0). Returns int64 [B, G-1]."""
        b, groups = talker_hidden.shape[0], self.cfg.num_code_groups
        state = self.frame_state(b, talker_hidden.dtype, talker_hidden.device)
        codes = torch.empty(b, groups - 1, dtype=torch.long, device=talker_hidden.device)
        x = torch.stack((talker_hidden, code0_embed), dim=1)  # [B, 2, D]
        start = 0
        for g in range(1, groups):
            h = self.model(x, state, start)
            code = sample_fn(self.lm_head[g - 1](h[:, -1]))
            codes[:, g - 1] = code
            start += x.shape[1]
            if g < groups - 1:
                x = self.model.codec_embedding[g - 1](code)[:, None]
        return codes

    def residual_embedding(self, codes: torch.Tensor,
                           code0_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_{g=1..G-1} codec_embedding[g-1](codes[:, g-1]) -> [B, D]: the codec part of the
        talker's next input. With `code0_embed`, it is included first and the sum runs in the
        reference's order (one stack, one sum), so the talker input matches it bit for bit."""
        parts = [emb(codes[:, g]) for g, emb in enumerate(self.model.codec_embedding)]
        if code0_embed is not None:
            parts.insert(0, code0_embed)
        return torch.stack(parts, dim=1).sum(1)
