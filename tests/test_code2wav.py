"""code2wav against transformers 5.23 on tiny config "a" (fp32, CPU), and exact streaming.

The reference module is built with a fixed seed, then its weights are redrawn at unit scale:
its own init (std 0.02, ConvNeXt gamma 1e-6, layer scale 0.01) gives a ~1e-7 waveform, which
would make any tolerance meaningless (and runs slowly on denormal floats).
Tolerances (fp32): waveform max|Δ| ≤ 1e-4 vs the reference; a stream equals one whole
decode to 1e-5.
"""

import pytest
import torch
from reference import audible_vocoder, hf_config

from qomni.config import OmniConfig
from qomni.models.code2wav import Code2Wav
from qomni.models.code2wav_stream import StreamingCode2Wav, push_together

modeling = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")

FRAMES_PER_CHUNK_HF, CONTEXT_HF = 300, 25  # chunked_decode's defaults, as generate() uses them


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max|Δ|={d.max().item():.3g} mean|Δ|={d.mean().item():.3g}"


@pytest.fixture(scope="module")
def pair():
    hc = hf_config("a")
    torch.manual_seed(0)
    hf = audible_vocoder(modeling.Qwen3OmniMoeCode2Wav(hc.code2wav_config).eval())
    ours = Code2Wav(OmniConfig.from_hf(hc.to_dict()).code2wav).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model runs many small ops, where a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _codes(frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (batch, 16, frames), generator=generator)


def test_state_dict_keys_and_buffers(pair):
    hf, ours = pair
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    assert {n for n, _ in ours.named_buffers()} == {
        "code_offset", "pre_transformer.rotary_emb.inv_freq"}
    ours_bf16 = Code2Wav(ours.cfg).to(torch.bfloat16)
    assert ours_bf16.pre_transformer.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("frames", [1, 5, 40, 100])
def test_matches_reference(pair, frames):
    hf, ours = pair
    codes = _codes(frames, batch=2, seed=frames)
    with torch.no_grad():
        want, got = hf(codes), ours(codes)
    # the length law, 1920·F - 555 for the real (and tiny) upsampling rates
    assert got.shape == want.shape == (2, 1, 1920 * frames - 555)
    assert ours.num_samples(frames) == 1920 * frames - 555
    assert got.dtype == torch.float32
    assert want.std() > 0.1, "the waveform must not be near silence for the test to mean anything"
    assert (got - want).abs().max() <= 1e-4, _diff(got, want)


