"""A talker apart from its thinker (qomni.engine.talker_engine): a thinker-only `Omni` hands each
speaking request's thinker states to a talker engine loaded without the thinker's weights, and
the speech equals the single-process engine's: the same text, codec codes and samples."""

import queue
import time

import numpy as np
import pytest
import torch

from qomni import Omni, SamplingParams
from qomni.config import OmniConfig
from qomni.engine.config import EngineConfig
from qomni.engine.talker_engine import LocalTalker, TalkerEngine
from qomni.engine.thinker_states import StatesUpdate
from qomni.events import AudioChunk, Finished
from qomni.loading import load_model
from qomni.tiny import make_tiny

GREEDY_TALKER = SamplingParams(temperature=0, repetition_penalty=1.05)  # = talker_do_sample=False
LOAD = {"dtype": "float32", "device": "cpu", "progress": False}


def chirp(seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)


CONVS = [
    [{"role": "user", "content": "Say something"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "audio", "audio": chirp()},
                                  {"type": "text", "text": "What is this?"}]}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("apart") / "tiny")


@pytest.fixture(scope="module")
def ref(tiny):
    return Omni.load(tiny, **LOAD)


@pytest.fixture(scope="module")
def apart(tiny):
    """A thinker-only Omni whose speech is made by a talker engine on its own thread."""
    omni = Omni.load(tiny, audio_output=False, **LOAD)
    link = LocalTalker(TalkerEngine.load(tiny, **LOAD))
    omni.remote_talker = link
    yield omni
    link.close()


def assert_same(got, want):
    assert got.text == want.text and got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason and got.usage == want.usage
    assert got.codes.shape[1] > 0 and torch.equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.audio, want.audio)


def test_the_talker_engine_reads_no_thinker_weights(tiny, ref):
    net, _ = load_model(tiny, OmniConfig.from_hf(tiny), "float32", "cpu", True, None, False,
                        thinker=False)
    assert net.thinker is None
    ours = {n: p for n, p in net.named_parameters()}
    theirs = {n: p for n, p in ref.model.named_parameters() if not n.startswith("thinker.")}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


@pytest.mark.parametrize("conv", CONVS, ids=["text", "audio"])
def test_greedy_speech_apart_equals_one_process(apart, ref, conv):
    kw = {"max_new_tokens": 12, "max_audio_frames": 14, "talker_sampling": GREEDY_TALKER}
    assert_same(apart.generate(conv, **kw), ref.generate(conv, **kw))


def test_seeded_sampled_speech_apart_equals_one_process(apart, ref):
    """The talker's default sampling, seeded: the samplers built from the states draw the
    same noise as the engine's own."""
    kw = {"max_new_tokens": 10, "max_audio_frames": 12, "seed": 7}
    assert_same(apart.generate(CONVS[0], **kw), ref.generate(CONVS[0], **kw))


def test_a_batch_apart_equals_one_process(apart, ref):
    kw = {"max_new_tokens": 8, "max_audio_frames": 10, "talker_sampling": GREEDY_TALKER}
    for got, want in zip(apart.generate(CONVS, **kw), ref.generate(CONVS, **kw)):
        assert_same(got, want)


def test_the_stream_ends_after_the_speech_and_closing_it_frees_the_talker(apart, ref):
    kw = {"max_new_tokens": 6, "max_audio_frames": 8, "talker_sampling": GREEDY_TALKER}
    events = list(apart.stream(CONVS[0], **kw))
    assert isinstance(events[-1], Finished)
    want = ref.generate(CONVS[0], **kw)
    assert events[-1].usage == want.usage and want.usage.audio_frames > 0
    pcm = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    np.testing.assert_array_equal(pcm, want.audio)

    talker = apart.remote_talker.engine
    stream = apart.stream(CONVS[0], max_new_tokens=200, max_audio_frames=400)
    assert next(e for e in stream if isinstance(e, AudioChunk)).pcm.size
    stream.close()  # long before its 400 frames
    deadline = time.monotonic() + 30
    while talker.running or talker.waiting:
        assert time.monotonic() < deadline, "the talker job outlived its stream"
        time.sleep(0.05)
    assert sorted(talker.free_rows) == list(range(talker.config.max_num_seqs))


def test_a_prompt_too_long_for_the_talker_fails_its_request_alone(tiny, apart):
    short = LocalTalker(TalkerEngine.load(tiny, engine=EngineConfig(max_talker_len=12), **LOAD))
    omni = Omni.load(tiny, audio_output=False, **LOAD)
    omni.remote_talker = short
    try:
        with pytest.raises(ValueError, match="too many for the talker cache"):
            omni.generate(CONVS[1], max_new_tokens=4)
        # Text alone still runs; speech of a short prompt too.
        assert omni.generate(CONVS[1], max_new_tokens=4, return_audio=False).text
    finally:
        short.close()


def test_states_out_of_order_fail_the_job(apart):
    got: queue.Queue = queue.Queue()
    channel = apart.remote_talker.open(got.put)
    channel.send(StatesUpdate(tokens=[1]))
    err = got.get(timeout=30)
    assert isinstance(err, ValueError) and "before the prompt" in str(err)


def test_static_steps_apart_equal_one_process(tiny):
    """With cuda_graphs on (on the CPU the static steps run uncaptured), as a GPU deployment
    runs: the talker engine's static talker steps and pooled vocoder give the engine's speech."""
    engine = EngineConfig(cuda_graphs=True)
    ref = Omni.load(tiny, engine=engine, **LOAD)
    omni = Omni.load(tiny, audio_output=False, engine=engine, **LOAD)
    link = omni.remote_talker = LocalTalker(TalkerEngine.load(tiny, engine=engine, **LOAD))
    try:
        assert link.engine.stage.runner.talker_static is not None
        for kw in ({"talker_sampling": GREEDY_TALKER}, {"seed": 5}):
            kw |= {"max_new_tokens": 10, "max_audio_frames": 12}
            assert_same(omni.generate(CONVS[0], **kw), ref.generate(CONVS[0], **kw))
    finally:
        link.close()


def test_a_talker_that_fails_ends_its_request_and_the_next_one_speaks(apart, ref, monkeypatch):
    stage = apart.remote_talker.engine.stage

    def broken(jobs):
        raise RuntimeError("talker step failed")

    monkeypatch.setattr(stage, "step", broken)
    with pytest.raises(RuntimeError, match="talker step failed"):
        apart.generate(CONVS[0], max_new_tokens=30, max_audio_frames=20)
    monkeypatch.undo()
    kw = {"max_new_tokens": 6, "max_audio_frames": 8, "talker_sampling": GREEDY_TALKER}
    assert_same(apart.generate(CONVS[0], **kw), ref.generate(CONVS[0], **kw))
    assert apart.engine_occupancy()["running"] == 0  # the failed request's text stopped too
