"""Video input and use_audio_in_video against transformers 5.23 (tiny config, fp32).

The reference video processor needs torchvision, which has no CPU build here, so:
(a) our patches are checked against the reference *image* processor (same patch layout) and a
    hand-written loop, and our frame sampling against the official client's rules;
(b) the real Qwen3OmniMoeProcessor runs with a stand-in video processor that returns our pixel
    values and grids; everything else (placeholders, audio/video interleaving, second_per_grid,
    the thinker, positions) is the reference's own code: input ids and positions equal, prompt
    logits within 1e-4, greedy tokens equal;
(c) a real video with speech (ffmpeg: scikit-image photos + LibriVox) goes through the whole
    path, text and speech, the codes equal to the reference's;
(d) bad videos fail with a MediaError that names the item.
"""

import glob
import io
import itertools
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from reference import hf_processor

from qomni import SamplingParams
from qomni.multimodal.audio import load_audio, log_mel_features
from qomni.multimodal.media import MediaError
from qomni.multimodal.positions import audio_token_count
from qomni.multimodal.video import load_video, load_video_audio, preprocess_video

LIBRIVOX = sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))
GREEDY_TALKER = SamplingParams(temperature=0, repetition_penalty=1.05)  # = talker_do_sample=False
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation")


# ---- media made on the fly ---------------------------------------------------------------------