def _stream(model: Code2Wav, codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Push codes [G, F] in chunks of the given sizes (the last one repeats), then flush."""
    stream, chunks, start, i = StreamingCode2Wav(model), [], 0, 0
    while start < codes.shape[-1]:
        n = sizes[min(i, len(sizes) - 1)]
        chunk = stream.push(codes[:, start:start + n])
        assert chunk.dim() == 1 and chunk.dtype == torch.float32
        # every push emits exactly the samples its frames made final
        assert stream.frames == min(start + n, codes.shape[-1])
        chunks.append(chunk)
        start, i = start + n, i + 1
    assert sum(c.numel() for c in chunks) == model.num_samples(codes.shape[-1])
    tail = stream.flush()
    assert tail.numel() == 0
    return torch.cat([*chunks, tail])


@pytest.fixture(scope="module")
def long_utterance(pair):
    _, ours = pair
    codes = _codes(1000, seed=7)[0]
    with torch.no_grad():
        return codes, ours(codes[None])[0, 0]


# The 1000-frame case covers the sliding windows' eviction many times over (the tiny
# transformer looks back 2·71 frames); chunks of 1 and 4 frames run it too, on 1000 frames.
@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[1], [4], [25], [300], [1, 4, 25, 300]])
def test_stream_equals_whole_decode(pair, long_utterance, sizes):
    _, ours = pair
    codes, whole = long_utterance
    got = _stream(ours, codes, sizes)
    assert got.shape == whole.shape
    assert (got - whole).abs().max() <= 1e-5, _diff(got, whole)


@pytest.mark.parametrize("sizes", [[1], [4], [25], [300]])
def test_stream_one_frame(pair, sizes):
    _, ours = pair
    codes = _codes(1, seed=3)[0]
    with torch.no_grad():
        whole = ours(codes[None])[0, 0]
    got = _stream(ours, codes, sizes)
    assert got.numel() == 1365
    assert (got - whole).abs().max() <= 1e-5, _diff(got, whole)


def test_stream_batched(pair):
    _, ours = pair
    codes = _codes(90, batch=2, seed=5)
    with torch.no_grad():
        whole = ours(codes)
    stream = StreamingCode2Wav(ours)
    chunks = [stream.push(codes[..., s:s + 30]) for s in range(0, 90, 30)]
    assert all(c.shape[:2] == (2, 1) for c in chunks)
    assert stream.flush().shape == (2, 1, 0)
    got = torch.cat(chunks, dim=-1)
    assert (got - whole).abs().max() <= 1e-5, _diff(got, whole)


def test_push_together_equals_separate_streams(pair):
    """Utterances that share batched chunks (the engine's lockstep requests) get exactly what
    each would get alone, and can go on alone afterwards."""
    _, ours = pair
    codes = _codes(40, batch=3, seed=7)
    alone = [StreamingCode2Wav(ours).push(codes[b]) for b in range(3)]
    streams = [StreamingCode2Wav(ours) for _ in range(3)]
    got = [[] for _ in range(3)]
    for s0, s1 in [(0, 2), (2, 6), (6, 20)]:  # together, at the same frame
        for b, pcm in enumerate(push_together(streams, codes[..., s0:s1])):
            got[b].append(pcm)
    for b in range(3):  # then each on its own
        got[b].append(streams[b].push(codes[b, :, 20:]))
        joined = torch.cat(got[b])
        assert (joined - alone[b]).abs().max() <= 1e-6, _diff(joined, alone[b])


def test_push_together_refuses_streams_at_different_frames(pair):
    _, ours = pair
    a, b = StreamingCode2Wav(ours), StreamingCode2Wav(ours)
    a.push(_codes(2)[0])
    with pytest.raises(ValueError, match="same frame"):
        push_together([a, b], _codes(3, batch=2))
    with pytest.raises(ValueError, match="2 streams for 3 rows"):
        push_together([a, b], _codes(3, batch=3))
    assert b.frames == 0 and a.frames == 2  # nothing was touched


def test_hf_chunked_decode_is_as_documented(pair):
    """HF chunked_decode (generate's path) loses 555 samples per 300-frame chunk, and after the
    first chunk decodes with 25 frames of left context only; code2wav_stream.py says so."""
    hf, ours = pair
    frames = 340
    codes = _codes(frames, seed=11)
    with torch.no_grad():
        chunked = hf.chunked_decode(codes, FRAMES_PER_CHUNK_HF, CONTEXT_HF)[0, 0]
        whole = ours(codes)[0, 0]
        second = ours(codes[..., FRAMES_PER_CHUNK_HF - CONTEXT_HF:])[0, 0, CONTEXT_HF * 1920:]
    first = ours.num_samples(FRAMES_PER_CHUNK_HF)  # 1920·300 - 555
    assert chunked.numel() == whole.numel() - 555 == ours.num_samples(frames) - 555
    assert (chunked[:first] - whole[:first]).abs().max() <= 1e-4, _diff(chunked[:first], whole)
    assert (chunked[first:] - second).abs().max() <= 1e-4, _diff(chunked[first:], second)
    # what the whole decode has there instead: frames 300.. after the 555 samples HF never made
    assert whole[first + 555:].shape == second.shape
    assert (whole[first + 555:] - second).abs().max() > 1e-3, "25 frames of context were enough?"


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.full((1, 16, 3), 2048), r"\[0, 2048\)"),
        (torch.full((1, 16, 3), -1), r"\[0, 2048\)"),
        (torch.zeros(1, 15, 3, dtype=torch.long), "shape"),
        (torch.zeros(16, 3, dtype=torch.long), "shape"),
        (torch.zeros(1, 16, 0, dtype=torch.long), "shape"),
        (torch.zeros(1, 16, 3), "integer"),
    ],
)
def test_bad_codes(pair, codes, message):
    _, ours = pair
    with pytest.raises(ValueError, match=message):
        ours(codes)


def test_bad_stream_input(pair):
    _, ours = pair
    stream = StreamingCode2Wav(ours)
    with pytest.raises(ValueError, match=r"\[groups, frames\]"):
        stream.push(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        stream.push(torch.full((16, 2), 5000))
    assert stream.push(torch.zeros(16, 0, dtype=torch.long)).numel() == 0
    stream.push(torch.zeros(16, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="continue"):
        stream.push(torch.zeros(2, 16, 2, dtype=torch.long))
    stream.flush()
    with pytest.raises(RuntimeError, match="flush"):
        stream.push(torch.zeros(16, 2, dtype=torch.long))
