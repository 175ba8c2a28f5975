"""Speech: the talker's prompt from thinker states, the frame loop, and codes -> waveform.

Legend: B rows, S thinker prompt tokens, Dt thinker hidden, D talker hidden, P talker prompt
tokens, G codebooks per frame, F frames, V talker codec vocabulary.

The talker prompt follows the reference: every user turn, token by token —
`hidden_projection` of the thinker's layer-`accept_hidden_layer` state at audio/image/video
placeholders, `text_projection` of the token embedding elsewhere — then the 9 assistant
positions. These read the assistant segment S: the prompt's tokens from its last
`<|im_start|>assistant` on (the "header", `<|im_start|>assistant\\n` with the default template),
then the generated tokens. S[0:3] (with no codec), tts_pad ×4 with nothink/think_bos/think_eos/
speaker codes, tts_bos with codec_pad, S[3] with codec_bos. Each later talker step adds the next
entry of S ("trailing text"), then tts_eos once the text ends, then tts_pad. Frame n's
codebook-0 code comes from the talker; codebooks 1..G-1 from the code predictor, one step later
— so F frames take F code-predictor passes and the EOS (or the cap) never becomes a frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch

from qomni.config import OmniConfig, SpecialTokens
from qomni.models.model import OmniModel
from qomni.models.talker import Talker
from qomni.multimodal.positions import rope_index
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import SamplingParams

# The reference's code-predictor sampling when the talker samples (fixed, not in any config).
CODE_PREDICTOR_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.8)
ASSISTANT_POSITIONS = 9  # the talker prompt after its user turns
DEFAULT_SPEAKER = "Ethan"  # the reference's default voice


class Trailing(Enum):
    """Talker inputs once the text has run out: its end marker once, then padding."""

    EOS = "tts_eos"
    PAD = "tts_pad"


class SpeechText(NamedTuple):
    """The generated tokens the talker may read so far."""

    tokens: list[int]
    done: bool  # that is all of them; the last one is never embedded (as the reference's)
    stopped: bool  # the last one is no text: a stop token, or where a stop string begins
    eos: bool  # the last one is the thinker's stop token


@dataclass
class TalkerPrompt:
    embeds: torch.Tensor  # [P, D]
    positions: torch.Tensor  # [3, P] float32
    rope_delta: float
    header: int  # prompt tokens in the assistant segment S
    tail: torch.Tensor  # [max(header - 4, 0), D] S[4:header] projected: trailing text


def talker_sampling_defaults(generation_config: dict) -> SamplingParams:
    """The checkpoint's talker sampling (generation_config.json), reference defaults otherwise."""
    g = generation_config
    return SamplingParams(temperature=float(g.get("talker_temperature", 0.9)),
                          top_k=int(g.get("talker_top_k", 50)),
                          top_p=float(g.get("talker_top_p", 1.0)),
                          repetition_penalty=float(g.get("talker_repetition_penalty", 1.05)))


def assistant_header(ids: torch.Tensor, tok: SpecialTokens) -> int:
    """How many of the prompt's tokens [S] the assistant segment S starts with: from its last
    `<|im_start|>assistant` on."""
    is_start = (ids[:-1] == tok.im_start) & (ids[1:] == tok.assistant)
    if not bool(is_start.any()):
        raise ValueError("the prompt has no `<|im_start|>assistant` turn for the talker to follow")
    return ids.shape[0] - int(is_start.nonzero()[-1])


def talker_prompt_ready(header: int, text: SpeechText) -> bool | None:
    """Whether the talker prompt can be built (S[0:4] known): True; None: not yet; False: the
    text ended with nothing to say."""
    known = header + len(text.tokens)
    if not text.done:
        return True if known >= 4 else None
    # S[3] may be the text's last token, unless that one is no text
    return known > 4 or (known == 4 and not (header < 4 and text.stopped))


