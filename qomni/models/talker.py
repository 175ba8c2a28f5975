"""The talker: MoE decoder that turns thinker states into codebook-0 codes, one per codec frame.

Legend: B batch, S tokens in this step, D talker hidden, Dt thinker hidden, I projection width,
V codec vocab (codebook-0 codes plus the codec control ids), G codebooks per frame.

Per layer `h += attn(norm(h))`, `h += moe(norm(h)) + sigmoid(gate(norm(h))) * shared(norm(h))`,
thinker-style interleaved M-RoPE on positions [3, B, S], final RMSNorm, untied `codec_head`.
Inputs are embeddings built by the caller (text_projection / hidden_projection of thinker
states plus codec embeddings); the code predictor fills codebooks 1..G-1 of each frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qomni.config import TalkerConfig, TextConfig
from qomni.models.code_predictor import CodePredictor, SampleFn, greedy
from qomni.models.layers import KVCache
from qomni.models.thinker import TextModel


class TalkerModel(TextModel):
    """`talker.model`: codec embeddings + the decoder stack shared with the thinker."""

    def __init__(self, cfg: TextConfig):
        # The reference gives every talker layer the sparse block with a shared expert, whatever
        # mlp_only_layers says; TextModel would build a dense MLP there, so refuse such configs.
        dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
        if dense or not cfg.shared_expert_intermediate_size:
            raise ValueError("talker config: every layer must be MoE with a shared expert "
                             f"(dense layers {dense}, shared_expert_intermediate_size "
                             f"{cfg.shared_expert_intermediate_size})")
        super().__init__(cfg, cfg.vocab_size)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class ResizeMLP(nn.Module):
    """Thinker width -> talker width: Linear(Dt -> I, bias) -> SiLU -> Linear(I -> D, bias)."""

    def __init__(self, in_dim: int, intermediate: int, out_dim: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_dim, intermediate, bias=True)
        self.linear_fc2 = nn.Linear(intermediate, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class Talker(nn.Module):
    """`talker`: trunk, codec head, the two input projections and the code predictor."""

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        text = cfg.text
        if cfg.code_predictor.num_code_groups != cfg.num_code_groups:
            raise ValueError(f"talker has {cfg.num_code_groups} code groups, its code predictor "
                             f"{cfg.code_predictor.num_code_groups}")
        self.model = TalkerModel(text)
        self.codec_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        # The reference sizes both projections' inner width by the talker's `intermediate_size`
        # (the field is otherwise unused: every talker layer is MoE).
        # text_projection takes thinker token embeddings, hidden_projection thinker hidden states
        # at layer `accept_hidden_layer` (multimodal positions).
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size,
                                         text.hidden_size)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size,
                                           text.hidden_size)
        self.code_predictor = CodePredictor(cfg.code_predictor)
        # The reference samples codebook 0 from the codec head with every control id but EOS
        # suppressed: only codebook-0 codes and EOS can be chosen.
        suppress = torch.ones(text.vocab_size, dtype=torch.bool)
        suppress[: cfg.code_predictor.vocab_size] = False
        suppress[cfg.codec_eos_token_id] = False
        self.register_buffer("code0_suppress", suppress, persistent=False)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> KVCache:
        return self.model.new_cache(batch, max_len, dtype, device)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codec ids (codebook-0 codes or control ids) -> [..., D]."""
        return self.model.codec_embedding(codes)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                n_new: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, S, D]; positions [3, B, S] (t, h, w); row b has n_new[b] valid tokens
        (right padding). Returns the final-normed hidden [B, S, D]: the code predictor's first
        input, and `logits`' input."""
        return self.model(embeds, positions, cache, n_new)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> codebook-0 logits [..., V]."""
        return self.codec_head(hidden)

    def code0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> float32 logits [..., V] over what codebook 0 may be: its codes and EOS."""
        return self.logits(hidden).float().masked_fill(self.code0_suppress, float("-inf"))

    def predict_residuals(self, hidden: torch.Tensor, code0: torch.Tensor,
                          sample_fn: SampleFn = greedy) -> tuple[torch.Tensor, torch.Tensor]:
        """Finish B frames whose code0 was just chosen: hidden [B, D] is the talker hidden that
        produced code0 [B]. Returns the frames' codes [B, G] and the codec part of the next
        talker input [B, D] (= embed(code0) + Σ residual embeddings, the reference's order)."""
        e0 = self.embed(code0)
        rest = self.code_predictor.predict(hidden, e0, sample_fn)
        codes = torch.cat((code0[:, None], rest), dim=1)
        return codes, self.code_predictor.residual_embedding(rest, e0)
