"""Placeholder expansion equal to transformers' processor, and M-RoPE positions equal (bit for bit,
float32) to the reference's `get_rope_index`, single and left-padded batched."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference import TINY_A, hf_config, hf_processor

from qomni.config import OmniConfig
from qomni.multimodal.positions import (
    audio_token_count,
    expand_placeholders,
    rope_index,
)
from qomni.tiny import ASSETS, PREPROCESSOR_CONFIG, write_tokenizer

TOK = OmniConfig.from_hf(TINY_A).tokens
N_WINDOW, MERGE, PPS = 50, 2, 13.0
KW = {"merge_size": MERGE, "position_id_per_seconds": PPS}


@pytest.fixture(scope="module")
def hf_thinker():
    """The reference thinker on the meta device: get_rope_index only needs its config."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    with torch.device("meta"):
        return Qwen3OmniMoeThinkerForConditionalGeneration(hf_config("a").thinker_config)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc")
    write_tokenizer(d)
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    template = (ASSETS / "chat_template.jinja").read_text()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return hf_processor(d)


# ---- prompts in token-id space ------------------------------------------------------------------

IMG = [TOK.vision_start, TOK.image, TOK.vision_end]
VID = [TOK.vision_start, TOK.video, TOK.vision_end]
AUD = [TOK.audio_start, TOK.audio, TOK.audio_end]
NL = 198


def text(n, seed=0):
    return [1000 + (seed * 37 + 11 * i) % 5000 for i in range(n)]


def turn(role, *parts):
    return [TOK.im_start, role, NL, *[t for p in parts for t in p], TOK.im_end, NL]


def system(n=6):
    return turn(TOK.system, text(n, 1))


GEN = [TOK.im_start, TOK.assistant, NL]


class Case:
    """A raw prompt (one placeholder per medium) and its media: standalone audio mel lengths,
    image grids, video grids + seconds per grid, and (audio in video) each video's mel length."""

    def __init__(self, raw, audio=(), images=(), videos=(), spg=(), video_audio=None):
        self.raw, self.audio, self.images, self.videos = raw, list(audio), list(images), list(videos)
        self.spg, self.video_audio = list(spg), video_audio
        self.aiv = video_audio is not None

    def ids(self):
        return expand_placeholders(
            self.raw, TOK, audio_token_counts=[audio_token_count(n, N_WINDOW) for n in self.audio],
            image_grids=self.images, video_grids=self.videos, video_second_per_grid=self.spg,
            use_audio_in_video=self.aiv,
            video_audio_token_counts=[audio_token_count(n, N_WINDOW)
                                      for n in (self.video_audio or [])], **KW)

    def audio_lengths(self):
        """Mel lengths in order of appearance (audio-in-video tracks included)."""
        standalone, tracks, out = iter(self.audio), iter(self.video_audio or []), []
        for x in self.raw:
            if x == TOK.audio:
                out.append(next(standalone))
            elif x == TOK.video and self.aiv:
                out.append(next(tracks))
        return out

    def ours(self):
        return rope_index(self.ids(), TOK, image_grids=self.images, video_grids=self.videos,
                          video_second_per_grid=self.spg, audio_lengths=self.audio_lengths(),
                          n_window=N_WINDOW, use_audio_in_video=self.aiv, **KW)


def hf_rope(model, ids, mask, *, images=(), videos=(), spg=(), audio=(), aiv=False,
            force_grid_branch=False):
    def grid(g):
        return torch.tensor(g, dtype=torch.long).view(-1, 3) if g else None

    image_grid = grid(images)
    if force_grid_branch and image_grid is None:
        image_grid = torch.zeros(0, 3, dtype=torch.long)  # takes the walk, not the cumsum branch
    return model.get_rope_index(
        ids, image_grid, grid(videos), mask, aiv,
        torch.tensor(audio, dtype=torch.long) if audio else None,
        torch.tensor(spg, dtype=torch.float32) if spg else None)