def build_talker_prompt(cfg: OmniConfig, talker: Talker, x: ProcessedInputs,
                        embeds: torch.Tensor, hidden: torch.Tensor, generated: torch.Tensor,
                        pad_bos: tuple[torch.Tensor, torch.Tensor],
                        speaker_id: int) -> TalkerPrompt:
    """embeds [S, Dt]: the thinker's input embeddings (media features in place);
    hidden [S, Dt]: its hidden state after `accept_hidden_layer` layers; generated [k, Dt]:
    the input embeddings of the first generated tokens, as many as a header shorter than 4
    tokens needs (`talker_prompt_ready`); all on the talker's device. pad_bos: tts_pad and
    tts_bos as talker text [D] (`special_embeds`)."""
    tok, tcfg = cfg.tokens, cfg.talker
    ids = x.input_ids.to(embeds.device)
    s = ids.shape[0]
    # Role of every token: the token after the last <|im_start|> at or before it.
    starts = torch.where(ids == tok.im_start, torch.arange(s, device=ids.device), -1)
    prev = torch.cummax(starts, 0).values.clamp_min(0)
    user = ids[(prev + 1).clamp_max(s - 1)] == tok.user
    media = (ids == tok.audio) | (ids == tok.image) | (ids == tok.video)
    user_ids = ids[user]
    user_media = media[user]
    part = torch.empty(user_ids.shape[0], tcfg.text.hidden_size, dtype=embeds.dtype,
                       device=embeds.device)
    if bool(user_media.any()):
        part[user_media] = talker.hidden_projection(hidden[user][user_media])
    part[~user_media] = talker.text_projection(embeds[user][~user_media])

    header = assistant_header(ids, tok)
    a = s - header
    rows = embeds[a: a + 4]  # S[0:4], completed by generated tokens for a short header
    if rows.shape[0] < 4:
        rows = torch.cat([rows, generated[: 4 - rows.shape[0]]])
    assistant = talker.text_projection(rows)  # [4, D]
    tail = talker.text_projection(embeds[a + 4:])
    pad, bos = pad_bos
    text = torch.cat([assistant[:3], pad.expand(4, -1), bos[None], assistant[3:4]])
    codec_ids = torch.tensor([tcfg.codec_nothink_id, tcfg.codec_think_bos_id,
                              tcfg.codec_think_eos_id, speaker_id, tcfg.codec_pad_id,
                              tcfg.codec_bos_id], device=ids.device)
    codec = torch.cat([torch.zeros(3, text.shape[1], dtype=text.dtype, device=text.device),
                       talker.embed(codec_ids)])
    prompt = torch.cat([part, text + codec])

    talker_ids = torch.cat([user_ids, torch.full((ASSISTANT_POSITIONS,), tok.tts_pad,
                                                 device=ids.device)])
    has_media = x.media.audio_lengths is not None or x.media.image_grid_thw is not None \
        or x.media.video_grid_thw is not None
    if has_media:
        pos_ids, videos, spg, audios = talker_id_view(
            talker_ids.tolist(), tok, _grids(x.media.video_grid_thw),
            _values(x.media.video_second_per_grid), _values(x.media.audio_lengths))
        positions, delta = rope_index(
            pos_ids, tok, image_grids=_grids(x.media.image_grid_thw), video_grids=videos,
            video_second_per_grid=spg, audio_lengths=audios,
            # The talker's config has no audio n_window (a reference bug); it is the
            # thinker's, which is what the reference uses once patched.
            n_window=cfg.thinker.audio.n_window, merge_size=tcfg.spatial_merge_size,
            position_id_per_seconds=tcfg.position_id_per_seconds,
            use_audio_in_video=x.use_audio_in_video)
    else:
        positions, delta = torch.arange(prompt.shape[0]).float().expand(3, -1), 0.0
    return TalkerPrompt(prompt, positions.to(prompt.device), delta, header, tail)


