"""Sequential batched text generation with the thinker (the engine's scheduler builds on this).

Legend: B rows, S padded prompt length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qomni.models.thinker import Thinker
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import Sampler


@dataclass
class Step:
    """Tokens chosen in one decode step; `done[b]` is set on the step a row finishes."""

    tokens: torch.Tensor  # [B]
    active: torch.Tensor  # [B] rows that produced a token this step
    done: torch.Tensor  # [B]
    reasons: list[str | None]


def pad_batch(inputs: Sequence[ProcessedInputs], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-pad prompts: ids [B, S], positions [3, B, S], lengths [B]."""
    lengths = torch.tensor([len(x) for x in inputs], dtype=torch.long)
    s = int(lengths.max())
    ids = torch.zeros(len(inputs), s, dtype=torch.long)
    pos = torch.zeros(3, len(inputs), s, dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, : len(x)] = x.input_ids
        pos[:, b, : len(x)] = x.positions
    return ids.to(device), pos.to(device), lengths.to(device)


def prefill(thinker: Thinker, inputs: Sequence[ProcessedInputs], extra_slots: int = 0):
    """Run the prompts through the thinker. Returns (final hidden [B, S, D], cache, ids,
    lengths); the cache has room for `extra_slots` more tokens per row."""
    device = thinker.lm_head.weight.device
    ids, pos, lengths = pad_batch(inputs, device)
    cache = thinker.model.new_cache(len(inputs), int(lengths.max()) + extra_slots)
    hidden, _ = thinker(thinker.embed(ids), pos, cache, lengths)
    return hidden, cache, ids, lengths


@torch.inference_mode()
def generate_tokens(thinker: Thinker, inputs: Sequence[ProcessedInputs], sampler: Sampler,
                    max_new_tokens: int, stop_ids: Sequence[int]) -> Iterator[Step]:
    """Yield one Step per decode step until every row has stopped."""
    device = thinker.lm_head.weight.device
    b = len(inputs)
    hidden, cache, ids, lengths = prefill(thinker, inputs, max_new_tokens)
    logits = thinker.logits(hidden[torch.arange(b, device=device), lengths - 1])
    delta = torch.tensor([x.rope_delta for x in inputs], dtype=torch.long, device=device)
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