CASES = {
    "text": Case(system() + turn(TOK.user, text(9)) + GEN),
    "audio": Case(system() + turn(TOK.user, AUD, text(5)) + GEN, audio=[330]),
    "two_audios": Case(turn(TOK.user, text(3), AUD, AUD, text(4)) + GEN, audio=[330, 1000]),
    "audio_turns": Case(system() + turn(TOK.user, AUD, text(4)) + turn(TOK.assistant, text(7, 2))
                        + turn(TOK.user, text(2, 3), AUD) + GEN, audio=[150, 77]),
    "image_small": Case(system() + turn(TOK.user, IMG, text(5)) + GEN, images=[(1, 4, 6)]),
    "image_large": Case(turn(TOK.user, text(2), IMG, text(5)) + GEN, images=[(1, 28, 40)]),
    "image_wide": Case(turn(TOK.user, IMG) + GEN, images=[(1, 4, 64)]),
    "two_images": Case(turn(TOK.user, IMG, text(3), IMG) + GEN, images=[(1, 4, 6), (1, 12, 8)]),
    "video_2s": Case(turn(TOK.user, VID, text(4)) + GEN, videos=[(4, 6, 8)], spg=[2.0]),
    "video_05s": Case(turn(TOK.user, text(2), VID, text(4)) + GEN, videos=[(4, 4, 6)], spg=[0.5]),
    "video_third": Case(turn(TOK.user, VID, text(3), VID, text(4)) + GEN,
                        videos=[(6, 4, 4), (9, 2, 2)], spg=[1 / 3, 2 / 7]),
    "aiv_notes": Case(turn(TOK.user, VID, text(3)) + GEN, videos=[(3, 4, 4)], spg=[2.0],
                      video_audio=[200]),
    "aiv_long": Case(system() + turn(TOK.user, text(2), VID, text(3)) + GEN,
                     videos=[(8, 6, 8)], spg=[2.0], video_audio=[1530]),
    "aiv_05s": Case(turn(TOK.user, VID, text(3)) + GEN, videos=[(6, 4, 6)], spg=[0.5],
                    video_audio=[420]),
    # one frame group, tall grid, short audio: the audio tail ends the reference's walk, so the
    # end tokens sit at audio max + 1, below the video's h maximum
    "aiv_short_audio": Case(turn(TOK.user, VID, text(3)) + GEN, videos=[(1, 40, 4)], spg=[2.0],
                            video_audio=[30]),
    # fps 30: at group 45 (t = 39) the processor's float64 time ties with audio token 39 and puts
    # the video first; the model's float32 time is 39.000004 and it puts the audio first
    "aiv_fps30": Case(turn(TOK.user, VID, text(3)) + GEN, videos=[(50, 2, 2)], spg=[2 / 30],
                      video_audio=[400]),
    "mixed_turns": Case(
        system() + turn(TOK.user, IMG, AUD, text(4)) + turn(TOK.assistant, text(6, 4))
        + turn(TOK.user, VID, text(3), IMG) + turn(TOK.assistant, text(3, 5))
        + turn(TOK.user, AUD, VID, text(2)) + GEN,
        audio=[330, 260], images=[(1, 4, 6), (1, 8, 10)], videos=[(3, 6, 4), (4, 4, 4)],
        spg=[0.5, 2.0]),
    "mixed_aiv": Case(
        system() + turn(TOK.user, AUD, VID, text(2)) + turn(TOK.assistant, text(4, 6))
        + turn(TOK.user, IMG, VID, AUD, text(3)) + GEN,
        audio=[180, 90], images=[(1, 6, 6)], videos=[(4, 4, 6), (2, 2, 4)], spg=[0.5, 2.0],
        video_audio=[260, 64]),
}