def encode(frames, fps=25, audio=None, sr=16000, fmt="mp4") -> bytes:
    """An H.264 (lossless) video of RGB frames, with an AAC track when `audio` is given."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        video.options = {"qp": "0"}
        sound = out.add_stream("aac", rate=sr) if audio is not None else None
        for f in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(video.encode())
        if sound is not None:
            frame = av.AudioFrame.from_ndarray(audio[None].astype(np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate = sr
            out.mux(sound.encode(frame))
            out.mux(sound.encode())
    return buf.getvalue()


def encode_wav(samples, sr=16000) -> bytes:
    """A 16-bit PCM WAV file: audio, but no video track."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=sr)
        frame = av.AudioFrame.from_ndarray((samples[None] * 32767).astype(np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = sr
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def smooth_frames(n, h=48, w=64, seed=0):
    """Frames of moving colour gradients (resizing smooth content is what video does)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for i in range(n):
        c = rng.uniform(0, 1, 3)
        img = np.stack([np.sin(6 * (x + y) + i + 2 * c[k]) for k in range(3)], -1)
        out.append(((img + 1) * 127.5).astype(np.uint8))
    return out


def tone(seconds, sr=16000, seed=0):
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * noise).astype(np.float32)


def photo(h=70, w=100, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8))


# ---- (a) preprocessing math --------------------------------------------------------------------

def test_two_frame_video_equals_image_processor_patches():
    """A 2-frame group is laid out like an image (which repeats itself over T): channel, then
    frame, then the patch's pixels, in merge-block order. 352x384 needs no resize in either."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 352, 384, 3), dtype=np.uint8)
    pixels, grid, spg = preprocess_video(frames, fps=2.0)
    assert grid.tolist() == [1, 22, 24] and spg == 1.0
    images = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for t in range(2):
        ref = images(images=[Image.fromarray(frames[t])], return_tensors="pt")
        assert ref["image_grid_thw"].tolist() == [[1, 22, 24]]
        ours = pixels.view(-1, 3, 2, 256)[:, :, t]
        want = ref["pixel_values"].view(-1, 3, 2, 256)[:, :, t]
        # (x / 255 - 0.5) / 0.5 there, (x - 127.5) / 127.5 here: equal up to float32 rounding.
        assert (ours - want).abs().max() <= 1e-6


def test_patch_layout_by_hand():
    """3 frames (padded to 4 with the last), patch 2, merge 2: every value where the reference's
    view/permute puts it, computed with plain loops."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 4, 8, 3), dtype=np.uint8)
    pixels, grid, spg = preprocess_video(frames, fps=4.0, patch_size=2, merge_size=2,
                                         min_pixels=16, max_pixels=64)
    assert grid.tolist() == [2, 2, 4] and spg == 0.5
    padded = np.concatenate([frames, frames[-1:]])
    t_, p, m = 2, 2, 2
    # Rows: frame group, merged row, merged column, row and column inside the 2x2 merge block.
    rows = itertools.product(range(2), range(1), range(2), range(m), range(m))
    want = torch.tensor([[
        (float(padded[g * t_ + t, (bh * m + mh) * p + y, (bw * m + mw) * p + x, c]) - 127.5) / 127.5
        # Columns: channel, frame in the group, pixel row, pixel column.
        for c, t, y, x in itertools.product(range(3), range(t_), range(p), range(p))]
        for g, bh, bw, mh, mw in rows])
    assert torch.equal(pixels, want)


def test_sampling_follows_the_official_client():
    """75 frames at 25 fps: 2 fps gives 6 frames at linspace(0, 74, 6).round() (rate 2.0), 1 fps
    gives the 4-frame minimum (rate 4/75*25); 64x48 frames grow to the per-frame minimum
    128*28^2 (280x392); a small total_pixels shrinks every frame."""
    frames = [np.full((48, 64, 3), 3 * i, np.uint8) for i in range(75)]
    data = encode(frames)
    with av.open(io.BytesIO(data)) as c:
        means = np.array([f.to_ndarray(format="rgb24").mean() for f in c.decode(video=0)])

    def picked(video):
        return [int(np.abs(means - f.float().mean().item()).argmin()) for f in video.frames]

    v = load_video(data)
    assert tuple(v.frames.shape) == (6, 280, 392, 3) and v.frames.dtype == torch.uint8
    assert v.fps == 2.0 and picked(v) == [0, 15, 30, 44, 59, 74]
    v = load_video(data, fps=1.0)
    assert v.fps == pytest.approx(4 / 75 * 25) and picked(v) == [0, 25, 49, 74]
    v = load_video(data, fps=4.0, max_frames=8)
    assert len(v.frames) == 8
    v = load_video(data, min_pixels=28 * 28, total_pixels=6000)
    assert tuple(v.frames.shape[1:3]) == (28, 28)  # 56x56 is over 2 * 6000 / 6 pixels


def test_frame_list_and_its_fps():
    frames = smooth_frames(3, 56, 84)
    v = load_video([Image.fromarray(f) for f in frames])
    assert len(v.frames) == 4 and v.fps == 2.0  # padded to an even count with the last frame
    assert torch.equal(v.frames[2], v.frames[3])
    v = load_video(np.stack(frames), fps=5)
    _, grid, spg = preprocess_video(v.frames, v.fps)
    assert spg == pytest.approx(0.4) and grid[0] == 2


# ---- (b) the reference processor and thinker, with our video patches ---------------------------

class StandInVideoProcessor:
    """Stands in for the torchvision-only Qwen2VLVideoProcessor inside the real processor and
    returns our pixel values and grids."""

    merge_size, temporal_patch_size = 2, 2

    def __init__(self, processed):
        self.processed = processed

    def __call__(self, videos, **kwargs):
        return {"pixel_values_videos": torch.cat([p[0] for p in self.processed]),
                "video_grid_thw": torch.stack([p[1] for p in self.processed])}


def reference_inputs(path, conv, use_audio_in_video):
    """The real processor on `conv`: audios (and each video's sound track, decoded by us) in
    placeholder order, videos through the stand-in, the videos' sampling fps passed on."""
    proc = hf_processor(path)
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    parts = [p for m in conv if isinstance(m["content"], list) for p in m["content"]]
    videos = [load_video(p["video"], fps=p.get("fps", 2.0)) for p in parts if p["type"] == "video"]
    audio, slots, n_video = [], [], 0
    for p in parts:
        if p["type"] == "audio":
            audio.append(load_audio(p["audio"]))
            slots.append(None)
        elif p["type"] == "video":
            if use_audio_in_video:
                audio.append(load_video_audio(p["video"]))
                slots.append(n_video)
            n_video += 1
    kwargs = {}
    if videos:
        assert len({v.fps for v in videos}) == 1, "the reference takes one fps for all videos"
        proc.video_processor = StandInVideoProcessor(
            [preprocess_video(v.frames, v.fps) for v in videos])
        kwargs.update(videos=[v.frames.numpy() for v in videos], fps=videos[0].fps)
    if use_audio_in_video:
        kwargs.update(load_audio_from_video=True, audio_from_video_indices=slots)
    images = [p["image"] for p in parts if p["type"] == "image"]
    return proc(text=text, audio=audio or None, images=images or None, return_tensors="pt",
                **kwargs)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    files = {"av": d / "av.mp4", "silent": d / "silent.mp4"}
    files["av"].write_bytes(encode(smooth_frames(50, seed=2), audio=tone(2.0)))
    files["silent"].write_bytes(encode(smooth_frames(40, seed=3)))
    return files


def conversations(media):
    frames = [Image.fromarray(f) for f in smooth_frames(4, 60, 80, seed=4)]
    return {
        "video_text": ([{"role": "user", "content": [
            {"type": "video", "video": frames}, {"type": "text", "text": "What moves?"}]}], False),
        "video_audio_in_video": ([{"role": "user", "content": [
            {"type": "video", "video": str(media["av"])},
            {"type": "text", "text": "What do you hear?"}]}], True),
        "image_video_audio": ([{"role": "system", "content": "You are Qwen."}, {
            "role": "user", "content": [
                {"type": "image", "image": photo()}, {"type": "audio", "audio": tone(1.3, seed=5)},
                {"type": "video", "video": str(media["av"])}, {"type": "text", "text": "And?"}]}],
            True),
    }


@pytest.mark.parametrize("name", ["video_text", "video_audio_in_video", "image_video_audio"])
def test_ids_positions_and_prompt_logits(name, media, hf_tiny, omni_tiny):
    path, hf = hf_tiny("a")
    omni = omni_tiny("a")
    conv, aiv = conversations(media)[name]
    ref_inputs = reference_inputs(path, conv, aiv)
    ours = omni.process(conv, use_audio_in_video=aiv)
    assert ours.input_ids.tolist() == ref_inputs["input_ids"][0].tolist()
    mel = ref_inputs.get("feature_attention_mask")
    pos, _ = hf.thinker.get_rope_index(
        ref_inputs["input_ids"], ref_inputs.get("image_grid_thw"), ref_inputs["video_grid_thw"],
        ref_inputs["attention_mask"], aiv, None if mel is None else mel.sum(-1),
        ref_inputs["video_second_per_grid"])
    assert torch.equal(ours.positions, pos[:, 0])
    with torch.no_grad():
        ref = hf.thinker(**ref_inputs, use_audio_in_video=aiv).logits[0]
    d = (omni.prompt_logits(ours) - ref).abs()
    assert d.max() <= 1e-4, f"max|Δ|={d.max():.3g} mean|Δ|={d.mean():.3g}"


def test_greedy_tokens_video_text(media, hf_tiny, omni_tiny):
    path, hf = hf_tiny("a")
    omni = omni_tiny("a")
    conv, _ = conversations(media)["video_text"]
    ref_inputs = reference_inputs(path, conv, False)
    im_end = omni.config.tokens.im_end
    with torch.no_grad():
        ref = hf.thinker.generate(**ref_inputs, max_new_tokens=12, do_sample=False,
                                  eos_token_id=im_end, pad_token_id=im_end)
    out = omni.generate(conv, max_new_tokens=12, return_audio=False)
    ref_new = ref[0, ref_inputs["input_ids"].shape[1]:].tolist()
    assert out.token_ids + ([im_end] if out.finish_reason == "stop" else []) == ref_new


# ---- (c) a real video with speech, text and speech out ------------------------------------------

@pytest.fixture(scope="module")
def real_video(tmp_path_factory):
    """Two photos (scikit-image, or ffmpeg's test pattern) for 1.6 s each, with a LibriVox clip
    ("he was not an ill disposed young man", 2.99 s): H.264 320x240 at 25 fps + AAC 16 kHz."""
    if shutil.which("ffmpeg") is None or not LIBRIVOX:
        pytest.skip("needs ffmpeg and pocketsphinx-testdata (LibriVox speech)")
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        inputs = ["-i", str(data / "astronaut.png"), "-i", str(data / "coffee.png")]
    except ImportError:
        inputs = ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=1", "-f", "lavfi", "-i",
                  "testsrc2=size=320x240:rate=1"]
    speech = next(p for p in LIBRIVOX if p.endswith("0880.wav"))
    zoom = "scale=320:240,setsar=1,zoompan=z='min(zoom+0.002,1.2)':d=40:s=320x240:fps=25"
    graph = f"[0:v]{zoom}[v0];[1:v]{zoom}[v1];[v0][v1]concat=n=2:v=1:a=0,format=yuv420p[v]"
    out = tmp_path_factory.mktemp("real") / "real_av.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *inputs, "-i", speech,
                    "-filter_complex", graph, "-map", "[v]", "-map", "2:a", "-c:v", "libx264",
                    "-preset", "veryfast", "-crf", "28", "-c:a", "aac", "-ar", "16000", "-ac", "1",
                    "-shortest", str(out)], check=True, timeout=60)
    return out


