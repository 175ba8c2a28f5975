"""A code2wav chunk over static buffers, for CUDA graphs (see graphs.py and code2wav_stream.py).

Legend: B bucket rows, R vocoder rows, G code groups, n frames in the chunk, H heads, Hkv key/value
heads, Dh head dim, W sliding window, C channels, S samples per frame.

A stream's state lives in a pool row instead of a `Code2WavState`: per attention layer the last
W-1 frames' keys and values (fixed size: before W-1 frames exist the missing ones are masked), per
causal conv its left context, and the frame count, which gives the RoPE positions and the mask
on the device. So any rows, each at its own frame, can share one chunk call of a fixed shape.
A stream's first chunk runs eagerly (`StreamingCode2Wav`): it has no left context at the
transposed convs and yields fewer samples; `start` then moves its state into the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qomni.engine.graphs import HostInput, StepGraphs, bucket_for, fill_rows
from qomni.models.code2wav import Code2Wav, Code2WavState
from qomni.models.code2wav_stream import StreamingCode2Wav, push_together
from qomni.models.conv import CausalConvNet, CausalTransConvNet
from qomni.models.rope import apply_rope


class VocoderPool:
    """Stream states of `rows` rows plus a scratch row (the last) that padding writes."""

    def __init__(self, model: Code2Wav, rows: int):
        cfg, w = model.cfg, model.code_embedding.weight
        self.model, self.rows, self.scratch = model, rows, rows
        self.past = cfg.sliding_window - 1
        shape = (rows + 1, cfg.num_key_value_heads, self.past, cfg.head_dim)
        layers = model.pre_transformer.layers
        self.keys = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in layers]
        self.convs = [m for m in model.modules()
                      if isinstance(m, (CausalConvNet, CausalTransConvNet)) and m.context]
        self.tails = {m: torch.zeros(rows + 1, m.conv.in_channels, m.context, dtype=w.dtype,
                                     device=w.device) for m in self.convs}
        self.frames = torch.zeros(rows + 1, dtype=torch.long, device=w.device)

    def start(self, row: int, state: Code2WavState) -> None:
        """Take over a stream after its first (eager) chunk."""
        if not 0 <= row < self.rows:
            raise ValueError(f"vocoder row {row} is not in 0..{self.rows - 1}")
        if state.frames < 1 or any(m not in state.tails for m in self.convs):
            raise ValueError("a stream joins the pool after its first chunk")
        for layer, keys, values in zip(self.model.pre_transformer.layers, self.keys,
                                       self.values):
            k, v = state.tails[layer.self_attn]  # [1, Hkv, m, Dh], m = min(frames, W-1)
            m = k.shape[2]
            keys[row].zero_()
            values[row].zero_()
            keys[row, :, self.past - m:] = k[0]
            values[row, :, self.past - m:] = v[0]
        for m in self.convs:
            self.tails[m][row] = state.tails[m][0]
        self.frames[row] = state.frames


class Code2WavChunk:
    """n frames for each of B pool rows. Inputs: codes [B, G, n], rows [B]. Output: samples
    [B, n·S] float32 (clamped to [-1, 1], as `Code2Wav.forward`)."""

    def __init__(self, pool: VocoderPool, batch: int, frames: int):
        model = pool.model
        self.pool, self.model, self.batch, self.n = pool, model, batch, frames
        device = pool.frames.device
        self.per_frame = model.num_samples(2) - model.num_samples(1)
        g = model.cfg.num_quantizers
        self.codes = torch.zeros(batch, g, frames, dtype=torch.long, device=device)
        self.rows = HostInput(torch.full((batch,), pool.scratch, dtype=torch.long,
                                         device=device))
        self.samples = torch.zeros(batch, frames * self.per_frame, device=device)

    def load(self, rows: Sequence[int], codes: torch.Tensor) -> None:
        fill_rows(self.codes, codes)
        self.rows.fill(rows, self.pool.scratch)

    def idle(self) -> None:
        self.load([], self.codes[:0])

    def compute(self) -> None:
        pool, model, n = self.pool, self.model, self.n
        rows = self.rows.buffer
        frames = pool.frames[rows]  # [B]
        x = model.code_embedding(self.codes + model.code_offset).mean(1)  # [B, n, D]
        x = self._transformer(x, rows, frames).transpose(1, 2)  # [B, D, n]
        tails = {m: pool.tails[m][rows] for m in pool.convs}
        for stage in model.upsample:
            for block in stage:
                x = block(x, tails)
        for block in model.decoder:
            x = block(x, tails)  # ends as [B, 1, n·S]
        for m in pool.convs:
            pool.tails[m][rows] = tails[m]
        pool.frames[rows] = frames + n
        self.samples.copy_(x[:, 0].clamp(-1, 1).float())

    def _transformer(self, x: torch.Tensor, rows: torch.Tensor,
                     frames: torch.Tensor) -> torch.Tensor:
        """The sliding-window transformer over the pool rows' past W-1 frames (Attention's
        computation, the window's start and the positions taken from `frames`)."""
        pre, pool, n = self.model.pre_transformer, self.pool, self.n
        past = pool.past
        b = x.shape[0]
        i = torch.arange(n, device=x.device)
        positions = frames[:, None] + i  # [B, n]
        cos, sin = pre.rotary_emb(positions, x.dtype)
        # Key j of [past W-1 frames, the n new ones] is frame `frames - past + j`: query i sees
        # it when it is no later than i, within the window, and not before the first frame.
        j = torch.arange(past + n, device=x.device)
        mask = (j <= past + i[:, None]) & (j >= i[:, None])  # [n, W-1+n]
        mask = mask & (j >= past - frames[:, None, None])  # [B, n, W-1+n]
        for layer, key_pool, value_pool in zip(pre.layers, pool.keys, pool.values):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, n, attn.heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, n, attn.kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, n, attn.kv_heads, attn.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys = torch.cat([key_pool[rows], k], dim=2)
            values = torch.cat([value_pool[rows], v], dim=2)
            key_pool[rows] = keys[:, :, n:]
            value_pool[rows] = values[:, :, n:]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask[:, None], scale=attn.head_dim ** -0.5,
                enable_gqa=attn.heads != attn.kv_heads)
            h = attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
            x = x + layer.self_attn_layer_scale(h)
            x = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
        return pre.norm(x)


