"""Sampling filters equal to transformers' logits processors; seeded reproducibility."""

import pytest
import torch

from qomni.sampling import (
    Sampler,
    SamplingParams,
    apply_frequency_presence,
    apply_repetition_penalty,
    filter_logits,
    first_max,
    sample_rows,
)


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


def test_first_max_takes_the_first_of_ties_as_argmax():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(8, 151936).to(dtype)
        logits[3, [7, 70000, 150000]] = 100.0  # a tie: the first index wins
        logits[5, -1] = 100.0
        assert torch.equal(first_max(logits), logits.float().argmax(-1))
        assert first_max(logits)[3] == 7 and first_max(logits)[5] == 151935
        greedy = [Sampler([SamplingParams(temperature=0)])] * 8
        assert torch.equal(sample_rows(logits, greedy, [None] * 8), logits.float().argmax(-1))


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


def test_frequency_and_presence_penalties_as_openai_defines_them():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    counts = torch.zeros(3, 50)
    counts[0, [3, 3, 7]] = torch.tensor([2.0, 2.0, 1.0])  # index_put keeps the last: 3 -> 2
    counts[1, 5] = 4
    freq, pres = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([1.5, 0.0, 2.0])
    got = apply_frequency_presence(logits, counts, freq, pres)
    want = logits.clone()
    for b in range(3):
        for t in range(50):
            c = float(counts[b, t])
            want[b, t] -= c * float(freq[b]) + (1.0 if c > 0 else 0.0) * float(pres[b])
    assert torch.allclose(got, want, atol=1e-6)
    # Greedy decoding honours them: the penalised favourite loses to the runner-up.
    top2 = logits[0].topk(2)
    gap = float(top2.values[0] - top2.values[1])
    row = torch.zeros(1, 50)
    row[0, top2.indices[0]] = 1
    params = SamplingParams(temperature=0, presence_penalty=gap + 0.1)
    assert int(Sampler([params])(logits[:1], counts=row)) == int(top2.indices[1])
    assert int(Sampler([params])(logits[:1])) == int(top2.indices[0])  # no counts: no change


@pytest.mark.parametrize("bad", [{"frequency_penalty": float("nan")},
                                 {"presence_penalty": float("inf")},
                                 {"frequency_penalty": True}, {"presence_penalty": "1"}])
def test_bad_penalties_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_penalties_through_the_engine_equal_a_step_by_step_decode(omni_tiny):
    """The engine's greedy decode with frequency and presence penalties is the argmax of the
    penalised logits of the whole sequence so far, recomputed from scratch at every step."""
    import dataclasses

    from qomni import EngineConfig

    omni = omni_tiny("a", engine=EngineConfig(max_num_seqs=2))
    conv = [{"role": "user", "content": "Say the same word again and again."}]
    # Negative: repeats are rewarded, so a random model's answer changes for sure.
    params = SamplingParams(temperature=0, frequency_penalty=-0.7, presence_penalty=-2.0)
    out = omni.generate(conv, max_new_tokens=12, sampling=params, return_audio=False)
    inputs = omni.process(conv)
    ids, counts = inputs.input_ids, torch.zeros(omni.config.thinker.text.vocab_size)
    for _ in range(12):
        n = len(ids)
        step = dataclasses.replace(inputs, input_ids=ids,
                                   positions=torch.arange(n, dtype=torch.float32).expand(3, n))
        logits = omni.prompt_logits(step)[-1:]
        tok = int(apply_frequency_presence(logits, counts[None], torch.tensor([-0.7]),
                                           torch.tensor([-2.0])).argmax())
        counts[tok] += 1
        ids = torch.cat([ids, torch.tensor([tok])])
    assert out.token_ids == ids[len(inputs.input_ids):].tolist()
    plain = omni.generate(conv, max_new_tokens=12, return_audio=False)
    assert plain.token_ids != out.token_ids  # the penalties changed what was said
