"""Thinker prefill of a right-padded batch of prompts (used by the engine and prompt_logits).

Legend: B rows, S padded prompt length, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qomni.models.layers import KVCache
from qomni.models.thinker import Deepstack, Thinker
from qomni.multimodal.processor import ProcessedInputs


@dataclass
class Prefill:
    embeds: torch.Tensor  # [B, S, D] input embeddings (media features in place)
    hidden: torch.Tensor  # [B, S, D] final-normed
    cache: KVCache
    ids: torch.Tensor  # [B, S] right-padded prompt ids
    lengths: torch.Tensor  # [B]
    captured: torch.Tensor | None  # [B, S, D] hidden after `capture` layers, if asked


def embed_batch(thinker: Thinker, inputs: Sequence[ProcessedInputs], device: torch.device):
    """Right-padded embeddings [B, S, D], positions [3, B, S], ids [B, S], lengths [B] and the
    batch's deepstack features (None without images or videos)."""
    b = len(inputs)
    lengths = torch.tensor([len(x) for x in inputs], dtype=torch.long, device=device)
    s = int(lengths.max())
    ids = torch.zeros(b, s, dtype=torch.long, device=device)
    pos = torch.zeros(3, b, s, dtype=torch.float32, device=device)
    embeds = torch.zeros(b, s, thinker.cfg.text.hidden_size, device=device,
                         dtype=thinker.lm_head.weight.dtype)
    vmask = torch.zeros(b, s, dtype=torch.bool, device=device)
    levels: list[list[torch.Tensor]] = []
    for row, x in enumerate(inputs):
        n = len(x)
        ids[row, :n] = x.input_ids.to(device)
        pos[:, row, :n] = x.positions.to(device)
        h, mask, deepstack = thinker.embed_inputs(ids[row, :n], x.media.to(device))
        embeds[row, :n] = h
        if mask is not None:
            vmask[row, :n] = mask
            for level, feats in enumerate(deepstack):
                if level == len(levels):
                    levels.append([])
                levels[level].append(feats)
    ds = Deepstack(vmask, [torch.cat(f) for f in levels]) if levels else None
    return embeds, pos, ids, lengths, ds


def prefill(thinker: Thinker, inputs: Sequence[ProcessedInputs], extra_slots: int = 0,
            capture: int | None = None) -> Prefill:
    """Run the prompts through the thinker; the cache keeps room for `extra_slots` more tokens
    per row."""
    device = thinker.lm_head.weight.device
    embeds, pos, ids, lengths, deepstack = embed_batch(thinker, inputs, device)
    cache = thinker.model.new_cache(len(inputs), int(lengths.max()) + extra_slots)
    hidden, captured = thinker(embeds, pos, cache, lengths, deepstack, capture)
    return Prefill(embeds, hidden, cache, ids, lengths, captured)