@pytest.mark.parametrize("name", CASES)
def test_rope_index_equals_reference(name, hf_thinker):
    case = CASES[name]
    ids = case.ids()
    pos, delta = case.ours()
    assert pos.dtype == torch.float32 and pos.shape == (3, len(ids))
    x = torch.tensor([ids])
    for force in (False, True):
        want, want_delta = hf_rope(hf_thinker, x, torch.ones_like(x), images=case.images,
                                   videos=case.videos, spg=case.spg, audio=case.audio_lengths(),
                                   aiv=case.aiv, force_grid_branch=force)
        assert torch.equal(pos, want[:, 0]), (pos - want[:, 0]).abs().max()
        assert delta == want_delta.item()


def test_audio_in_video_layout_from_the_notes():
    """Grid (3,4,4), 26 audio tokens, 2 s/grid: VVVV A*26 VVVVVVVV, t = st..., ends at max+1."""
    case = CASES["aiv_notes"]
    ids = case.ids()
    s = ids.index(TOK.vision_start)
    body = ids[s + 2: s + 2 + 12 + 26]
    assert body == [TOK.video] * 4 + [TOK.audio] * 26 + [TOK.video] * 8
    assert ids[s: s + 2] == [TOK.vision_start, TOK.audio_start]
    assert ids[s + 40: s + 42] == [TOK.audio_end, TOK.vision_end]
    pos, _ = case.ours()
    st = s + 2
    t = pos[0, st: st + 38].tolist()
    assert t == [st] * 4 + list(range(st, st + 26)) + [st + 26] * 4 + [st + 52] * 4
    assert pos[0, st + 38: st + 40].tolist() == [st + 53, st + 54]


def test_reference_layout_and_positions_disagree_at_fps30():
    """A reference defect we reproduce: both sides are matched, so audio token 39 gets a video
    position (t = st + 39.000004, its own h/w) and a video token gets audio position st + 39."""
    case = CASES["aiv_fps30"]
    ids, (pos, _) = case.ids(), case.ours()
    st = ids.index(TOK.audio_start) + 1
    audio = [i for i, x in enumerate(ids) if x == TOK.audio]
    wrong = [k for k, i in enumerate(audio) if pos[:, i].tolist() != [st + k] * 3]
    assert wrong == [39] and 0 < pos[0, audio[39]].item() - (st + 39) < 1e-4


def test_fractional_positions_are_kept():
    pos, delta = CASES["video_05s"].ours()
    assert (pos.frac() != 0).any() and delta != int(delta)


def test_audio_token_count_equals_reference():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        _get_feat_extract_output_lengths,
    )

    lengths = torch.arange(0, 2500)
    want = _get_feat_extract_output_lengths(lengths, 50).tolist()
    assert [audio_token_count(n, 50) for n in range(2500)] == want
    assert audio_token_count(100, 50) == 13 and audio_token_count(330, 50) == 43


# ---- left-padded batches --------------------------------------------------------------------------

def _left_pad(seqs):
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s)
        mask[b, width - len(s):] = 1
    return ids, mask


def rope_index_batch(ids, mask, *, images, videos, spg, audio, aiv):
    """The reference's batched call built on `rope_index`: ids [B, S] with a left-padding mask ->
    positions [3, B, S] and deltas [B, 1], float32. Media lists run over the whole batch, row by
    row. Padding positions are 0, or 1 when no image/video grid is given at all (the reference
    then uses cumsum(mask) - 1 for every row)."""
    if not images and not videos:
        pos = mask.float().cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        pos = pos.unsqueeze(0).expand(3, -1, -1)
        return pos, pos.max(0)[0].max(-1, keepdim=True)[0] + 1 - mask.sum(-1, keepdim=True)
    out = torch.zeros(3, *ids.shape, dtype=torch.float32)
    deltas = []
    ii = vi = ai = 0
    for b in range(ids.shape[0]):
        row = ids[b][mask[b] == 1].tolist()
        after = [(row[k + 1] if k + 1 < len(row) else None)
                 for k, x in enumerate(row) if x == TOK.vision_start]
        ni = after.count(TOK.image)
        nv = after.count(TOK.video) + after.count(TOK.audio_start)
        na = row.count(TOK.audio_start)
        pos, _ = rope_index(
            row, TOK, image_grids=images[ii:ii + ni], video_grids=videos[vi:vi + nv],
            video_second_per_grid=spg[vi:vi + nv], audio_lengths=audio[ai:ai + na],
            n_window=N_WINDOW, use_audio_in_video=aiv, **KW)
        out[:, b, mask[b] == 1] = pos
        deltas.append(pos.max() + 1 - len(row))
        ii, vi, ai = ii + ni, vi + nv, ai + na
    return out, torch.stack(deltas).view(-1, 1)


