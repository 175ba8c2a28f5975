"""Sequential batched text generation with the thinker (the engine's scheduler builds on this).

Legend: B rows, S padded prompt length, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qomni.models.layers import KVCache
from qomni.models.thinker import Deepstack, Thinker
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import Sampler


@dataclass
class Step:
    """Tokens chosen in one decode step; `done[b]` is set on the step a row finishes."""

    tokens: torch.Tensor  # [B]
    active: torch.Tensor  # [B] rows that produced a token this step
    done: torch.Tensor  # [B]
    reasons: list[str | None]


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


@torch.inference_mode()
def generate_tokens(thinker: Thinker, inputs: Sequence[ProcessedInputs], sampler: Sampler,
                    max_new_tokens: int, stop_ids: Sequence[int],
                    capture: int | None = None) -> Iterator[Prefill | Step]:
    """Yield the Prefill (with the hidden state after `capture` layers if asked), then one Step
    per decode step until every row has stopped."""
    device = thinker.lm_head.weight.device
    b = len(inputs)
    pre = prefill(thinker, inputs, max_new_tokens, capture)
    yield pre
    cache, ids, lengths = pre.cache, pre.ids, pre.lengths
    logits = thinker.logits(pre.hidden[torch.arange(b, device=device), lengths - 1])
    delta = torch.tensor([x.rope_delta for x in inputs], dtype=torch.float32, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    seen = None
    if sampler.uses_penalty:  # the reference penalises prompt tokens too
        seen = torch.zeros(b, logits.shape[-1], dtype=torch.bool, device=device)
        valid = torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]
        rows = torch.arange(b, device=device)[:, None].expand_as(ids)
        seen[rows[valid], ids[valid]] = True
    active = torch.ones(b, dtype=torch.bool, device=device)
    one = torch.ones(b, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        tokens = sampler(logits, seen)
        finished = torch.isin(tokens, stop)
        last_step = step + 1 == max_new_tokens
        done = active & (finished | last_step)
        reasons = [None if not d else ("stop" if f else "length")
                   for d, f in zip(done.tolist(), finished.tolist())]
        yield Step(tokens, active.clone(), done, reasons)
        active &= ~done
        if not bool(active.any()):
            return
        if seen is not None:
            seen[torch.arange(b, device=device), tokens] = True
        n_new = torch.where(active, one, torch.zeros_like(one))
        p = (cache.lengths + delta).view(1, b, 1).expand(3, b, 1)
        hidden, _ = thinker(thinker.embed(tokens[:, None]), p, cache, n_new)
        logits = thinker.logits(hidden[:, 0])