def talker_id_view(ids: list[int], tok: SpecialTokens, video_grids: list, spg: list,
                   audio_lengths: list) -> tuple[list[int], list, list, list]:
    """The talker prompt's ids and media lists as the reference's talker positions see them.

    The reference never passes use_audio_in_video to its talker (its generate() forwards only
    the grids), so the talker's position walk recognises an audio-in-video block only while an
    image is still ahead of it; a block after the last image is read as an audio clip followed by
    text, which gives each of its tokens the next text position. Such blocks become text here
    (their video and sound track leave the lists), so `rope_index` reproduces the reference."""
    image_starts = [i for i in range(len(ids) - 1)
                    if ids[i] == tok.vision_start and ids[i + 1] == tok.image]
    last_image = image_starts[-1] if image_starts else -1
    out = list(ids)
    keep_video, keep_audio = [], []
    n_video = n_audio = 0
    i = 0
    while i < len(ids) - 1:
        if ids[i] == tok.vision_start and ids[i + 1] == tok.audio_start:
            end = ids.index(tok.vision_end, i)
            if i > last_image:
                out[i: end + 1] = [tok.tts_pad] * (end + 1 - i)  # any non-media id is text
            else:
                keep_video.append(n_video)
                keep_audio.append(n_audio)
            n_video, n_audio, i = n_video + 1, n_audio + 1, end + 1
            continue
        if ids[i] == tok.vision_start and ids[i + 1] == tok.video:
            keep_video.append(n_video)
            n_video += 1
        elif ids[i] == tok.audio_start:
            keep_audio.append(n_audio)
            n_audio += 1
        i += 1
    return (out, [video_grids[k] for k in keep_video], [spg[k] for k in keep_video],
            [audio_lengths[k] for k in keep_audio])


def special_embeds(talker: Talker, embeds: torch.Tensor) -> list[torch.Tensor]:
    """text_projection of thinker token embeddings [n, Dt] (tts_pad / tts_bos / tts_eos), each
    [D]."""
    return list(talker.text_projection(embeds.to(talker.model.norm.weight.device)))


def thinker_embeds(model: OmniModel, ids: Sequence[int]) -> torch.Tensor:
    """The thinker's input embeddings of token ids: [n, Dt]."""
    device = model.thinker.model.norm.weight.device
    return model.thinker.embed(torch.tensor(list(ids), device=device))


def trailing_text(header: int, text: SpeechText, n: int) -> int | Trailing | None:
    """What talker step n (after frame n's code0) adds to its input: an index i into the
    assistant segment S (its `header` prompt tokens, then `text.tokens`) for S[i], tts_eos,
    tts_pad, or None while the thinker has not produced what is needed.

    As the reference: the entries S[4:] without S's last token (never embedded), then tts_eos,
    then tts_pad; except that entry e becomes tts_eos and those after it tts_pad, e being the
    number of generated tokens before the thinker's stop token (all of them when there is
    none). With a 3-token header the entries end there anyway; with a longer one the
    reference cuts the text that many tokens short, and so does this."""
    g = len(text.tokens)
    if not text.done:
        # S[4 + n] exists and is not the last, and no stop token can come at or before n.
        return 4 + n if n < g and 4 + n < header + g else None
    entries = max(header + g - 5, 0) + 1
    e = g - 1 if text.eos else g
    if n >= entries or n > e:
        return Trailing.PAD
    if n == e or n == entries - 1:
        return Trailing.EOS
    return 4 + n


def code_predictor_sampling(talker: SamplingParams) -> SamplingParams:
    """Greedy when the talker is greedy (as the reference mirrors do_sample), else the
    reference's fixed top-k 50 / top-p 0.8, seeded from the talker's seed."""
    if talker.greedy:
        return SamplingParams(temperature=0.0)
    seed = None if talker.seed is None else talker.seed + 1
    return SamplingParams(**{**CODE_PREDICTOR_SAMPLING.__dict__, "seed": seed})


def _grids(grid: torch.Tensor | None) -> list[tuple[int, ...]]:
    return [] if grid is None else [tuple(g) for g in grid.tolist()]


def _values(x: torch.Tensor | None) -> list:
    return [] if x is None else x.tolist()
