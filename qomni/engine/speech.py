"""Speech: the talker's prompt from thinker states, the frame loop, and codes -> waveform.

Legend: B rows, S thinker prompt tokens, Dt thinker hidden, D talker hidden, P talker prompt
tokens, G codebooks per frame, F frames, V talker codec vocabulary.

The talker prompt follows the reference (notes §6, step 2): every user turn, token by token —
`hidden_projection` of the thinker's layer-`accept_hidden_layer` state at audio/image/video
placeholders, `text_projection` of the token embedding elsewhere — then 9 assistant positions
(`<|im_start|>assistant\\n`; tts_pad ×4 with nothink/think_bos/think_eos/speaker codes; tts_bos
with codec_pad; the first generated token with codec_bos). Each later talker step adds the next
generated token's projected embedding ("trailing text"), then tts_eos once the text ends, then
tts_pad. Frame n's codebook-0 code comes from the talker; codebooks 1..G-1 from the code
predictor, one step later — so F frames take F code-predictor passes and the EOS (or the cap)
never becomes a frame.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qomni.config import OmniConfig
from qomni.models.omni import OmniModel
from qomni.multimodal.positions import rope_index
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import Sampler, SamplingParams

# The reference's code-predictor sampling when the talker samples (fixed, not in any config).
CODE_PREDICTOR_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.8)


@dataclass
class TalkerPrompt:
    embeds: torch.Tensor  # [P, D]
    positions: torch.Tensor  # [3, P] float32
    rope_delta: float


def talker_sampling_defaults(generation_config: dict) -> SamplingParams:
    """The checkpoint's talker sampling (generation_config.json), reference defaults otherwise."""
    g = generation_config
    return SamplingParams(temperature=float(g.get("talker_temperature", 0.9)),
                          top_k=int(g.get("talker_top_k", 50)),
                          top_p=float(g.get("talker_top_p", 1.0)),
                          repetition_penalty=float(g.get("talker_repetition_penalty", 1.05)))


def build_talker_prompt(model: OmniModel, x: ProcessedInputs, embeds: torch.Tensor,
                        hidden: torch.Tensor, first_token: int, speaker_id: int) -> TalkerPrompt:
    """embeds [S, Dt]: the thinker's input embeddings (media features in place);
    hidden [S, Dt]: its hidden state after `accept_hidden_layer` layers; first_token: the first
    generated token."""
    cfg: OmniConfig = model.cfg
    tok, tcfg, talker = cfg.tokens, cfg.talker, model.talker
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

    is_start = (ids[:-1] == tok.im_start) & (ids[1:] == tok.assistant)
    if not bool(is_start.any()):
        raise ValueError("the prompt has no `<|im_start|>assistant` turn for the talker to follow")
    a = int(is_start.nonzero()[-1])
    first = model.thinker.embed(torch.tensor([first_token], device=ids.device))
    assistant = talker.text_projection(torch.cat([embeds[a: a + 3], first]))  # [4, D]
    pad, bos = special_embeds(model, (tok.tts_pad, tok.tts_bos))
    text = torch.cat([assistant[:3], pad.expand(4, -1), bos[None], assistant[3:4]])
    codec_ids = torch.tensor([tcfg.codec_nothink_id, tcfg.codec_think_bos_id,
                              tcfg.codec_think_eos_id, speaker_id, tcfg.codec_pad_id,
                              tcfg.codec_bos_id], device=ids.device)
    codec = torch.cat([torch.zeros(3, text.shape[1], dtype=text.dtype, device=text.device),
                       talker.embed(codec_ids)])
    prompt = torch.cat([part, text + codec])

    talker_ids = torch.cat([user_ids, torch.full((9,), tok.tts_pad, device=ids.device)])
    has_media = x.media.audio_lengths is not None or x.media.image_grid_thw is not None \
        or x.media.video_grid_thw is not None
    if has_media:
        positions, delta = rope_index(
            talker_ids.cpu(), tok,
            image_grids=_grids(x.media.image_grid_thw), video_grids=_grids(x.media.video_grid_thw),
            audio_lengths=x.media.audio_lengths.tolist() if x.media.audio_lengths is not None
            else (),
            # The talker's config has no audio n_window (the reference's Q1 bug); it is the
            # thinker's, which is what the reference uses once patched.
            n_window=cfg.thinker.audio.n_window, merge_size=tcfg.spatial_merge_size,
            position_id_per_seconds=tcfg.position_id_per_seconds)
    else:
        positions, delta = torch.arange(prompt.shape[0]).float().expand(3, -1), 0.0
    return TalkerPrompt(prompt, positions.to(prompt.device), delta)