@pytest.mark.parametrize("names", [("mixed_turns", "text", "video_05s"),
                                   ("aiv_notes", "mixed_aiv", "image_small"),
                                   ("audio", "text", "two_audios")])
def test_left_padded_batch_equals_reference(names, hf_thinker):
    cases = [CASES[n] for n in names]
    aiv = any(c.aiv for c in cases)
    ids, mask = _left_pad([c.ids() for c in cases])
    media = {"images": [g for c in cases for g in c.images],
             "videos": [g for c in cases for g in c.videos],
             "spg": [s for c in cases for s in c.spg],
             "audio": [n for c in cases for n in c.audio_lengths()]}
    want, want_delta = hf_rope(hf_thinker, ids, mask, aiv=aiv, **media)
    got, delta = rope_index_batch(ids, mask, aiv=aiv, **media)
    assert torch.equal(got, want) and torch.equal(delta, want_delta)
    for b, c in enumerate(cases):  # the single-sequence API gives the unpadded rows
        pos, d = c.ours()
        assert torch.equal(got[:, b, mask[b] == 1], pos) and d == delta[b].item()


# ---- expansion equal to the processor ------------------------------------------------------------

def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _audio(seconds, seed):
    return np.random.default_rng(seed).standard_normal(int(seconds * 16000)).astype(np.float32) * .1


