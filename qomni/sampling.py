"""Token sampling: greedy, temperature, top-k, top-p, repetition, frequency and presence
penalties, batched per row.

Legend: B rows, V vocabulary.

Filters run in the reference's order: repetition penalty, temperature, top-k, top-p; the
frequency and presence penalties (OpenAI's, not in the reference) come right after the
repetition penalty, as vLLM applies them. Each row
draws from its own generator (Gumbel-style: argmax of p / Exp(1) noise), so a seeded request
gives the same tokens whether it runs alone or inside a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qomni import cpu_ops


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 mean "off".

    As vLLM defines them: `ignore_eos` never stops at an end-of-sequence token (the thinker
    goes on to max_new_tokens; such tokens are generated and kept, never shown as text);
    `min_tokens` makes those tokens impossible (and stop strings unmatched) until that many
    tokens exist. For the talker both count codec frames and suppress its EOS code (a frame
    can never be EOS), so speech runs to max_audio_frames, or at least min_tokens frames.

    As OpenAI defines them, over the tokens generated so far (not the prompt):
    logits[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty. They apply
    to greedy decoding too. The thinker honours them; the talker does not."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if type(self.ignore_eos) is not bool:
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) \
                or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs the counts of the tokens generated so far."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0


GREEDY = SamplingParams(temperature=0.0)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; seen [B, V] bool (tokens already in the context); penalty [B]."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor,
                             frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; counts [B, V] (how often each token was generated); frequency and
    presence [B]: logits - counts * frequency - (counts > 0) * presence."""
    return logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf. top_k [B] (0 = off), top_p [B]."""
    vocab = logits.shape[-1]
    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    logits = logits.masked_fill(logits < kth, float("-inf"))
    # Nucleus: drop a token when the probability mass strictly above it already reaches top_p,
    # always keeping the most likely token.
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p[:, None]
    drop_sorted[:, 0] = False
    # threshold = smallest kept logit per row
    kept = sorted_logits.masked_fill(drop_sorted, float("inf"))
    threshold = kept.min(-1, keepdim=True).values
    return logits.masked_fill(logits < threshold, float("-inf"))


def first_max(x: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B]: the index of each row's largest value, the first one on a tie (as argmax).
    On CPU qomni's kernel reads fp32 or bf16 rows as they are (8 x 152064 bf16 logits on a
    2-core Xeon: 0.2 ms against 3.2 for torch's conversion to fp32 and `max`); elsewhere, and
    without the kernels, `max`, 2-3x faster than `argmax` on CPU."""
    ops = cpu_ops.ops() if x.device.type == "cpu" else None
    if ops is not None and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16):
        return ops.first_max(x)
    return x.float().max(-1).indices  # torch's bf16 reductions run slower than fp32 on CPU


class Sampler:
    """Per-row sampling settings as tensors, plus one generator per row."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device | str = "cpu"):
        self.params = list(params)
        self.device = torch.device(device)
        f = {"dtype": torch.float32, "device": self.device}
        self.temperature = torch.tensor([p.temperature for p in params], **f)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=self.device)
        self.top_p = torch.tensor([p.top_p for p in params], **f)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], **f)
        self.uses_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], **f)
        self.presence = torch.tensor([p.presence_penalty for p in params], **f)
        self.uses_counts = any(p.counts_tokens for p in params)
        self.all_greedy = all(p.greedy for p in params)
        self.generators = []
        for p in params:
            g = torch.Generator(self.device)
            if p.seed is None:
                g.seed()
            else:
                g.manual_seed(p.seed)
            self.generators.append(g)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] -> token ids [B]. seen [B, V] bool: the tokens in the context (the
        repetition penalty); counts [B, V]: how often each was generated (the frequency and
        presence penalties)."""
        logits = logits.float()
        if self.uses_penalty and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.penalty)
        if self.uses_counts and counts is not None:
            logits = apply_frequency_presence(logits, counts, self.frequency, self.presence)
        greedy_ids = first_max(logits)
        if self.all_greedy:
            return greedy_ids
        temp = torch.where(self.temperature > 0, self.temperature, torch.ones_like(self.temperature))
        probs = filter_logits(logits / temp[:, None], self.top_k, self.top_p).softmax(-1)
        noise = torch.empty_like(probs)
        for row, g in enumerate(self.generators):
            noise[row].exponential_(generator=g)
        sampled = first_max(probs / noise)
        greedy_rows = torch.tensor([p.greedy for p in self.params], device=logits.device)
        return torch.where(greedy_rows, greedy_ids, sampled)


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler],
                seen: Sequence[torch.Tensor | None],
                counts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Each row with its own request's sampler (own settings and generator): [n, V] -> [n].
    seen / counts: each row's context tokens / generated-token counts, or None."""
    if all(s.all_greedy and not s.uses_penalty and not s.uses_counts for s in samplers):
        return first_max(logits)
    counts = counts or [None] * len(samplers)

    def row(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[None]

    return torch.cat([s(logits[i: i + 1], row(seen[i]), row(counts[i]))
                      for i, s in enumerate(samplers)])
