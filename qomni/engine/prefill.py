"""Thinker prefill helpers: a prompt's input embeddings, prompts (or pieces of them) packed into
one right-padded batch, what a prefilled prefix shares with a prompt, and a one-off prefill
into a fresh cache (`Omni.prompt_logits`, the benchmark).

Legend: B rows, S padded length, D hidden, Nv visual tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qomni.models.layers import KVCache
from qomni.models.thinker import Deepstack, Thinker
from qomni.multimodal.processor import ProcessedInputs


@dataclass(eq=False)
class Prompt:
    """One prompt's thinker inputs, embedded (encoders run), ready to prefill in pieces."""

    ids: torch.Tensor  # [S]
    embeds: torch.Tensor  # [S, D] input embeddings, media features in place
    positions: torch.Tensor  # [3, S] float32
    visual: torch.Tensor | None  # [S] bool: image/video positions (deepstack), if any
    deepstack: list[torch.Tensor] | None  # each [Nv, D], visual tokens in sequence order

    def __len__(self) -> int:
        return self.embeds.shape[0]


def embed_prompt(thinker: Thinker, inputs: ProcessedInputs, device: torch.device) -> Prompt:
    ids = inputs.input_ids.to(device)
    embeds, visual, deepstack = thinker.embed_inputs(ids, inputs.media.to(device))
    return Prompt(ids, embeds, inputs.positions.to(device, torch.float32), visual, deepstack)


@dataclass
class Packed:
    embeds: torch.Tensor  # [B, S, D]
    positions: torch.Tensor  # [3, B, S]
    n_new: torch.Tensor  # [B] valid tokens of each row
    deepstack: Deepstack | None


def pack(prompts: Sequence[Prompt], spans: Sequence[tuple[int, int]]) -> Packed:
    """Tokens [start, end) of each prompt, right-padded into one batch."""
    first = prompts[0].embeds
    device = first.device
    s = max(end - start for start, end in spans)
    b = len(prompts)
    embeds = first.new_zeros(b, s, first.shape[-1])
    positions = torch.zeros(3, b, s, dtype=torch.float32, device=device)
    visual = torch.zeros(b, s, dtype=torch.bool, device=device)
    levels: list[list[torch.Tensor]] = []
    for row, (p, (start, end)) in enumerate(zip(prompts, spans)):
        n = end - start
        embeds[row, :n] = p.embeds[start:end]
        positions[:, row, :n] = p.positions[:, start:end]
        if p.visual is not None and bool(p.visual[start:end].any()):
            visual[row, :n] = p.visual[start:end]
            seen, count = int(p.visual[:start].sum()), int(p.visual[start:end].sum())
            for level, feats in enumerate(p.deepstack):
                if level == len(levels):
                    levels.append([])
                levels[level].append(feats[seen: seen + count])
    n_new = torch.tensor([end - start for start, end in spans], dtype=torch.long, device=device)
    deepstack = Deepstack(visual, [torch.cat(f) for f in levels]) if levels else None
    return Packed(embeds, positions, n_new, deepstack)


def shared_tokens(prompt: Prompt, inputs: ProcessedInputs, prefix_inputs: ProcessedInputs,
                  prefix_embeds: torch.Tensor) -> int:
    """How many first tokens of a prompt a prefilled prefix already holds: those it shares with
    the prompt's start (same ids, positions and input embeddings, media included), leaving at
    least one token to prefill. The cache entries of a token depend on the tokens before it
    only, so these are exactly what prefilling the prompt would write."""
    n = min(len(prefix_inputs), len(inputs) - 1)
    if n <= 0:
        return 0
    same = ((inputs.input_ids[:n] == prefix_inputs.input_ids[:n])
            & (inputs.positions[:, :n] == prefix_inputs.positions[:, :n]).all(0))
    same = same.to(prompt.embeds.device) & (prompt.embeds[:n] == prefix_embeds[:n]).all(-1)
    return int(same.long().cumprod(0).sum())


@dataclass
class Prefill:
    embeds: torch.Tensor  # [B, S, D] input embeddings (media features in place)
    hidden: torch.Tensor  # [B, S, D] final-normed
    cache: KVCache
    captured: torch.Tensor | None  # [B, S, D] hidden after `capture` layers, if asked


def prefill(thinker: Thinker, inputs: Sequence[ProcessedInputs], extra_slots: int = 0,
            capture: int | None = None) -> Prefill:
    """Run the prompts through the thinker as one right-padded batch into a new cache, which
    keeps room for `extra_slots` more tokens per row."""
    device = thinker.lm_head.weight.device
    prompts = [embed_prompt(thinker, x, device) for x in inputs]
    batch = pack(prompts, [(0, len(p)) for p in prompts])
    cache = thinker.model.new_cache(len(prompts), max(len(p) for p in prompts) + extra_slots)
    hidden, captured = thinker(batch.embeds, batch.positions, cache, batch.n_new,
                               batch.deepstack, capture)
    return Prefill(batch.embeds, hidden, cache, captured)
