"""The engine: streaming equals non-streaming, mixed batches equal single runs, aborts free
everything, bad requests fail alone."""

import contextlib
import dataclasses
import itertools
import time

import numpy as np
import pytest
import torch

from qomni import (
    AudioChunk,
    EngineConfig,
    Finished,
    GenerateOptions,
    Omni,
    SamplingParams,
    TextDelta,
)

GREEDY_TALKER = SamplingParams(temperature=0, repetition_penalty=1.05)
STORY = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
HELLO = [{"role": "user", "content": "Hi"}]
LONG = [{"role": "system", "content": "You are a helpful voice assistant."},
        {"role": "user", "content": "Explain how tides work, in detail, with examples."}]


@pytest.fixture(scope="module")
def omni(hf_tiny):
    path, _ = hf_tiny("a")
    return Omni.load(path, dtype="float32", device="cpu", progress=False,
                     engine=EngineConfig(max_num_seqs=4, max_model_len=256, first_chunk_frames=2,
                                         chunk_frames=5))


def collect(events):
    text, ids, audio, first_audio_at, fin = [], [], [], None, None
    for i, ev in enumerate(events):
        if isinstance(ev, TextDelta):
            text.append(ev.text)
            ids += ev.token_ids
        elif isinstance(ev, AudioChunk):
            assert ev.sample_rate == 24000 and ev.pcm.dtype == np.float32
            if first_audio_at is None:
                first_audio_at = i
            audio.append(ev.pcm)
        elif isinstance(ev, Finished):
            fin = ev
    return "".join(text), ids, np.concatenate(audio) if audio else None, first_audio_at, fin


