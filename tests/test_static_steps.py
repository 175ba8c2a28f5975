"""The static (CUDA-graph-ready) decode steps give what the eager engine gives: the thinker's
logits and greedy tokens, the talker's codes, the vocoder's samples, at batch sizes padded to
a bucket, with rows in any order and rows at different lengths. On the CPU the static steps run
uncaptured: the same code a CUDA graph records."""

import numpy as np
import pytest
import torch
from reference import audible_vocoder

from qomni import Omni, SamplingParams
from qomni.engine.config import EngineConfig
from qomni.engine.graphs import KEY_BLOCK, bucket_for, key_bucket
from qomni.engine.static_steps import StaticThinker
from qomni.engine.static_vocoder import StaticVocoder
from qomni.models.code2wav import Code2Wav
from qomni.models.code2wav_stream import StreamingCode2Wav
from qomni.models.rope import decode_positions

GREEDY_TALKER = SamplingParams(temperature=0, repetition_penalty=1.05)
CONVS = [[{"role": "user", "content": "Tell me a story about a lighthouse keeper."}],
         [{"role": "user", "content": "Hi"}],
         [{"role": "system", "content": "You are a helpful voice assistant."},
          {"role": "user", "content": "Explain how tides work, in detail, with examples."}],
         [{"role": "user", "content": "Count to ten."}],
         [{"role": "user", "content": "What is the capital of France?"}]]


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 48]
    with pytest.raises(ValueError, match="at least one row"):
        bucket_for(0)
    with pytest.raises(ValueError, match="largest batch bucket"):
        bucket_for(10_000)
    assert key_bucket(1, 4097) == KEY_BLOCK and key_bucket(KEY_BLOCK + 1, 4097) == 2 * KEY_BLOCK
    assert key_bucket(4096, 4097) == 4096 and key_bucket(100, 101) == 101
    with pytest.raises(ValueError, match="capacity of 4096"):
        key_bucket(4097, 4097)


def test_thinker_steps_equal_eager_decode(omni_tiny):
    """Three prompts in rows 3, 0, 2 of a 4-row cache (a bucket of 4 with one padding row),
    then two of them, then one: every step's logits and greedy tokens equal the eager call the
    engine makes, and so do the caches."""
    omni = omni_tiny("a")
    thinker = omni.model.thinker
    prompts = [omni.process(c) for c in CONVS[:3]]
    rows = [3, 0, 2]
    with torch.inference_mode():
        eager = thinker.model.new_cache(4, 128)
        for row, x in zip(rows, prompts):
            embeds, _, _ = thinker.embed_inputs(x.input_ids, None)
            thinker(embeds[None], x.positions[:, None], eager.rows([row]))
        static = thinker.model.new_cache(4, 128)
        static.k.copy_(eager.k), static.v.copy_(eager.v), static.lengths.copy_(eager.lengths)
    decoder = StaticThinker(thinker, static)
    last = {row: int(x.input_ids[-1]) for row, x in zip(rows, prompts)}
    delta = {row: x.rope_delta for row, x in zip(rows, prompts)}
    for steps, active in ((5, rows), (3, rows[1:]), (2, rows[2:])):
        for _ in range(steps):
            with torch.inference_mode():
                view = eager.rows(active)
                pos = decode_positions(view.lengths, torch.tensor([delta[r] for r in active]))
                tokens = torch.tensor([last[r] for r in active])[:, None]
                hidden, _ = thinker(thinker.embed(tokens), pos, view,
                                    torch.ones(len(active), dtype=torch.long))
                want = thinker.logits(hidden[:, 0])
            longest = int(eager.lengths[active].max())
            step = decoder.decode(active, [last[r] for r in active],
                                  [delta[r] for r in active], longest)
            got = step.logits[: len(active)]
            assert (got - want).abs().max() <= 1e-5
            assert step.next_tokens[: len(active)].tolist() == want.argmax(-1).tolist()
            for r, t in zip(active, want.argmax(-1).tolist()):
                last[r] = t
        assert torch.equal(static.lengths, eager.lengths)
        n = int(eager.lengths.max())
        assert (static.k[..., :n, :] - eager.k[..., :n, :]).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def engines(hf_tiny):
    """The same weights with the eager engine and with the static steps (cuda_graphs=True: on
    the CPU they run uncaptured)."""
    path, _ = hf_tiny("a")
    opts = {"max_num_seqs": 6, "max_model_len": 256, "first_chunk_frames": 2,
            "chunk_frames": 5}
    eager = Omni.load(path, dtype="float32", device="cpu", progress=False,
                      engine=EngineConfig(**opts, cuda_graphs=False))
    static = Omni(eager.model, eager.processor, eager.path, eager.generation_config,
                  EngineConfig(**opts, cuda_graphs=True))
    return eager, static


def _spy(obj, name, log):
    method = getattr(obj, name)

    def call(*args, **kwargs):
        out = method(*args, **kwargs)
        log.append(len(args[0]))
        return out

    setattr(obj, name, call)