def runs(ids, tok):
    """Run lengths of video/audio placeholders inside the first audio-in-video block."""
    body = ids[ids.index(tok.audio_start) + 1: ids.index(tok.audio_end)]
    out = []
    for x in body:
        kind = "V" if x == tok.video else "A"
        if out and out[-1][0] == kind:
            out[-1][1] += 1
        else:
            out.append([kind, 1])
    return [tuple(r) for r in out]


def test_real_video_through_generate(real_video, omni_tiny):
    omni = omni_tiny("a")
    tok = omni.config.tokens
    conv = [{"role": "user", "content": [{"type": "video", "video": str(real_video)},
                                         {"type": "text", "text": "What is said?"}]}]
    with av.open(str(real_video)) as c:
        total, rate = c.streams.video[0].frames, float(c.streams.video[0].average_rate)
    n = 2 * int(min(total / rate * 2, total) // 2)  # the client's 2-fps frame count
    assert n == 6
    track = load_video_audio(real_video)
    _, mel = log_mel_features([track])
    n_audio = audio_token_count(int(mel[0]), 50)
    x = omni.process(conv, use_audio_in_video=True)
    # 240x320 -> 280x392 (client, factor 28) -> 320x448 (processor, factor 32): 10x14 merged
    # tokens per 2-frame group. 6 of 80 frames at 25 fps is 1.875 fps, 1.0667 s per group, so
    # group g sits at audio position 13.87 * g: 14 audio tokens between groups.
    assert x.media.video_grid_thw.tolist() == [[3, 20, 28]]
    assert x.media.video_second_per_grid.tolist() == [pytest.approx(2 / (n / total * rate))]
    assert runs(x.input_ids.tolist(), tok) == [("V", 140), ("A", 14), ("V", 140), ("A", 14),
                                               ("V", 140), ("A", n_audio - 28)]
    out = omni.generate(conv, use_audio_in_video=True, max_new_tokens=4, return_audio=False)
    assert 1 <= len(out.token_ids) <= 4


def reference_speech(hf, inputs, *, text_tokens, frames):
    """The reference's generate() with speech, greedy talker, use_audio_in_video: the new token
    ids and the codec codes [16, F] it decodes (caught on their way to code2wav)."""
    hf.talker.config.audio_config = hf.config.thinker_config.audio_config  # Q1 workaround
    captured = {}
    original = hf.code2wav.chunked_decode

    def spy(codes, **kw):
        captured["codes"] = codes
        return original(codes, **kw)

    hf.code2wav.chunked_decode = spy
    try:
        with torch.no_grad():
            seqs, _ = hf.generate(**inputs, use_audio_in_video=True, speaker="Ethan",
                                  thinker_max_new_tokens=text_tokens,
                                  talker_max_new_tokens=frames + 1, talker_do_sample=False)
    finally:
        hf.code2wav.chunked_decode = original
    return seqs[0, inputs["input_ids"].shape[1]:].tolist(), captured["codes"][0]


def test_real_video_speech_matches_reference(real_video, hf_tiny, omni_tiny):
    path, hf = hf_tiny("a")
    omni = omni_tiny("a")
    conv = [{"role": "user", "content": [{"type": "video", "video": str(real_video)},
                                         {"type": "text", "text": "What is said?"}]}]
    ref_ids, ref_codes = reference_speech(hf, reference_inputs(path, conv, True), text_tokens=4,
                                          frames=6)
    out = omni.generate(conv, use_audio_in_video=True, max_new_tokens=4, return_audio=True,
                        max_audio_frames=6, talker_sampling=GREEDY_TALKER)
    im_end = omni.config.tokens.im_end
    assert out.token_ids + ([im_end] if out.finish_reason == "stop" else []) == ref_ids
    assert out.codes.shape[1] > 0 and torch.equal(out.codes, ref_codes)


@pytest.mark.slow
def test_mixed_prompt_speech_matches_reference(media, hf_tiny, omni_tiny):
    """The reference's talker loses use_audio_in_video: a sound-carrying video after the last
    image gets plain text positions there, one before it the audio-in-video ones. Both orders."""
    path, hf = hf_tiny("a")
    omni = omni_tiny("a")
    video = {"type": "video", "video": str(media["av"])}
    image = {"type": "image", "image": photo(seed=6)}
    for content in ([video, image], [image, video]):
        conv = [{"role": "user", "content": [*content, {"type": "text", "text": "Hm?"}]}]
        _, ref_codes = reference_speech(hf, reference_inputs(path, conv, True), text_tokens=3,
                                        frames=5)
        out = omni.generate(conv, use_audio_in_video=True, max_new_tokens=3, return_audio=True,
                            max_audio_frames=5, talker_sampling=GREEDY_TALKER)
        assert torch.equal(out.codes, ref_codes)


# ---- (d) bad input ------------------------------------------------------------------------------

def frameless_video(width=64, height=48) -> bytes:
    """A Matroska file whose video track (width x height, says its header) has no frames; only
    its audio track has packets."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        video = out.add_stream("rawvideo", rate=25)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        out.mux(sound.encode(frame))
        out.mux(sound.encode())
    return buf.getvalue()


@pytest.mark.parametrize("src, message", [
    (b"\x00\x01garbage" * 64, "not a readable video file"),
    ("zero_frames", "has no frames"),
    ("huge_frames", "12000x9000 frames are over the 100-megapixel limit"),
    ("one_frame", "at least 2"),
    ("half_file", "video #1"),
    ("audio_only", "no video track"),
    ([np.zeros((1, 1000, 3), np.uint8)] * 2, "aspect ratio"),
    ([np.zeros((0, 16, 3), np.uint8)], "zero size"),
    ([np.zeros((56, 56, 3), np.uint8), np.zeros((56, 112, 3), np.uint8)], "one size"),
    ([], "empty"),
])
def test_bad_videos_are_media_errors(src, message, media, omni_tiny):
    made = {"zero_frames": frameless_video,
            "huge_frames": lambda: frameless_video(12000, 9000),
            "one_frame": lambda: encode(smooth_frames(1)),
            "half_file": lambda: media["av"].read_bytes()[:3000],
            "audio_only": lambda: encode_wav(tone(0.5))}
    if isinstance(src, str):
        src = made[src]()
    conv = [{"role": "user", "content": [{"type": "video", "video": src}]}]
    with pytest.raises(MediaError, match=message) as err:
        omni_tiny("a").process(conv)
    assert str(err.value).startswith("video #1")


def test_audio_in_video_needs_a_sound_track(media, omni_tiny):
    omni = omni_tiny("a")
    silent = [{"role": "user", "content": [{"type": "video", "video": str(media["av"])},
                                           {"type": "video", "video": str(media["silent"])}]}]
    with pytest.raises(MediaError, match=r"video #2: the video has no audio track"):
        omni.process(silent, use_audio_in_video=True)
    frames = [{"role": "user", "content": [{"type": "video", "video": smooth_frames(2)}]}]
    with pytest.raises(MediaError, match="list of frames has no sound track"):
        omni.process(frames, use_audio_in_video=True)
    assert len(omni.process(silent)) > 0  # without the flag a silent video is fine


def test_bad_fps_and_frame_arrays():
    with pytest.raises(MediaError, match="fps"):
        load_video(smooth_frames(2), fps=0)
    with pytest.raises(MediaError, match="fps"):
        preprocess_video(np.zeros((2, 32, 32, 3), np.uint8), fps=float("nan"))
    with pytest.raises(MediaError, match=r"\[T, H, W, 3\]"):
        preprocess_video(np.zeros((32, 32, 3), np.uint8), fps=2)
    with pytest.raises(MediaError, match="over the limit"):
        load_video(smooth_frames(5), max_frames=4)