class PooledStream:
    """One utterance's vocoder stream in pool row `row`: its first chunk through `stream`
    (eager), the others through the pool."""

    def __init__(self, model: Code2Wav, row: int):
        self.stream, self.row, self.frames = StreamingCode2Wav(model), row, 0


class StaticVocoder:
    """Chunks of streams held in a `VocoderPool`, by (bucket, frames), captured as CUDA graphs
    when `capture` is set."""

    def __init__(self, model: Code2Wav, rows: int, capture: bool = False):
        self.pool = VocoderPool(model, rows)
        self.graphs = StepGraphs(capture)

    def start(self, row: int, state: Code2WavState) -> None:
        self.pool.start(row, state)

    def push_streams(self, streams: list[PooledStream], codes: torch.Tensor
                     ) -> list[torch.Tensor]:
        """Push codes [n, G, F] to streams standing at the same frame: each stream's samples."""
        if len({s.frames for s in streams}) != 1:
            raise ValueError("push_streams needs streams at the same frame")
        if streams[0].frames == 0:
            pcms = push_together([s.stream for s in streams], codes)
            for s in streams:
                self.start(s.row, s.stream.state)
        else:
            pcms = [p.clone() for p in self.push([s.row for s in streams], codes)]
        for s in streams:
            s.frames += codes.shape[2]
        return pcms

    @torch.inference_mode()
    def push(self, rows: Sequence[int], codes: torch.Tensor) -> list[torch.Tensor]:
        """codes [len(rows), G, n] continue the streams in `rows` (each started): their samples,
        [n·S] each (valid until the next call with the same bucket and n)."""
        n = codes.shape[2]
        if codes.shape[0] != len(rows) or n < 1:
            raise ValueError(f"{len(rows)} rows for codes of shape {list(codes.shape)}")
        key = (bucket_for(len(rows)), n)
        step = self.graphs.get(key, lambda: Code2WavChunk(self.pool, key[0], n))
        step.load(rows, codes)
        self.graphs.run(key)
        return list(step.samples[: len(rows)])
