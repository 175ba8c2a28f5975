"""Sampling inside a captured step: each row's settings in device buffers, and its noise from a
counter-based hash of (seed, counter, token id) instead of a `torch.Generator`, so a CUDA graph
replays it and a row's draws depend on its own seed and position only, never on the batch.

Legend: B rows, V vocabulary.

Same filters and order as `qomni.sampling.Sampler` (temperature, top-k, top-p; Gumbel-style
argmax of p / Exp(1) noise); only the source of the noise differs, so for a given seed the
draws are not the eager sampler's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qomni.engine.graphs import HostInput
from qomni.sampling import Sampler, filter_logits

# splitmix64's constants, as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] float32 in (0, 1): splitmix64 of (seed, counter, index), one value per index.
    Integer products wrap around, which is what the hash wants."""
    x = seed[:, None] * _GOLDEN + counter[:, None] * _MIX2
    x = x + torch.arange(1, n + 1, device=seed.device) * _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 41).float() + 0.5) * 2.0 ** -23  # 23 bits: exact in float32, never 0 or 1


def row_seed(sampler: Sampler) -> int:
    """A row's seed: the request's (or the one its generator drew), as a signed 64-bit int."""
    seed = sampler.generators[0].initial_seed()
    return seed - (1 << 64) if seed >= 1 << 63 else seed


class RowSampling:
    """Per-row sampling settings of a static step, filled from the requests' samplers."""

    def __init__(self, batch: int, device: torch.device):
        f = {"dtype": torch.float32, "device": device}
        self.temperature = HostInput(torch.zeros(batch, **f))
        self.top_k = HostInput(torch.zeros(batch, dtype=torch.long, device=device))
        self.top_p = HostInput(torch.ones(batch, **f))
        self.seed = HostInput(torch.zeros(batch, dtype=torch.long, device=device))
        self.greedy = HostInput(torch.ones(batch, dtype=torch.bool, device=device))

    def load(self, samplers: Sequence[Sampler]) -> None:
        params = [s.params[0] for s in samplers]
        self.temperature.fill([p.temperature for p in params], 0.0)
        self.top_k.fill([p.top_k for p in params], 0)
        self.top_p.fill([p.top_p for p in params], 1.0)
        self.seed.fill([row_seed(s) for s in samplers], 0)
        self.greedy.fill([p.greedy for p in params], True)

    def sample(self, logits: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> ids [B]; `counter` [B]: the draw's position in each row's stream."""
        logits = logits.float()
        greedy_ids = logits.argmax(-1)
        t = self.temperature.buffer
        temp = torch.where(t > 0, t, torch.ones_like(t))
        probs = filter_logits(logits / temp[:, None], self.top_k.buffer,
                              self.top_p.buffer).softmax(-1)
        noise = -torch.log(uniform(self.seed.buffer, counter, logits.shape[-1]))
        sampled = (probs / noise).argmax(-1)
        return torch.where(self.greedy.buffer, greedy_ids, sampled)
