"""Sampling inside static steps: counter-based noise (a row's draws depend on its seed and
counter only) and the filters of the eager sampler."""

import torch

from qomni.engine.device_sampling import RowSampling, row_seed, uniform
from qomni.sampling import Sampler, SamplingParams


def test_uniform_noise():
    seed, counter = torch.tensor([0, 1, -5, 2**62]), torch.tensor([0, 0, 3, 9])
    u = uniform(seed, counter, 50_000)
    assert torch.equal(u, uniform(seed, counter, 50_000))  # a function of its inputs
    assert u.min() > 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12 ** -0.5) < 0.01
    assert (u[0] == u[1]).float().mean() < 1e-3  # seeds apart, streams apart
    assert not torch.equal(uniform(seed, counter + 1, 10), uniform(seed, counter, 10))
    # a row's values do not depend on the other rows
    assert torch.equal(uniform(seed[2:3], counter[2:3], 100), u[2:3, :100])


def _rows(params):
    samplers = [Sampler([p]) for p in params]
    rows = RowSampling(len(params), torch.device("cpu"))
    rows.load(samplers)
    return rows, samplers


def test_greedy_rows_and_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g)
    rows, _ = _rows([SamplingParams(temperature=0), SamplingParams(top_k=1, seed=1),
                     SamplingParams(top_k=5, seed=2), SamplingParams(top_p=0.3, seed=3)])
    top5 = logits[2].topk(5).indices.tolist()
    probs = logits[3].softmax(-1)
    ordered = probs.sort(descending=True)
    nucleus = ordered.indices[: int((ordered.values.cumsum(0) - ordered.values < 0.3).sum())]
    for c in range(200):
        ids = rows.sample(logits, torch.full((4,), c)).tolist()
        assert ids[0] == int(logits[0].argmax()) and ids[1] == int(logits[1].argmax())
        assert ids[2] in top5 and ids[3] in nucleus.tolist()


def test_draws_follow_the_distribution():
    """6000 draws of one seeded row (counters 0..5999): each token's frequency is within 4
    standard errors of its probability."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 6000
    rows, _ = _rows([SamplingParams(temperature=0.8, seed=7)] * n)
    ids = rows.sample(logits.expand(n, -1), torch.arange(n))
    freq = torch.bincount(ids, minlength=6).float() / n
    p = (logits[0] / 0.8).softmax(-1)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (freq, p)


def test_a_row_draws_the_same_alone_and_in_a_batch():
    logits = torch.randn(3, 2048, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(top_k=50, top_p=0.8, seed=s) for s in (11, 12, 13)]
    rows, _ = _rows(params)
    alone, _ = _rows(params[1:2])
    for c in range(20):
        counter = torch.full((3,), c)
        both = rows.sample(logits, counter)
        assert int(both[1]) == int(alone.sample(logits[1:2], counter[1:2])[0])
    # an unseeded request gets the seed its generator drew
    unseeded = Sampler([SamplingParams()])
    assert row_seed(unseeded) % (1 << 64) == unseeded.generators[0].initial_seed()
