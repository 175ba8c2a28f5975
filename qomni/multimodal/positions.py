"""Media placeholder expansion and M-RoPE (TMRoPE) positions, in token-id space.

Legend: S prompt tokens, B batch rows, A audio tokens of one audio, V merged vision tokens of one
image or video (t * h/m * w/m for a patch grid (t, h, w) and spatial merge size m).

Positions follow the reference's `get_rope_index` exactly, including its dtype: they are float32
and can be fractional, because a video's t axis advances by `second_per_grid *
position_id_per_seconds` per frame group (0.5 s/grid * 13 = 6.5), and every later token inherits
that offset. Everything is computed with the same float32 operations, in the same order, so the
result is bit-identical to the reference, not merely close.

Reference quirks reproduced on purpose:
- audio in video: the end tokens go to the maximum of the *last piece* of the merge + 1, which
  is below the video's h/w maximum when a short audio outlasts the video's last frame group;
- the processor lays audio-in-video tokens out by float64 time (`expand_placeholders`), the model
  assigns positions by float32 time plus offset (`rope_index`); at exact ties (fps 7, 15, 30, 60)
  the two disagree and one audio token gets a video position and vice versa. Each side matches.
Not reproduced: with use_audio_in_video, the reference does not count a video without a sound
track as a media block, so the prompt's last media block(s) get text positions; here such a
video is positioned as a plain video and every block as its kind.
Audio-in-video blocks without use_audio_in_video, and any malformed block, raise ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qomni.config import SpecialTokens
from qomni.models.audio_encoder import audio_token_count

Grid = Sequence[int]  # (t, h, w) in patches, as image_grid_thw / video_grid_thw


def vision_token_count(grid: Grid, merge_size: int) -> int:
    t, h, w = (int(x) for x in grid)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {tuple(grid)} is not divisible by merge size {merge_size}")
    return t * (h // merge_size) * (w // merge_size)


# ------------------------------------------------------------------------------------------------
# Placeholder expansion (the processor's text-space replacement, done on ids)


def expand_placeholders(
    ids: Sequence[int],
    tokens: SpecialTokens,
    *,
    audio_token_counts: Sequence[int] = (),
    image_grids: Sequence[Grid] = (),
    video_grids: Sequence[Grid] = (),
    video_second_per_grid: Sequence[float] = (),
    merge_size: int,
    position_id_per_seconds: float,
    use_audio_in_video: bool = False,
    video_audio_token_counts: Sequence[int | None] = (),
) -> list[int]:
    """Replace each single media placeholder of a rendered prompt by its full token run.

    `<|audio_pad|>` i -> audio_token_counts[i] copies; `<|image_pad|>` / `<|video_pad|>` i ->
    vision_token_count(grid) copies. With `use_audio_in_video`, video i whose
    `video_audio_token_counts[i]` is not None (a video with a sound track) becomes
    `<|audio_start|>` + its video and audio tokens interleaved by time + `<|audio_end|>`, inside the
    template's `<|vision_start|>`...`<|vision_end|>`; its audio has no placeholder of its own, so
    `audio_token_counts` lists standalone audios only. Lists are in order of appearance.
    """
    n_audio, n_image, n_video = (sum(1 for x in ids if x == t)
                                 for t in (tokens.audio, tokens.image, tokens.video))
    _check_count("audio", n_audio, audio_token_counts, "audio_token_counts")
    _check_count("image", n_image, image_grids, "image_grids")
    _check_count("video", n_video, video_grids, "video_grids")
    if use_audio_in_video:
        _check_count("video", n_video, video_audio_token_counts, "video_audio_token_counts")
        _check_count("video", n_video, video_second_per_grid, "video_second_per_grid")

    out: list[int] = []
    ai = ii = vi = 0
    for x in ids:
        if x == tokens.audio:
            out += [tokens.audio] * int(audio_token_counts[ai])
            ai += 1
        elif x == tokens.image:
            out += [tokens.image] * vision_token_count(image_grids[ii], merge_size)
            ii += 1
        elif x == tokens.video:
            grid = video_grids[vi]
            n_audio_tokens = video_audio_token_counts[vi] if use_audio_in_video else None
            if n_audio_tokens is None:
                out += [tokens.video] * vision_token_count(grid, merge_size)
            else:
                out.append(tokens.audio_start)
                out += _interleave_audio_in_video(
                    tokens, grid, float(video_second_per_grid[vi]), int(n_audio_tokens),
                    merge_size, position_id_per_seconds)
                out.append(tokens.audio_end)
            vi += 1
        else:
            out.append(x)
    return out


def _check_count(kind: str, found: int, given: Sequence, name: str) -> None:
    if found != len(given):
        raise ValueError(f"prompt has {found} {kind} placeholder(s) but {name} has {len(given)}")


def _interleave_audio_in_video(tokens: SpecialTokens, grid: Grid, second_per_grid: float,
                               n_audio: int, merge_size: int, pps: float) -> list[int]:
    """Video frame group g (time g*second_per_grid*pps, in audio-token units) goes before every
    audio token i with time >= it. The processor does this comparison in float64 (numpy), with
    no offset, which is what decides the token layout."""
    t = int(grid[0])
    per_group = vision_token_count(grid, merge_size) // t if t else 0
    out: list[int] = []
    a = 0
    for g in range(t):
        time = g * second_per_grid * pps  # python floats: float64, same order as the processor
        while a < n_audio and a < time:
            out.append(tokens.audio)
            a += 1
        out += [tokens.video] * per_group
    out += [tokens.audio] * (n_audio - a)
    return out


# ------------------------------------------------------------------------------------------------
# M-RoPE positions


@dataclass
class _Block:
    kind: str  # "image" | "video" | "audio" | "audio_in_video"
    start: int  # index of the first start token
    bos: int  # start tokens (1, or 2 for <|vision_start|><|audio_start|>)
    content: int  # tokens between the start and end tokens
    eos: int


def _as_list(ids: torch.Tensor | Sequence[int]) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(x) for x in ids]


def _float_list(xs: torch.Tensor | Sequence[float]) -> list[float]:
    return [float(x) for x in (xs.tolist() if isinstance(xs, torch.Tensor) else xs)]


def _grid_list(grids) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    if isinstance(grids, torch.Tensor):
        grids = grids.tolist()
    return [tuple(int(x) for x in g) for g in grids]


def _find_blocks(ids: list[int], tokens: SpecialTokens, *, image_grids, video_grids,
                 audio_counts, merge_size: int, use_audio_in_video: bool) -> list[_Block]:
    """Media blocks of a prompt, left to right, with their token counts checked."""
    blocks: list[_Block] = []
    ii = vi = ai = 0
    i, n = 0, len(ids)

    def need(lst, idx, what):
        if idx >= len(lst):
            raise ValueError(f"prompt has more {what} blocks than were described ({len(lst)})")
        return lst[idx]

    def expect(pos, token, what):
        if pos >= n or ids[pos] != token:
            raise ValueError(f"malformed {what} block at token {pos}")

    while i < n:
        x = ids[i]
        if x == tokens.vision_start:
            nxt = ids[i + 1] if i + 1 < n else None
            if nxt == tokens.image:
                c = vision_token_count(need(image_grids, ii, "image"), merge_size)
                blk = _Block("image", i, 1, c, 1)
                ii += 1
            elif nxt == tokens.video:
                c = vision_token_count(need(video_grids, vi, "video"), merge_size)
                blk = _Block("video", i, 1, c, 1)
                vi += 1
            elif nxt == tokens.audio_start:
                if not use_audio_in_video:
                    raise ValueError("prompt has an audio-in-video block but use_audio_in_video "
                                     "is False")
                c = (vision_token_count(need(video_grids, vi, "video"), merge_size)
                     + need(audio_counts, ai, "audio"))
                blk = _Block("audio_in_video", i, 2, c, 2)
                vi += 1
                ai += 1
            else:
                raise ValueError(f"<|vision_start|> at token {i} is not followed by media")
            body = ids[i + blk.bos: i + blk.bos + blk.content]
            pads = {tokens.image} if blk.kind == "image" else (
                {tokens.video} if blk.kind == "video" else {tokens.video, tokens.audio})
            if len(body) != blk.content or any(t not in pads for t in body) or (
                    blk.kind == "audio_in_video" and body.count(tokens.audio) != audio_counts[ai - 1]):
                raise ValueError(f"{blk.kind} block at token {i}: expected {blk.content} "
                                 "placeholder tokens")
            end = i + blk.bos + blk.content
            if blk.kind == "audio_in_video":
                expect(end, tokens.audio_end, blk.kind)
                end += 1
            expect(end, tokens.vision_end, blk.kind)
        elif x == tokens.audio_start:
            c = need(audio_counts, ai, "audio")
            ai += 1
            if c <= 0:
                raise ValueError(f"audio at token {i} has no tokens")
            blk = _Block("audio", i, 1, c, 1)
            body = ids[i + 1: i + 1 + c]
            if len(body) != c or any(t != tokens.audio for t in body):
                raise ValueError(f"audio block at token {i}: expected {c} <|audio_pad|> tokens")
            expect(i + 1 + c, tokens.audio_end, "audio")
        else:
            i += 1
            continue
        blocks.append(blk)
        i = blk.start + blk.bos + blk.content + blk.eos
    for lst, used, what in ((image_grids, ii, "image grids"), (video_grids, vi, "video grids"),
                            (audio_counts, ai, "audio lengths")):
        if used != len(lst):
            raise ValueError(f"{len(lst)} {what} given but the prompt uses {used}")
    return blocks


def _arange3(n: int, start: torch.Tensor) -> torch.Tensor:
    """Text-like positions: start + [0, n) on all three axes. [3, n]"""
    return (torch.arange(n, dtype=torch.float32) + start).expand(3, -1)


def _vision(grid: Grid, t_index: torch.Tensor, start: torch.Tensor, merge: int) -> torch.Tensor:
    """(t, row, col) of each merged patch, frame group major then row-major, offset by start."""
    gh, gw = int(grid[1]) // merge, int(grid[2]) // merge
    t = t_index.float().view(-1, 1).expand(-1, gh * gw).flatten()
    h = torch.arange(gh, dtype=torch.float32).view(1, -1, 1).expand(len(t_index), -1, gw).flatten()
    w = torch.arange(gw, dtype=torch.float32).view(1, 1, -1).expand(len(t_index), gh, -1).flatten()
    return torch.stack([t, h, w]) + start


def _video_t(grid_t: int, second_per_grid: float, pps: float) -> torch.Tensor:
    # The reference's exact float32 arithmetic: (k * float32(second_per_grid)) * pps.
    return torch.arange(grid_t) * torch.tensor(second_per_grid, dtype=torch.float32).float() * pps


def rope_index(
    ids: torch.Tensor | Sequence[int],
    tokens: SpecialTokens,
    *,
    image_grids: Sequence[Grid] | torch.Tensor = (),
    video_grids: Sequence[Grid] | torch.Tensor = (),
    video_second_per_grid: Sequence[float] | torch.Tensor = (),
    audio_lengths: Sequence[int] | torch.Tensor = (),
    n_window: int,
    merge_size: int,
    position_id_per_seconds: float,
    use_audio_in_video: bool = False,
) -> tuple[torch.Tensor, float]:
    """M-RoPE positions [3, S] (t, h, w; float32) of one expanded prompt, and its rope delta.

    `audio_lengths` are mel-frame counts of every audio in order of appearance, including the
    sound tracks of audio-in-video blocks (the reference's `audio_seqlens`); `n_window` is the
    thinker's `audio_config.n_window` (also for the talker, whose config lacks it). Decode
    positions are `cache_len + rope_delta` on all three axes; rope_delta = max + 1 - S, a float
    because positions can be fractional.

    Rules: text runs count up from the previous maximum + 1 on all axes; a block's start tokens
    are text; image: t = start, (h, w) = start + (row, col) of the merged grid; video likewise
    with t = start + group * second_per_grid * position_id_per_seconds; audio: start + i on all
    axes; audio in video: audio and video both from the same start, in the order of the
    reference's merge; end tokens: the maximum of the last piece emitted + 1.
    """
    seq = _as_list(ids)
    image_grids, video_grids = _grid_list(image_grids), _grid_list(video_grids)
    spg = _float_list(video_second_per_grid)
    if len(spg) < len(video_grids):
        raise ValueError(f"{len(video_grids)} videos but {len(spg)} video_second_per_grid values")
    counts = [audio_token_count(int(n), n_window) for n in _as_list(audio_lengths)]
    blocks = _find_blocks(seq, tokens, image_grids=image_grids, video_grids=video_grids,
                          audio_counts=counts, merge_size=merge_size,
                          use_audio_in_video=use_audio_in_video)

    pieces: list[torch.Tensor] = []
    nxt = torch.tensor(0.0)  # the previous piece's maximum + 1
    cursor = 0  # next token index not yet given a position
    ii = vi = ai = 0
    for blk in blocks:
        text_len = blk.start - cursor
        if text_len:
            pieces.append(_arange3(text_len, nxt))
            nxt = nxt + text_len
        pieces.append(_arange3(blk.bos, nxt))
        st = nxt + blk.bos
        if blk.kind == "image":
            grid = image_grids[ii]
            t_index = torch.arange(grid[0]) * 1 * position_id_per_seconds
            content = _vision(grid, t_index, st, merge_size)
            last = content
            ii += 1
        elif blk.kind == "video":
            grid = video_grids[vi]
            content = _vision(grid, _video_t(grid[0], spg[vi], position_id_per_seconds), st,
                              merge_size)
            last = content
            vi += 1
        elif blk.kind == "audio":
            content = last = _arange3(counts[ai], st)
            ai += 1
        else:
            grid = video_grids[vi]
            video = _vision(grid, _video_t(grid[0], spg[vi], position_id_per_seconds), st,
                            merge_size)
            audio = _arange3(counts[ai], st)
            content, last = _merge_audio_video(video, audio)
            vi += 1
            ai += 1
        pieces.append(content)
        nxt = last.max() + 1
        pieces.append(_arange3(blk.eos, nxt))
        nxt = pieces[-1].max() + 1
        cursor = blk.start + blk.bos + blk.content + blk.eos
    if cursor < len(seq):
        pieces.append(_arange3(len(seq) - cursor, nxt))
    pos = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0)
    delta = float(pos.max() + 1 - len(seq)) if len(seq) else 0.0
    return pos.contiguous(), delta


def _merge_audio_video(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge by t (video first on ties), as the reference's two-pointer walk; returns the merged
    positions and the trailing run left when one side ran out (its max places the end tokens)."""
    nv, na = video.shape[1], audio.shape[1]
    keys = torch.cat([video[0], audio[0]])
    order = torch.sort(keys, stable=True).indices
    merged = torch.cat([video, audio], dim=1)[:, order]
    is_video = order < nv
    if nv == 0 or na == 0:
        return merged, merged
    # The last element of the exhausted side ends the walk; everything after it is the remainder.
    tail_kind = bool(is_video[-1])
    run = int((is_video != tail_kind).nonzero().max()) + 1
    return merged, merged[:, run:]