def test_stream_equals_generate_with_speech(omni):
    kw = {"max_new_tokens": 12, "max_audio_frames": 16, "talker_sampling": GREEDY_TALKER}
    out = omni.generate(STORY, **kw)
    events = list(omni.stream(STORY, **kw))
    text, ids, audio, first_audio_at, fin = collect(events)
    assert text == out.text and ids == out.token_ids
    assert np.array_equal(audio, out.audio)
    assert fin.reason == out.finish_reason and fin.usage.audio_frames == out.codes.shape[1]
    assert audio.shape[0] == 1920 * out.codes.shape[1] - 555
    # speech streams: audio arrives in several chunks, the first before the text has ended
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) > 1
    last_text = max(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert first_audio_at < last_text


def test_stream_matches_full_decode_of_its_codes(omni):
    out = omni.generate(STORY, max_new_tokens=8, max_audio_frames=13,
                        talker_sampling=GREEDY_TALKER)
    with torch.inference_mode():
        full = omni.model.code2wav(out.codes[None])[0, 0].numpy()
    assert np.abs(full - out.audio).max() <= 1e-5


def test_mixed_batch_equals_single_runs_and_frees_everything(omni):
    specs = [
        (HELLO, {"max_new_tokens": 6, "return_audio": False}),
        (STORY, {"max_new_tokens": 10, "speaker": "Chelsie", "max_audio_frames": 12,
                     "talker_sampling": GREEDY_TALKER}),
        (LONG, {"max_new_tokens": 16, "speaker": "Aiden", "max_audio_frames": 7,
                    "talker_sampling": GREEDY_TALKER}),
        (STORY, {"max_new_tokens": 9, "sampling": SamplingParams(temperature=0.8, top_p=0.9),
                     "seed": 5, "max_audio_frames": 9}),
    ]
    alone = [omni.generate(c, **kw) for c, kw in specs]
    # all at once, plus one more that is aborted midway
    streams = [omni.stream(c, **kw) for c, kw in specs]
    victim = omni.stream(LONG, max_new_tokens=200, max_audio_frames=200)
    firsts = [next(s) for s in streams]
    next(victim)
    victim.close()  # abort midway
    results = [collect([f, *s]) for f, s in zip(firsts, streams)]
    for (text, ids, audio, _, fin), ref in zip(results, alone):
        assert ids == ref.token_ids and text == ref.text
        if ref.audio is None:
            assert audio is None
        else:
            assert np.array_equal(audio, ref.audio)
    engine = omni._loop().engine
    for _ in range(100):
        if not engine.has_work():
            break
        import time
        time.sleep(0.05)
    assert not engine.has_work()
    assert sorted(engine.free_rows) == list(range(4))
    assert sorted(engine.free_talker_rows) == list(range(4))


def test_more_requests_than_rows_queue_and_finish(omni):
    convs = [[{"role": "user", "content": f"Count to {i}."}] for i in range(7)]
    outs = omni.generate(convs, max_new_tokens=5, return_audio=False)
    singles = [omni.generate(c, max_new_tokens=5, return_audio=False) for c in convs]
    assert [o.token_ids for o in outs] == [s.token_ids for s in singles]


def test_prompt_too_long_is_a_clear_error(omni):
    huge = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(ValueError, match="max_model_len"):
        omni.generate(huge, max_new_tokens=2)
    assert omni.generate(HELLO, max_new_tokens=3, return_audio=False).token_ids


def test_bad_arguments(omni):
    with pytest.raises(ValueError):
        omni.generate(HELLO, max_new_tokens=0)
    with pytest.raises(ValueError):
        omni.generate(HELLO, max_new_tokens=2, max_audio_frames=0)


def test_astream(omni):
    import asyncio

    async def run():
        return [ev async for ev in omni.astream(STORY, max_new_tokens=6, max_audio_frames=6,
                                                 talker_sampling=GREEDY_TALKER)]

    events = asyncio.run(run())
    ref = omni.generate(STORY, max_new_tokens=6, max_audio_frames=6,
                        talker_sampling=GREEDY_TALKER)
    _, ids, audio, _, _ = collect(events)
    assert ids == ref.token_ids and np.array_equal(audio, ref.audio)


def _stop_in_the_middle(omni, full, first_token=3):
    """A stop string starting at a token boundary a few tokens in, and how many tokens come
    wholly before its first occurrence."""
    ends = [len(omni.tokenizer.decode(full.token_ids[:i + 1], skip_special_tokens=True))
            for i in range(len(full.token_ids))]
    start = ends[first_token - 1]
    n = 3
    while full.text.find(full.text[start:start + n]) < start:  # first found at `start`
        n += 1
    stop = full.text[start:start + n]
    at = full.text.find(stop)
    return stop, at, sum(e <= at for e in ends)


def test_stop_string_ends_the_text_and_the_speech_there(omni):
    kw = {"max_audio_frames": 40, "talker_sampling": GREEDY_TALKER}
    full = omni.generate(STORY, max_new_tokens=12, **kw)
    assert full.finish_reason == "length"
    stop, at, m = _stop_in_the_middle(omni, full)
    assert m >= 3 and stop
    out = omni.generate(STORY, max_new_tokens=12, stop=[stop, "never appears"], **kw)
    assert out.text == full.text[:at] and out.finish_reason == "stop"
    # The speech says exactly the tokens before the stop: what the reference says for a reply
    # whose last token (never spoken) comes right after them.
    same = omni.generate(STORY, max_new_tokens=m + 1, **kw)
    assert torch.equal(out.codes, same.codes) and np.array_equal(out.audio, same.audio)
    text, _, audio, _, fin = collect(omni.stream(STORY, max_new_tokens=12, stop=stop, **kw))
    assert text == out.text and fin.reason == "stop" and np.array_equal(audio, out.audio)


def test_speech_stop_ends_the_speech_but_not_the_text(omni):
    kw = {"max_audio_frames": 40, "talker_sampling": GREEDY_TALKER}
    full = omni.generate(STORY, max_new_tokens=12, **kw)
    marker, _, m = _stop_in_the_middle(omni, full, first_token=4)
    assert m >= 4
    out = omni.generate(STORY, max_new_tokens=12, speech_stop=[marker], **kw)
    assert out.token_ids == full.token_ids and out.text == full.text
    same = omni.generate(STORY, max_new_tokens=m + 1, **kw)
    assert torch.equal(out.codes, same.codes) and np.array_equal(out.audio, same.audio)


@pytest.mark.parametrize("bad", [[""], [3], ""])
def test_bad_stop_strings(omni, bad):
    with pytest.raises(ValueError, match="stop"):
        omni.generate(HELLO, max_new_tokens=2, stop=bad)
    with pytest.raises(ValueError, match="speech_stop"):
        omni.generate(HELLO, max_new_tokens=2, speech_stop=bad)


HISTORY = [{"role": "system", "content": "You are a helpful voice assistant."},
           {"role": "user", "content": "Hi there"},
           {"role": "assistant", "content": "Hello! How can I help?"}]


def _next_turn():
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return [*HISTORY, {"role": "user", "content": [
        {"type": "audio", "audio": tone}, {"type": "text", "text": "And this?"}]}]


def _ready(prefix):
    """Wait until the engine thread has prefilled `prefix`."""
    deadline = time.monotonic() + 30
    while not prefix.ready:
        assert time.monotonic() < deadline, "the prefix was never prefilled"
        time.sleep(0.01)
    return prefix


def _rows_all_free(engine):
    return len(engine.free_rows) == engine.cache.k.shape[1] and not engine.prefixes


def test_prefix_is_continued_and_changes_nothing(omni):
    """The conversation so far is prefilled ahead (as while the user speaks); the next turn's
    request continues that row and answers exactly as without it."""
    kw = {"max_new_tokens": 8, "max_audio_frames": 10, "talker_sampling": GREEDY_TALKER}
    turn = _next_turn()
    want = omni.generate(turn, **kw)
    engine = omni._loop().engine
    hits = engine.prefix_hits
    prefix = _ready(omni.open_prefix(HISTORY))
    assert 0 < len(prefix) < len(omni.process(turn))
    got = omni.generate(turn, prefix=prefix, **kw)
    assert engine.prefix_hits == hits + 1
    assert got.token_ids == want.token_ids and torch.equal(got.codes, want.codes)
    assert np.abs(got.audio - want.audio).max() <= 1e-5
    prefix.close()  # already taken over: nothing to free
    assert _rows_all_free(engine)


def test_only_what_a_prefix_shares_with_the_prompt_is_kept(omni):
    """A prefix that matches the prompt only in its first tokens gives just those, and the
    answer is the same."""
    kw = {"max_new_tokens": 6, "return_audio": False}
    turn = _next_turn()
    want = omni.generate(turn, **kw)
    other = [{"role": "system", "content": "Something else entirely."}]
    ids, theirs = omni.process(turn).input_ids, omni.process(other).input_ids
    shared = int(torch.nonzero(ids[:len(theirs)] != theirs)[0])  # "<|im_start|>system\n"
    assert 0 < shared < len(theirs) - 1
    engine = omni._loop().engine
    got = omni.generate(turn, prefix=_ready(omni.open_prefix(other)), **kw)
    assert got.usage.cached_tokens == shared and got.token_ids == want.token_ids
    assert _rows_all_free(engine)


def test_prefixes_never_make_requests_wait(omni):
    engine = omni._loop().engine
    held = [omni.open_prefix(HISTORY[:k]) for k in (1, 2, 3, 1, 2)]  # more than the 4 rows
    out = omni.generate([STORY, HELLO], max_new_tokens=4, return_audio=False)
    assert all(o.finish_reason == "length" for o in out)
    for p in held:
        p.close()
    deadline = time.monotonic() + 10
    while not _rows_all_free(engine):
        assert time.monotonic() < deadline, "prefixes still hold rows"
        time.sleep(0.05)
    with pytest.raises(ValueError, match="open_prefix"):
        omni.generate(HELLO, max_new_tokens=2, prefix="not a prefix")


def test_prefixes_replaced_before_they_are_prefilled_hold_no_rows(omni):
    """Replacements that come faster than the engine prefills them (a client streaming audio
    quickly): the newest continues the newest prefilled one, and the prefixes between hold
    nothing; closing the newest, or one too long to help, frees the whole chain."""
    from qomni.engine.engine import Engine
    from qomni.engine.request import Prefix
    from qomni.multimodal.chat import PromptTooLong

    engine = Engine(omni.model, omni._stop_ids(), EngineConfig(max_num_seqs=3, max_model_len=256))
    history = [omni.process(HISTORY[:k], add_generation_prompt=False) for k in (1, 2, 3)]

    def prefilled(inputs, base=None):
        p = Prefix(inputs, capture=False, base=base)
        engine.add_prefix(p)
        engine.step()
        assert p.ready
        return p

    p0 = prefilled(history[0])
    p1 = Prefix(history[1], capture=False, base=p0)
    engine.add_prefix(p1)
    p2 = Prefix(history[2], capture=False, base=p1)
    engine.add_prefix(p2)  # p1 was never prefilled: p2 continues p0
    assert p1.closed and p1.row is None and p2.base is p0
    engine.step()
    assert p2.ready and p2.continued == len(history[0]) and p0.closed
    assert len(engine.free_rows) == 2 and engine.prefixes == [p2]
    engine.release_prefix(p2)
    assert len(engine.free_rows) == 3 and not engine.prefixes

    q0 = prefilled(history[0])
    q1 = Prefix(history[1], capture=False, base=q0)
    engine.add_prefix(q1)
    engine.release_prefix(q1)  # closed before it was prefilled: what it replaces goes too
    assert q0.closed and len(engine.free_rows) == 3 and not engine.prefixes

    # Through the engine thread: a replacement too long for the engine frees its base, and so
    # does open_prefix refusing one (10 finished windows: 260 audio tokens).
    loop = omni._loop()
    too_long = _turn(_spoken(22.0))
    for refuse in ("engine", "open_prefix"):
        base = _ready(omni.open_prefix(HISTORY))
        if refuse == "engine":
            inputs = omni.process(too_long, add_generation_prompt=False)
            loop.open_prefix(Prefix(inputs, capture=False, base=base.prefix))
        else:
            with pytest.raises(PromptTooLong):
                omni.open_prefix(too_long, partial=True, replaces=base)
        deadline = time.monotonic() + 10
        while not _rows_all_free(loop.engine):
            assert time.monotonic() < deadline, f"{refuse}: the base still holds its row"
            time.sleep(0.02)


# ------------------------------------------------------------------ a turn still being spoken

WINDOW_S = 2.0  # tiny config "a": n_window_infer = 200 mel frames


def _spoken(seconds: float, burst_at: float | None = None) -> np.ndarray:
    """Noise standing in for speech: a loud start (the log-mel peak), a stretch of digital
    silence (floored at peak - 8), optionally a louder burst later that raises that floor."""
    rng = np.random.default_rng(7)
    n = int(seconds * 16000)
    x = 0.05 * rng.standard_normal(n).astype(np.float32)
    x[:1600] *= 8
    x[4000:6000] = 0
    if burst_at is not None:
        a = int(burst_at * 16000)
        x[a:a + 4000] = 0.95 * np.sign(rng.standard_normal(min(4000, n - a)))
    return x


def _turn(audio: np.ndarray) -> list:
    return [*HISTORY, {"role": "user", "content": [{"type": "audio", "audio": audio}]}]


def test_a_turn_is_prefilled_window_by_window_while_it_arrives(omni):
    """Prefixes opened as the audio arrives (nothing yet, one finished window, two) each
    continue the last one's row; the request on the whole turn continues the last and answers
    exactly as without any."""
    kw = {"max_new_tokens": 8, "max_audio_frames": 10, "talker_sampling": GREEDY_TALKER}
    audio = _spoken(5.3)
    want = omni.generate(_turn(audio), **kw)
    engine = omni._loop().engine
    hits = engine.prefix_hits
    p0 = _ready(omni.open_prefix(HISTORY))
    # 2.1 s: one window finished (its STFT frames reach 25 ms past a frame's start).
    p1 = _ready(omni.open_prefix(_turn(audio[:33600]), partial=True, replaces=p0))
    p2 = _ready(omni.open_prefix(_turn(audio[:int(4.3 * 16000)]), partial=True, replaces=p1))
    per_window = 26  # 2 chunks of 100 frames, 13 tokens each
    header = 4  # <|im_start|> user \n <|audio_start|>
    assert len(p1) == len(p0) + header + per_window and len(p2) == len(p1) + per_window
    assert p1.prefix.continued == len(p0) and p2.prefix.continued == len(p1)
    assert not p0.ready and not p1.ready  # each was taken over by the next
    got = omni.generate(_turn(audio), prefix=p2, **kw)
    assert engine.prefix_hits == hits + 1 and got.usage.cached_tokens == len(p2)
    assert got.token_ids == want.token_ids and torch.equal(got.codes, want.codes)
    assert np.abs(got.audio - want.audio).max() <= 1e-5
    assert _rows_all_free(engine)


def test_a_louder_moment_later_in_the_turn_is_caught(omni):
    """The log-mel floor is the clip's peak - 8: a burst after the first window changes that
    window's silent frames, so the prefix that holds it no longer matches: the next prefix and
    the request are checked and start over rather than continue it."""
    kw = {"max_new_tokens": 6, "return_audio": False}
    audio = _spoken(5.0, burst_at=3.0)
    want = omni.generate(_turn(audio), **kw)
    engine = omni._loop().engine
    p1 = _ready(omni.open_prefix(_turn(audio[:33600]), partial=True))
    p2 = _ready(omni.open_prefix(_turn(audio[:int(4.3 * 16000)]), partial=True, replaces=p1))
    # p2 keeps what came before p1's window (the history, the turn's header), not the window.
    assert p2.prefix.continued == len(p1) - 26 and not p1.ready
    got = omni.generate(_turn(audio), prefix=p2, **kw)
    assert got.usage.cached_tokens == len(p2)  # p2 saw the burst: all of it holds
    assert got.token_ids == want.token_ids
    assert _rows_all_free(engine)


def test_cancelled_work_stops_and_frees_what_it_holds(omni):
    """A cancel event set while a prefix is prepared (its session closed) stops it before
    anything is prefilled and frees the prefix it was to replace; a consumer of astream that
    goes away while the request's audio is still being transformed stops that work too."""
    import asyncio
    import threading

    from live_server import threads_in, wait_until

    from qomni.cancel import Cancelled

    engine = omni._loop().engine
    base = _ready(omni.open_prefix(HISTORY))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        omni.open_prefix(_turn(_spoken(5.3)), partial=True, replaces=base, cancel=cancel)
    wait_until(lambda: _rows_all_free(engine), 10, "the replaced prefix still holds its row")

    # astream: the consumer goes away while the audio is being transformed (made slow here:
    # the transform waits for the cancel event the processor was given).
    seen = threading.Event()
    real = omni.processor._audio

    def slow_audio(waves, cache=None, cancel=None):
        assert cancel is not None
        if cancel.wait(timeout=10):
            seen.set()
        return real(waves, cache, cancel)

    async def hang_up() -> None:
        events = omni.astream(_turn(_spoken(2.5)), max_new_tokens=1)
        task = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    omni.processor._audio = slow_audio
    try:
        asyncio.run(hang_up())
        assert seen.wait(timeout=2.0), "a cancelled request's inputs were still being prepared"
        wait_until(lambda: not threads_in("slow_audio"), 5, "the preparation did not stop")
    finally:
        del omni.processor._audio
    assert _rows_all_free(engine) and not engine.waiting and not engine.running

def test_partial_prefix_needs_the_audio_last(omni):
    with pytest.raises(ValueError, match="partial"):
        omni.open_prefix(HISTORY, partial=True)
    turn = [*HISTORY, {"role": "user", "content": [{"type": "audio", "audio": _spoken(2.5)},
                                                   {"type": "text", "text": "and?"}]}]
    with pytest.raises(ValueError, match="partial"):
        omni.open_prefix(turn, partial=True)


def test_earlier_audio_is_encoded_once(omni):
    """The audio encoder's window cache: a conversation's earlier clip is not encoded again
    at the next turn (a hit gives the very tensor a fresh encode gives)."""
    first = _turn(_spoken(2.5, burst_at=1.0))[-1:]  # a clip no other test uses
    cache = omni.model.thinker.audio_tower.window_cache
    omni.generate(first, max_new_tokens=2, return_audio=False)
    history = [*first, {"role": "assistant", "content": "Noted."}]
    hits = cache.hits
    next_turn = [*history, {"role": "user", "content": "And now?"}]
    omni.generate(next_turn, max_new_tokens=2, return_audio=False)
    assert cache.hits == hits + 2  # both windows of the 2.5 s clip


# ------------------------------------------------------------------ fixed lengths


def _always(monkeypatch, module, name, token):
    """Make `module.name` (a logits function) always prefer `token`, as a model that wants to
    stop at once would."""
    original = getattr(module, name)

    def biased(hidden):
        logits = original(hidden).clone()
        logits[..., token] += 1e4
        return logits

    monkeypatch.setattr(module, name, biased)


def test_ignore_eos_runs_to_max_new_tokens(omni, monkeypatch):
    _always(monkeypatch, omni.model.thinker, "logits", omni.config.tokens.im_end)
    eos_at_once = omni.generate(HELLO, max_new_tokens=7, return_audio=False)
    assert eos_at_once.token_ids == [] and eos_at_once.finish_reason == "stop"
    out = omni.generate(HELLO, max_new_tokens=7, return_audio=False,
                        sampling=SamplingParams(temperature=0, ignore_eos=True))
    assert out.finish_reason == "length" and out.usage.completion_tokens == 7
    assert out.token_ids == [omni.config.tokens.im_end] * 7 and out.text == ""


def test_min_tokens_holds_back_an_early_stop(omni, monkeypatch):
    _always(monkeypatch, omni.model.thinker, "logits", omni.config.tokens.im_end)
    out = omni.generate(HELLO, max_new_tokens=9, return_audio=False,
                        sampling=SamplingParams(temperature=0, min_tokens=4))
    assert out.finish_reason == "stop" and len(out.token_ids) == 4
    assert omni.config.tokens.im_end not in out.token_ids
    # the same four tokens, batched with a request that stops at once
    both = omni.generate([HELLO, STORY], max_new_tokens=9, return_audio=False,
                         sampling=SamplingParams(temperature=0, min_tokens=4))
    assert both[0].token_ids == out.token_ids and len(both[1].token_ids) == 4


def test_fixed_lengths_without_a_forced_stop(omni):
    out = omni.generate(STORY, max_new_tokens=11, return_audio=False,
                        sampling=SamplingParams(temperature=0, ignore_eos=True, min_tokens=11))
    assert out.finish_reason == "length" and len(out.token_ids) == 11
    assert out.token_ids == omni.generate(STORY, max_new_tokens=11,
                                          return_audio=False).token_ids


def test_talker_min_tokens_and_ignore_eos_count_frames(omni, monkeypatch):
    _always(monkeypatch, omni.model.talker, "code0_logits", omni.config.talker.codec_eos_token_id)
    kw = {"max_new_tokens": 6, "max_audio_frames": 9}
    assert omni.generate(STORY, talker_sampling=GREEDY_TALKER, **kw).codes.shape[1] == 0
    held = omni.generate(STORY, **kw, talker_sampling=SamplingParams(
        temperature=0, repetition_penalty=1.05, min_tokens=3))
    assert held.codes.shape[1] == 3 and held.audio.size > 0
    full = omni.generate(STORY, **kw, talker_sampling=SamplingParams(
        temperature=0, repetition_penalty=1.05, ignore_eos=True))
    assert full.codes.shape[1] == 9
    assert torch.equal(full.codes[:, :3], held.codes)


# ------------------------------------------------------------------ options


def test_options_object_equals_keywords(omni):
    from qomni import GenerateOptions

    kw = {"max_new_tokens": 5, "max_audio_frames": 6, "talker_sampling": GREEDY_TALKER}
    want = omni.generate(STORY, **kw)
    opts = GenerateOptions(**kw)
    got = omni.generate(STORY, options=opts)
    assert got.token_ids == want.token_ids and torch.equal(got.codes, want.codes)
    # keywords change what the options say
    shorter = omni.generate(STORY, options=opts, max_new_tokens=3, return_audio=False)
    assert shorter.token_ids == want.token_ids[:3] and shorter.audio is None
    _, ids, _, _, _ = collect(omni.stream(STORY, options=opts))
    assert ids == want.token_ids


def test_unknown_keywords_are_type_errors_naming_them(omni):
    with pytest.raises(TypeError, match="max_tokens"):
        omni.generate(HELLO, max_tokens=3)
    with pytest.raises(TypeError, match="temperature"):
        list(omni.stream(HELLO, temperature=0.5))
    with pytest.raises(TypeError, match="options"):
        omni.generate(HELLO, options={"max_new_tokens": 3})


def test_template_options_reach_the_chat_template(omni):
    plain = omni.generate(HELLO, max_new_tokens=2, return_audio=False)
    closed = omni.generate(HELLO, max_new_tokens=2, return_audio=False,
                           chat_template_kwargs={"enable_thinking": False})
    want = len(omni.process(HELLO, enable_thinking=False))
    assert closed.usage.prompt_tokens == want != plain.usage.prompt_tokens
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        omni.generate(HELLO, max_new_tokens=2, chat_template_kwargs={"tools": []})


# ------------------------------------------------------------------ batched, chunked prefill


def test_a_batch_admitted_together_equals_each_request_alone(omni):
    """The prompts admitted in one step are prefilled in one forward (right-padded)."""
    kw = {"max_new_tokens": 7, "max_audio_frames": 9, "talker_sampling": GREEDY_TALKER}
    convs = [HELLO, STORY, LONG]
    alone = [omni.generate(c, **kw) for c in convs]
    together = omni.generate(convs, **kw)
    for a, t in zip(alone, together):
        assert t.token_ids == a.token_ids and torch.equal(t.codes, a.codes)


def test_a_batch_reaches_the_engine_at_once(omni, monkeypatch):
    """generate() of a list hands its requests over together: one prefill of them all, not the
    first alone while the others are being handed over (which cost a whole extra step)."""
    from qomni.engine.engine import Engine

    sizes = []
    prefill = Engine._prefill

    def recording(self, owners, chunks):
        sizes.append(len(chunks))
        return prefill(self, owners, chunks)

    monkeypatch.setattr(Engine, "_prefill", recording)
    loop = omni._loop()
    done = []
    opts = GenerateOptions.build(None, "generate", max_new_tokens=2, return_audio=False)
    with loop.together():  # nothing submitted inside reaches the engine before the end
        omni._submit(loop, omni._request(HELLO, opts), done.append)
        time.sleep(0.3)
        assert sizes == [] and loop.engine.occupancy()["waiting"] == 0
    while not any(isinstance(ev, Finished) for ev in done):
        time.sleep(0.01)
    assert sizes == [1]
    for _ in range(3):
        omni.generate([HELLO, STORY, LONG], max_new_tokens=2, return_audio=False)
    assert sizes == [1, 3, 3, 3]


def _chunked_twin(omni, budget):
    """The same model and processor behind an engine that prefills `budget` tokens a step."""
    cfg = dataclasses.replace(omni.engine_config, max_prefill_tokens=budget)
    return Omni(omni.model, omni.processor, omni.path, omni.generation_config, cfg)


def test_a_long_prompt_prefilled_in_pieces_answers_as_prefilled_whole(omni):
    kw = {"max_new_tokens": 8, "max_audio_frames": 10, "talker_sampling": GREEDY_TALKER}
    turn = _next_turn()
    assert len(omni.process(turn)) > 4 * 7
    twin = _chunked_twin(omni, 7)
    try:
        want = omni.generate([LONG, turn], **kw)
        got = twin.generate([LONG, turn], **kw)
        prefix = _ready(twin.open_prefix(HISTORY))
        continued = twin.generate(turn, prefix=prefix, **kw)
    finally:
        twin._loop().close()
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and torch.equal(g.codes, w.codes)
    assert continued.usage.cached_tokens == len(prefix) and torch.equal(continued.codes,
                                                                        want[1].codes)


def test_pieces_of_a_prompt_equal_the_whole_prefill(omni):
    """The runner's prefill from where each row stands: the states of a prompt prefilled in
    pieces, next to other prompts, equal one whole prefill (fp32)."""
    from qomni.engine.runner import Chunk, ModelRunner

    runner = ModelRunner(omni.model, EngineConfig(max_num_seqs=3, max_model_len=256))
    prompts = [runner.embed(omni.process(c)) for c in (_next_turn(), LONG, HELLO)]
    with torch.inference_mode():
        whole, (whole_cap, _, _) = runner.prefill(
            [Chunk(r, p, 0, len(p), r == 0) for r, p in enumerate(prompts)])
        n = len(prompts[0])
        cuts = [0, 5, 17, n - 1, n]
        caps = []
        for start, end in itertools.pairwise(cuts):  # another prompt beside each piece
            last, (cap, _) = runner.prefill([Chunk(0, prompts[0], start, end, True),
                                             Chunk(1, prompts[1], 0, len(prompts[1]), False)])
            caps.append(cap)
    for got, want in ((last[0], whole[0]), (torch.cat(caps), whole_cap)):
        assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()
    logits = runner.logits(torch.stack([last[0], whole[0]]))
    assert int(logits[0].argmax()) == int(logits[1].argmax())


def test_a_long_prefill_does_not_stall_running_decodes(omni):
    from qomni.engine.engine import Engine

    engine = Engine(omni.model, omni._stop_ids(),
                    EngineConfig(max_num_seqs=2, max_model_len=256, max_prefill_tokens=6))
    short = omni._request(HELLO, GenerateOptions(max_new_tokens=40, return_audio=False))
    long = omni._request(LONG, GenerateOptions(max_new_tokens=4, return_audio=False))
    engine.add(short)
    while not short.tokens:
        engine.step()
    engine.add(long)
    steps = 0
    while not long.tokens:
        before = len(short.tokens)
        engine.step()
        steps += 1
        assert len(short.tokens) == before + 1  # a token every step
        assert long.prefilled == min(6 * steps, len(long.inputs))
    assert steps == -(-len(long.inputs) // 6)
    alone = omni.generate(LONG, max_new_tokens=4, return_audio=False)
    while not long.finished:
        engine.step()
    assert long.tokens == alone.token_ids