def special_embeds(model: OmniModel, ids: Sequence[int]) -> list[torch.Tensor]:
    """text_projection of thinker token embeddings (tts_pad / tts_bos / tts_eos), each [D]."""
    device = model.thinker.lm_head.weight.device
    e = model.thinker.embed(torch.tensor(list(ids), device=device))
    return list(model.talker.text_projection(e))


def trailing_text(model: OmniModel, generated: Sequence[int]) -> torch.Tensor:
    """What the talker adds at steps 1, 2, ...: the generated tokens after the first, except the
    last one (the reference never embeds the final token, EOS or not), then tts_eos. [T, D]"""
    tok = model.cfg.tokens
    middle = list(generated[1:-1])
    device = model.thinker.lm_head.weight.device
    ids = torch.tensor(middle + [tok.tts_eos], device=device)
    return model.talker.text_projection(model.thinker.embed(ids))


@dataclass
class Frames:
    """One talker step: codes [B, G] of the rows in `emitted` (frames), and rows that ended."""

    codes: torch.Tensor
    emitted: torch.Tensor  # [B] bool
    ended: torch.Tensor  # [B] bool


@torch.inference_mode()
def talker_frames(model: OmniModel, prompts: Sequence[TalkerPrompt],
                  trailing: Sequence[torch.Tensor], sampling: SamplingParams,
                  max_frames: int) -> Iterator[Frames]:
    """Yield one Frames per talker step until every row has emitted EOS or `max_frames`."""
    talker, tcfg = model.talker, model.cfg.talker
    device = talker.codec_head.weight.device
    b = len(prompts)
    lengths = torch.tensor([p.embeds.shape[0] for p in prompts], device=device)
    p_max = int(lengths.max())
    embeds = torch.zeros(b, p_max, tcfg.text.hidden_size, dtype=prompts[0].embeds.dtype,
                         device=device)
    pos = torch.zeros(3, b, p_max, device=device)
    for row, p in enumerate(prompts):
        embeds[row, : p.embeds.shape[0]] = p.embeds
        pos[:, row, : p.embeds.shape[0]] = p.positions
    cache = talker.new_cache(b, p_max + max_frames)
    hidden = talker(embeds, pos, cache, lengths)
    hidden = hidden[torch.arange(b, device=device), lengths - 1]  # [B, D]

    sampler = Sampler([sampling] * b, device)
    code_sampler = Sampler([_code_predictor_sampling(sampling)] * b, device)
    vocab = tcfg.text.vocab_size
    suppress = torch.ones(vocab, dtype=torch.bool, device=device)
    suppress[: tcfg.code_predictor.vocab_size] = False  # only codebook-0 codes and EOS
    suppress[tcfg.codec_eos_token_id] = False
    seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
    delta = torch.tensor([p.rope_delta for p in prompts], device=device)
    (pad,) = special_embeds(model, [model.cfg.tokens.tts_pad])
    rows = torch.arange(b, device=device)

    code0 = _sample(talker, hidden, sampler, seen, suppress)
    active = code0 != tcfg.codec_eos_token_id
    for n in range(max_frames):
        if not bool(active.any()):
            return
        codes, codec_next = talker.predict_residuals(hidden, code0, code_sampler)
        last = n + 1 == max_frames
        seen[rows, code0] = True
        if last:
            yield Frames(codes, active.clone(), active.clone())
            return
        text = torch.stack([t[n] if n < t.shape[0] else pad for t in trailing])
        p = (cache.lengths + delta).view(1, b, 1).expand(3, b, 1)
        hidden = talker((codec_next + text)[:, None], p, cache, active.long())[:, 0]
        code0 = _sample(talker, hidden, sampler, seen, suppress)
        ended = active & (code0 == tcfg.codec_eos_token_id)
        yield Frames(codes, active.clone(), ended)
        active &= ~ended


def _sample(talker, hidden: torch.Tensor, sampler: Sampler, seen: torch.Tensor,
            suppress: torch.Tensor) -> torch.Tensor:
    logits = talker.logits(hidden).float().masked_fill(suppress, float("-inf"))
    return sampler(logits, seen)


def _code_predictor_sampling(talker: SamplingParams) -> SamplingParams:
    """Greedy when the talker is greedy (as the reference mirrors do_sample), else the
    reference's fixed top-k 50 / top-p 0.8, seeded from the talker's seed."""
    if talker.greedy:
        return SamplingParams(temperature=0.0)
    seed = None if talker.seed is None else talker.seed + 1
    return SamplingParams(**{**CODE_PREDICTOR_SAMPLING.__dict__, "seed": seed})


def _grids(grid: torch.Tensor | None) -> list[tuple[int, ...]]:
    return [] if grid is None else [tuple(g) for g in grid.tolist()]