def _raw_ids(processor, prompt):
    return processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_model_card_image_audio_text(processor, hf_thinker):
    """The model card's message through the real processor; then our expansion and positions."""
    messages = [{"role": "user", "content": [
        {"type": "image", "image": "cars.jpg"}, {"type": "audio", "audio": "cough.wav"},
        {"type": "text", "text": "What can you see and hear? Answer in one short sentence."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor(text=[prompt], images=[_image(100, 70, 0)], audio=[_audio(3.3, 1)],
                    return_tensors="pt")
    grids = out["image_grid_thw"].tolist()
    mel = out["feature_attention_mask"].sum(-1).tolist()
    assert grids == [[1, 4, 6]] and [audio_token_count(n, N_WINDOW) for n in mel] == [43]
    ids = expand_placeholders(_raw_ids(processor, prompt), TOK, image_grids=grids,
                              audio_token_counts=[audio_token_count(n, N_WINDOW) for n in mel],
                              **KW)
    assert ids == out["input_ids"][0].tolist()
    pos, delta = rope_index(ids, TOK, image_grids=grids, audio_lengths=mel, n_window=N_WINDOW, **KW)
    want, want_delta = hf_thinker.get_rope_index(out["input_ids"], out["image_grid_thw"], None,
                                                 out["attention_mask"], False,
                                                 out["feature_attention_mask"].sum(-1), None)
    assert torch.equal(pos, want[:, 0]) and delta == want_delta.item()


def test_images_and_audios_in_turns_match_processor(processor):
    messages = [
        {"role": "system", "content": "You are Qwen."},
        {"role": "user", "content": [{"type": "audio", "audio": "a"}, {"type": "image", "image": "b"},
                                     {"type": "text", "text": "Hi"}, {"type": "audio", "audio": "c"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "image", "image": "d"}, {"type": "text", "text": "?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor(text=[prompt], images=[_image(64, 96, 2), _image(300, 200, 3)],
                    audio=[_audio(1.0, 4), _audio(2.57, 5)], return_tensors="pt")
    mel = out["feature_attention_mask"].sum(-1).tolist()
    ids = expand_placeholders(_raw_ids(processor, prompt), TOK,
                              image_grids=out["image_grid_thw"].tolist(),
                              audio_token_counts=[audio_token_count(n, N_WINDOW) for n in mel],
                              **KW)
    assert ids == out["input_ids"][0].tolist()


class _FakeVideoProcessor:
    """Stands in for the torchvision-only video processor: only the grids matter to the text."""

    merge_size, temporal_patch_size = MERGE, 2

    def __init__(self, grids):
        self.grids = grids

    def __call__(self, videos, **kwargs):
        return {"video_grid_thw": torch.tensor(self.grids)}


@pytest.mark.filterwarnings("ignore:__array__ implementation")
@pytest.mark.parametrize("fps", [1.0, 4.0, 6.0, 30.0])
@pytest.mark.parametrize("mode", ["plain", "aiv", "aiv_silent"])
def test_video_expansion_matches_processor(processor, fps, mode):
    grids = [[3, 4, 4], [48, 2, 4]]  # 48 groups reach the fps-30 tie at t = 39
    messages = [{"role": "user", "content": [
        {"type": "video", "video": "a.mp4"}, {"type": "audio", "audio": "x.wav"},
        {"type": "text", "text": "and"}, {"type": "video", "video": "b.mp4"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    videos = [np.zeros((2 * g[0], 32 * g[1] // 2, 32 * g[2] // 2, 3), np.uint8) for g in grids]
    clips = [_audio(2.0, 6), _audio(1.3, 7), _audio(4.1, 8)]
    processor.video_processor = _FakeVideoProcessor(grids)
    try:
        if mode == "aiv":  # audio slots in order: video 0's track, the clip, video 1's track
            out = processor(text=[prompt], videos=videos, fps=fps, load_audio_from_video=True,
                            audio=clips, audio_from_video_indices=[0, None, 1])
        elif mode == "aiv_silent":  # video 1 has no sound track
            out = processor(text=[prompt], videos=videos, fps=fps, load_audio_from_video=True,
                            audio=clips[:2], audio_from_video_indices=[0, None])
        else:
            out = processor(text=[prompt], videos=videos, fps=fps, audio=clips[1:2])
    finally:
        processor.video_processor = None
    counts = [audio_token_count(int(n), N_WINDOW) for n in out["feature_attention_mask"].sum(-1)]
    tracks = [] if mode == "plain" else [counts[0], counts[2] if mode == "aiv" else None]
    ids = expand_placeholders(
        _raw_ids(processor, prompt), TOK, video_grids=grids,
        video_second_per_grid=list(out["video_second_per_grid"]),
        audio_token_counts=counts[1:2] if mode != "plain" else counts,
        use_audio_in_video=mode != "plain", video_audio_token_counts=tracks, **KW)
    assert ids == out["input_ids"][0]


# ---- errors --------------------------------------------------------------------------------------

def test_mismatched_media_is_an_error():
    with pytest.raises(ValueError, match="image"):
        expand_placeholders(turn(TOK.user, IMG, IMG), TOK, image_grids=[(1, 4, 4)], **KW)
    ids = CASES["image_small"].ids()
    with pytest.raises(ValueError):
        rope_index(ids, TOK, image_grids=[(1, 4, 8)], n_window=N_WINDOW, **KW)
    with pytest.raises(ValueError, match="use_audio_in_video"):
        rope_index(CASES["aiv_notes"].ids(), TOK, video_grids=[(3, 4, 4)],
                   video_second_per_grid=[2.0], audio_lengths=[200], n_window=N_WINDOW, **KW)
