"""Audio loading and log-mel features against transformers' WhisperFeatureExtractor.

The extractor is configured and called exactly as Qwen3-Omni's processor does (preprocessor_config
values; padding=True, truncation=False, attention mask). Real LibriVox speech comes from Debian's
pocketsphinx-testdata; other rates, stereo, mp3 and an mp4 audio track are made with ffmpeg.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qomni.cancel import Cancelled
from qomni.multimodal.audio import MelCache, load_audio, log_mel_features

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
CLIPS = sorted(glob.glob(f"{LIBRIVOX}/*.wav"))
CLIP = f"{LIBRIVOX}/sense_and_sensibility_01_austen_64kb-0880.wav"
TOL = 1e-4

needs_speech = pytest.mark.skipif(
    not Path(CLIP).exists(), reason="needs Debian pocketsphinx-testdata (LibriVox wavs)"
)


@pytest.fixture(scope="module")
def hf_extractor():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        n_fft=400,
        chunk_length=300,
        padding_value=0.0,
        dither=0.0,
        return_attention_mask=True,
    )


def hf_features(fe, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    # The exact call of Qwen3OmniMoeProcessor._process_audio (its audio_kwargs defaults).
    out = fe(
        list(waves),
        sampling_rate=16000,
        padding=True,
        truncation=False,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out["input_features"], out["attention_mask"].sum(-1)


def assert_matches_hf(fe, waves: list[np.ndarray]) -> float:
    ref, ref_len = hf_features(fe, waves)
    ours, lengths = log_mel_features(waves)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"max|Δ|={diff:.3g} mean|Δ|={(ours - ref).abs().mean().item():.3g}"
    assert lengths.dtype == torch.long and lengths.tolist() == ref_len.tolist()
    return diff


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    if not Path(CLIP).exists():
        pytest.skip("needs Debian pocketsphinx-testdata (LibriVox wavs)")
    return load_audio(CLIP)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """The LibriVox clip re-encoded by ffmpeg into other rates, channels and containers."""
    if shutil.which("ffmpeg") is None or not Path(CLIP).exists():
        pytest.skip("needs ffmpeg and pocketsphinx-testdata")
    d = tmp_path_factory.mktemp("audio")
    recipes = {
        "8k.wav": ["-i", CLIP, "-ar", "8000"],
        "44k1.wav": ["-i", CLIP, "-ar", "44100"],
        "48k.wav": ["-i", CLIP, "-ar", "48000"],
        # pan copies the channel as is; plain "-ac 2" would scale it by 1/sqrt(2).
        "stereo.wav": ["-i", CLIP, "-af", "pan=stereo|c0=c0|c1=c0"],
        "speech.mp3": ["-i", CLIP, "-c:a", "libmp3lame", "-b:a", "64k"],
        "speech.mp4": [
            "-f",
            "lavfi",
            "-i",
            "color=c=blue:s=64x64:r=5",
            "-i",
            CLIP,
            "-shortest",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-b:a",
            "64k",
        ],
    }
    out = {}
    for fname, args in recipes.items():
        out[fname] = d / fname
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args, str(out[fname])], check=True)
    return out


def snr_db(x: np.ndarray, ref: np.ndarray) -> float:
    n = min(len(x), len(ref))
    return float(10 * np.log10((ref[:n] ** 2).sum() / ((x[:n] - ref[:n]) ** 2).sum()))


# ---------------------------------------------------------------- features vs the reference


@needs_speech
@pytest.mark.parametrize("path", CLIPS, ids=lambda p: Path(p).stem[-4:])
def test_single_clip_matches_hf(hf_extractor, path):
    wav = load_audio(path)
    assert_matches_hf(hf_extractor, [wav])
    _, lengths = log_mel_features([wav])
    assert lengths.item() == len(wav) // 160


@needs_speech
def test_mixed_length_batch_matches_hf(hf_extractor):
    waves = [load_audio(p) for p in CLIPS]
    # Cuts that are / are not multiples of the hop, and one much shorter than the rest.
    waves += [waves[0][: 160 * 50], waves[1][: 8000 + 37], waves[2][:1000]]
    assert_matches_hf(hf_extractor, waves)
    _, lengths = log_mel_features(waves)
    longest = max(len(w) for w in waves)
    # The reference's mask gives floor for the longest row but ceil for padded ones.
    assert lengths.max().item() == longest // 160
    assert lengths[-1].item() == -(-1000 // 160)


@needs_speech
def test_padded_rows_differ_from_unpadded(speech):
    # Documents the reference quirk we reproduce: padding happens before the STFT, so the last
    # frames of a padded row see zeros where an unpadded STFT would reflect the signal.
    short = speech[:8000]  # its last unpadded frame reflects 40 samples past the end
    alone, _ = log_mel_features([short])
    batched, _ = log_mel_features([speech, short])
    n = alone.shape[-1]
    assert torch.allclose(alone[0, :, : n - 2], batched[1, :, : n - 2], atol=TOL)
    assert (alone[0, :, -1] - batched[1, :, n - 1]).abs().max() > 1e-2


def test_synthetic_inputs_match_hf(hf_extractor):
    rng = np.random.default_rng(0)
    t = np.arange(24_321) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    noise = (0.05 * rng.standard_normal(5_000)).astype(np.float32)
    silence = np.zeros(3_200, np.float32)  # all-silent row: its floor sits at log10(1e-10)
    assert_matches_hf(hf_extractor, [tone])
    assert_matches_hf(hf_extractor, [noise, tone, silence])


def test_tensor_input_and_device():
    wav = torch.randn(16_000) * 0.1
    feats, lengths = log_mel_features([wav, wav[:5_000].numpy()], device="cpu")
    assert feats.shape == (2, 128, 100) and feats.device.type == "cpu"
    assert lengths.tolist() == [100, 32]
    with pytest.raises(ValueError):
        log_mel_features([np.zeros(100, np.float32)])


# ---------------------------------------------------------------- decoding, resampling, mixing


@needs_speech
def test_wav_loads_exactly(speech):
    import wave

    with wave.open(CLIP) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert speech.dtype == np.float32 and speech.ndim == 1
    np.testing.assert_array_equal(speech, pcm / np.float32(32768))


@pytest.mark.parametrize("fname", ["44k1.wav", "48k.wav"])
def test_high_rates_resample_back_to_original(converted, speech, hf_extractor, fname):
    wav = load_audio(converted[fname])
    assert abs(len(wav) - len(speech)) <= 2
    assert snr_db(wav, speech) > 40  # 16k -> 44.1k/48k -> 16k round trip measures ~60 dB
    assert_matches_hf(hf_extractor, [wav])


def test_8k_upsamples_to_16k(converted, speech, hf_extractor):
    wav = load_audio(converted["8k.wav"])
    assert abs(len(wav) - len(speech)) <= 2
    # Everything above 4 kHz is gone, so only the overall shape can match.
    assert np.corrcoef(wav, speech[: len(wav)])[0, 1] > 0.95
    assert_matches_hf(hf_extractor, [wav])


def test_stereo_downmixes_by_mean(converted, speech, hf_extractor):
    wav = load_audio(converted["stereo.wav"])
    np.testing.assert_allclose(wav, speech, atol=1e-6)
    assert_matches_hf(hf_extractor, [wav])


@pytest.mark.parametrize("fname", ["speech.mp3", "speech.mp4"])
def test_compressed_and_video_audio_track(converted, speech, hf_extractor, fname):
    wav = load_audio(converted[fname])
    # Codec priming is trimmed by the demuxer; only the tail may carry up to a frame of padding.
    assert abs(len(wav) - len(speech)) <= 2048
    n = min(len(wav), len(speech))
    assert np.corrcoef(wav[:n], speech[:n])[0, 1] > 0.99
    assert_matches_hf(hf_extractor, [wav, speech])


@needs_speech
def test_bytes_base64_and_data_uri_sources(speech):
    import base64

    raw = Path(CLIP).read_bytes()
    b64 = base64.b64encode(raw).decode()
    for src in (raw, b64, f"data:audio/wav;base64,{b64}", Path(CLIP), f"file://{CLIP}"):
        np.testing.assert_array_equal(load_audio(src), speech)


def test_array_sources():
    rng = np.random.default_rng(1)
    mono = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    np.testing.assert_array_equal(load_audio(mono), mono)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(mono)), mono)
    both = np.stack([mono, mono])
    np.testing.assert_allclose(load_audio(both), mono, atol=1e-7)  # (channels, samples)
    np.testing.assert_allclose(load_audio(both.T), mono, atol=1e-7)  # (samples, channels)
    pcm = (mono * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm), pcm / 32768.0, atol=1e-7)
    up = load_audio((mono[::2].copy(), 8000))
    assert up.dtype == np.float32 and len(up) == 16_000


@needs_speech
def test_blocks_are_final_once_their_samples_exist(speech):
    """With block_frames, a block's frames for the first seconds of a clip are bit for bit those
    of the whole clip (the floor aside: the peak here is in the first block)."""
    loud = speech.copy()
    loud[:800] = np.sign(loud[:800]) * 0.99  # the log-mel peak sits in block 0
    block = 200
    whole, _ = log_mel_features([loud], block_frames=block)
    for seconds in (2.3, 4.1):
        part, _ = log_mel_features([loud[: int(seconds * 16000)]], block_frames=block)
        done = (part.shape[-1] - 2) // block * block  # blocks whose STFT windows all arrived
        assert done >= block
        assert torch.equal(part[..., :done], whole[..., :done])
    unblocked, _ = log_mel_features([loud])
    assert (unblocked - whole).abs().max() <= 1e-5


@needs_speech
def test_mel_cache_gives_the_same_features_and_only_computes_new_blocks(speech):
    """A turn still arriving, transformed at every window with one `MelCache`: the features are
    bit for bit those computed without it, each call transforms only its new blocks, and only
    the blocks the last call used are kept."""
    cache = MelCache()
    turn = np.concatenate([speech, 0.5 * speech[::-1], speech])  # 9 s
    earlier = speech[::-1][:24_000].copy()  # an earlier turn, padded to the longest clip
    for seconds in (2.1, 4.3, 6.5, 9.0):
        part = turn[: int(seconds * 16000)]
        misses = cache.misses
        got, got_len = log_mel_features([earlier, part], block_frames=200, cache=cache)
        want, want_len = log_mel_features([earlier, part], block_frames=200)
        assert torch.equal(got, want) and torch.equal(got_len, want_len)
        if seconds > 2.1:  # the earlier turn and the finished windows came from the cache:
            assert cache.misses - misses == 2  # the new window and the unfinished one
    used = len(cache)
    log_mel_features([turn[:16000]], block_frames=200, cache=cache)
    assert 0 < len(cache) < used
    cache.clear()
    assert len(cache) == 0


def test_log_mel_stops_when_cancelled():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        log_mel_features([np.ones(64_000, np.float32)], block_frames=200, cancel=cancel)