@pytest.mark.parametrize("n", [3, 5])
def test_static_engine_equals_generate(engines, n):
    """n requests with speech (bucket 4 or 8: padding rows), lengths and frame caps apart, so
    rows leave the batch at different steps: the same tokens and codes, and the same audio."""
    eager, static = engines
    engine = static._loop().engine
    runner, talker = engine.runner, engine.talker.runner
    assert runner.static is not None and talker.talker_static is not None
    calls = {"decode": [], "talk": [], "vocode": []}
    _spy(runner.static, "decode", calls["decode"])
    _spy(talker.talker_static, "talk", calls["talk"])
    _spy(talker.vocoder, "push", calls["vocode"])
    kw = [{"max_new_tokens": 6 + 3 * i, "max_audio_frames": 9 + 4 * i, "speaker": s,
           "talker_sampling": GREEDY_TALKER}
          for i, s in zip(range(n), ["Ethan", "Chelsie", "Aiden", "Ethan", "Aiden"])]
    want = [eager.generate(c, **k) for c, k in zip(CONVS[:n], kw)]
    streams = [static.stream(c, **k) for c, k in zip(CONVS[:n], kw)]
    firsts = [next(s) for s in streams]  # all admitted before any finishes
    outs = [list(s) for s in streams]
    assert max(calls["decode"]) == n and min(calls["decode"]) < n
    assert calls["talk"] and calls["vocode"]
    for first, rest, ref in zip(firsts, outs, want):
        events = [first, *rest]
        ids = [t for e in events if hasattr(e, "token_ids") for t in e.token_ids]
        audio = np.concatenate([e.pcm for e in events if hasattr(e, "pcm")])
        assert ids == ref.token_ids
        assert events[-1].usage.audio_frames == ref.codes.shape[1]
        assert audio.shape == ref.audio.shape
        assert np.abs(audio - ref.audio).max() <= 1e-5 * max(1.0, np.abs(ref.audio).max())
    got = static.generate(CONVS[:n], max_new_tokens=7, max_audio_frames=10,
                          talker_sampling=GREEDY_TALKER)
    ref = eager.generate(CONVS[:n], max_new_tokens=7, max_audio_frames=10,
                         talker_sampling=GREEDY_TALKER)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids and torch.equal(g.codes, r.codes)


def test_sampled_speech_draws_on_the_device(engines):
    """A sampling talker (the checkpoint's defaults): the code predictor samples inside the
    static step, from each request's seed: a seeded request repeats, alone or in a batch. The
    thinker's sampled tokens are drawn from the step's logits as the eager engine draws them."""
    eager, static = engines
    runner = static._loop().engine.talker.runner
    kw = {"max_new_tokens": 6, "max_audio_frames": 8, "seed": 3,
          "sampling": SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.1)}
    alone = [static.generate(c, **kw) for c in CONVS[:3]]
    assert any(key[2] for key in runner.talker_static.graphs.steps)  # the sampled step ran
    again = static.generate(CONVS[:3], **kw)
    for a, b, conv in zip(alone, again, CONVS):
        assert a.token_ids == b.token_ids and torch.equal(a.codes, b.codes)
        assert a.codes.shape[1] == 8 and int(a.codes.max()) < 2048
        assert a.token_ids == eager.generate(conv, **kw).token_ids
    greedy = static.generate(CONVS[0], **kw, talker_sampling=GREEDY_TALKER)
    assert not torch.equal(greedy.codes[1:], alone[0].codes[1:])  # it did sample
    text = [static.generate(c, max_new_tokens=5, return_audio=False) for c in CONVS[:2]]
    for t, conv in zip(text, CONVS):
        assert t.audio is None
        assert t.token_ids == eager.generate(conv, max_new_tokens=5, return_audio=False).token_ids




def test_vocoder_chunks_equal_the_stream(omni_tiny):
    """Streams in rows 2, 0, 3 of a 4-row pool, each started by an eager first chunk, then
    static chunks: together (a padded bucket), at different frames (past the 71-frame window
    for one), alone: every sample equals the eager stream's."""
    cfg = omni_tiny("a").config.code2wav
    torch.manual_seed(0)
    model = audible_vocoder(Code2Wav(cfg).eval())
    g = cfg.num_quantizers
    codes = torch.randint(0, cfg.codebook_size, (3, g, 120), generator=torch.Generator()
                          .manual_seed(1))
    refs = [StreamingCode2Wav(model) for _ in range(3)]
    firsts = [1, 3, 2]  # frames in each stream's first chunk
    want = [[r.push(codes[i, :, :f])] for i, (r, f) in enumerate(zip(refs, firsts))]
    static = StaticVocoder(model, 4)
    rows = [2, 0, 3]
    for row, ref in zip(rows, refs):
        static.start(row, ref.state)
    got = [[w[0]] for w in want]
    at = list(firsts)
    plan = [([0, 1, 2], 4), ([0, 2], 25), ([0, 2], 25), ([1], 7), ([0, 1, 2], 5),
            ([0], 30), ([2, 1], 1)]
    for members, n in plan:
        chunk = torch.stack([codes[i, :, at[i]: at[i] + n] for i in members])
        pcms = static.push([rows[i] for i in members], chunk)
        for i, pcm in zip(members, pcms):
            want[i].append(refs[i].push(codes[i, :, at[i]: at[i] + n]))
            got[i].append(pcm.clone())
            at[i] += n
    assert at[0] > cfg.sliding_window
    for w, gt in zip(want, got):
        w, gt = torch.cat(w), torch.cat(gt)
        assert w.shape == gt.shape and w.abs().max() > 0.05
        assert (w - gt).abs().max() <= 1e-5


def test_vocoder_start_errors(omni_tiny):
    model = Code2Wav(omni_tiny("a").config.code2wav).eval()
    static = StaticVocoder(model, 2)
    with pytest.raises(ValueError, match="after its first chunk"):
        static.start(0, StreamingCode2Wav(model).state)
    with pytest.raises(ValueError, match="not in 0..1"):
        static.start(2, StreamingCode2Wav(model).state)
