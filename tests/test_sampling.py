"""Sampling filters equal to transformers' logits processors; seeded reproducibility."""

import pytest
import torch

from qomni.sampling import Sampler, SamplingParams, apply_repetition_penalty, filter_logits


def test_filters_equal_transformers_warpers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    for top_k, top_p, temp in [(50, 1.0, 0.9), (0, 0.8, 1.0), (5, 0.5, 0.7), (1, 0.95, 1.3)]:
        logits = torch.randn(3, 300) * 3
        ids = torch.randint(0, 300, (3, 20))
        ref = RepetitionPenaltyLogitsProcessor(1.05)(ids, logits.clone())
        ref = TemperatureLogitsWarper(temp)(ids, ref)
        if top_k:
            ref = TopKLogitsWarper(top_k)(ids, ref)
        ref = TopPLogitsWarper(top_p)(ids, ref)
        seen = torch.zeros(3, 300, dtype=torch.bool)
        seen.scatter_(1, ids, True)
        ours = apply_repetition_penalty(logits, seen, torch.full((3,), 1.05)) / temp
        ours = filter_logits(ours, torch.full((3,), top_k), torch.full((3,), top_p))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        kept = ~torch.isinf(ref)
        assert torch.allclose(ours[kept], ref[kept], atol=1e-6)


def test_greedy_is_argmax_and_default():
    logits = torch.randn(4, 100)
    assert torch.equal(Sampler([SamplingParams(temperature=0)] * 4)(logits), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_batch_independent():
    torch.manual_seed(1)
    logits = torch.randn(3, 500)
    p = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in (7, 8, 9)]
    a = Sampler(p)(logits)
    b = Sampler(p)(logits)
    alone = Sampler([p[1]])(logits[1:2])
    assert torch.equal(a, b)
    assert a[1] == alone[0]


def test_sampling_respects_top_k():
    logits = torch.randn(1, 1000)
    allowed = set(logits[0].topk(3).indices.tolist())
    s = Sampler([SamplingParams(temperature=2.0, top_k=3, seed=0)])
    assert {int(s(logits)[0]) for _ in range(50)} <= allowed


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    s = Sampler([SamplingParams(temperature=1.0, seed=3)])
    counts = torch.bincount(torch.stack([s(logits) for _ in range(3000)]).flatten(), minlength=3)
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5},
                                 {"top_k": -2}, {"repetition_penalty": 0}])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
