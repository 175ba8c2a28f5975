"""The thinker decode step and the talker step (with the code predictor's 15 steps) over static
buffers, for CUDA graphs (see graphs.py).

Legend: B bucket rows, R cache rows, K key slots read, Dt thinker hidden, D talker hidden,
G codebooks, V vocabulary (thinker or codec).

Each step computes exactly what the engine's eager calls compute (same modules, same order of
operations), with everything shape-dependent fixed: rows beyond the ones in use are padding that
writes only the cache's scratch slot and advances nothing; positions and lengths come from the
cache's device `lengths`; the attention mask is built on the device for K key slots chosen by
the caller from host-known lengths (graphs.key_bucket). The code predictor's codes are chosen on
the device, greedily or by device_sampling.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qomni.engine.device_sampling import RowSampling
from qomni.engine.graphs import HostInput, StepGraphs, bucket_for, fill_rows, key_bucket
from qomni.models.code_predictor import greedy
from qomni.models.layers import KVCache
from qomni.models.rope import decode_positions
from qomni.models.talker import Talker
from qomni.models.thinker import TextModel, Thinker
from qomni.sampling import Sampler


class StaticRows:
    """The cache rows a bucket's rows map to, by a device index: the same writes and reads as
    `CacheRows`, with the index a buffer the graph reads at every replay."""

    def __init__(self, cache: KVCache, index: torch.Tensor):
        self.cache, self.index, self.max_len = cache, index, cache.max_len

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys[self.index[:, None], :, slots] = k
        values[self.index[:, None], :, slots] = v
        return keys[self.index, :, :n_keys], values[self.index, :, :n_keys]


class DecodeInputs:
    """What every one-token step of a cached decoder takes: cache rows [B], rope deltas [B]
    and which rows are real [B] (padding writes the scratch slot and stays where it is)."""

    def __init__(self, cache: KVCache, batch: int, n_keys: int):
        device = cache.lengths.device
        self.cache, self.batch, self.n_keys = cache, batch, n_keys
        self.rows = HostInput(torch.zeros(batch, dtype=torch.long, device=device))
        self.deltas = HostInput(torch.zeros(batch, dtype=torch.float32, device=device))
        self.valid = HostInput(torch.zeros(batch, dtype=torch.bool, device=device))
        self.view = StaticRows(cache, self.rows.buffer)

    def load(self, rows: Sequence[int], deltas: Sequence[float]) -> None:
        self.rows.fill(rows, 0)
        self.deltas.fill(deltas, 0.0)
        self.valid.fill([True] * len(rows), False)

    def idle(self) -> None:
        self.load([], [])

    def run_layers(self, model: TextModel, h: torch.Tensor) -> torch.Tensor:
        """h [B, 1, D] through `model`'s decoder layers and final norm -> [B, D]; advances the
        real rows' cache lengths by one."""
        rows, valid = self.rows.buffer, self.valid.buffer
        lengths = self.cache.lengths[rows]
        cos, sin = model.rotary(decode_positions(lengths, self.deltas.buffer), h.dtype)
        slots = torch.where(valid, lengths, self.cache.max_len)[:, None]  # [B, 1]
        end = (lengths + valid).clamp_min(1)  # idle rows still see slot 0
        keys = torch.arange(self.n_keys, device=h.device)
        mask = (keys <= lengths[:, None]) & (keys < end[:, None])  # [B, K]
        mask = mask[:, None, None]  # [B, 1, 1, K]
        for layer in model.layers:
            h = layer(h, cos, sin, self.view, slots, mask)
        self.cache.lengths.index_add_(0, rows, valid.long())
        return model.norm(h)[:, 0]


class ThinkerDecodeStep(DecodeInputs):
    """Inputs: the rows' last tokens [B]. Outputs: logits [B, V] and their argmax [B]."""

    def __init__(self, thinker: Thinker, cache: KVCache, batch: int, n_keys: int):
        super().__init__(cache, batch, n_keys)
        self.thinker = thinker
        device, dtype = thinker.lm_head.weight.device, thinker.lm_head.weight.dtype
        self.tokens = HostInput(torch.zeros(batch, dtype=torch.long, device=device))
        self.logits = torch.zeros(batch, thinker.cfg.text.vocab_size, dtype=dtype,
                                  device=device)
        self.next_tokens = torch.zeros(batch, dtype=torch.long, device=device)

    def idle(self) -> None:
        super().idle()
        self.tokens.fill([], 0)

    def compute(self) -> None:
        thinker = self.thinker
        hidden = self.run_layers(thinker.model, thinker.embed(self.tokens.buffer[:, None]))
        logits = thinker.logits(hidden)
        self.logits.copy_(logits)
        self.next_tokens.copy_(logits.argmax(-1))


class TalkerStep(DecodeInputs):
    """One talker frame for B rows: the code predictor's 15 steps finish the frame whose code0
    was chosen (greedily, or, when `sampled`, each row with its own settings and counter-based
    noise: device_sampling.py), then the talker steps on the frame's codec embedding plus the
    trailing text.

    Inputs: hidden [B, D] (the talker hidden that chose code0), code0 [B], text [B, D] (trailing
    text embeddings), and, per row, whether it takes the talker step (a row whose frame is its
    last only finishes it) and in which cache row. Outputs: codes [B, G], the next hidden [B, D] and its codebook-0
    logits [B, V] (float32, suppressed ids at -inf)."""

    def __init__(self, talker: Talker, cache: KVCache, batch: int, n_keys: int,
                 sampled: bool = False):
        super().__init__(cache, batch, n_keys)
        self.talker = talker
        w = talker.codec_head.weight
        d, g = talker.cfg.text.hidden_size, talker.cfg.num_code_groups
        self.hidden = torch.zeros(batch, d, dtype=w.dtype, device=w.device)
        self.code0 = torch.zeros(batch, dtype=torch.long, device=w.device)
        self.text = torch.zeros(batch, d, dtype=w.dtype, device=w.device)
        self.codes = torch.zeros(batch, g, dtype=torch.long, device=w.device)
        self.next_hidden = torch.zeros(batch, d, dtype=w.dtype, device=w.device)
        self.logits = torch.zeros(batch, talker.cfg.text.vocab_size, device=w.device)
        self.go = HostInput(torch.zeros(batch, dtype=torch.long, device=w.device))
        # Sampling: each row's settings, and its frame number (the noise counter's base).
        self.sampling = RowSampling(batch, w.device) if sampled else None
        self.frame = HostInput(torch.zeros(batch, dtype=torch.long, device=w.device))

    def load_frames(self, hidden: torch.Tensor, code0: torch.Tensor, text: torch.Tensor | None,
                    go: Sequence[int], rows: Sequence[int], deltas: Sequence[float],
                    samplers: Sequence[Sampler] = (), frames: Sequence[int] = ()) -> None:
        """hidden [n, D], code0 [n] for the n frames to finish; frames `go` (indices into the
        n) take a talker step with text [m, D], in talker cache `rows` (deltas: theirs).
        Sampled steps: each frame's code-predictor sampler and its number in its utterance."""
        n = hidden.shape[0]
        if self.sampling is not None:
            self.sampling.load(samplers)
            self.frame.fill(frames, 0)
        fill_rows(self.hidden, hidden)
        fill_rows(self.code0, code0)
        row_of, delta_of, valid = [0] * n, [0.0] * n, [False] * n
        for j, i in enumerate(go):
            row_of[i], delta_of[i], valid[i] = rows[j], deltas[j], True
        self.rows.fill(row_of, 0)
        self.deltas.fill(delta_of, 0.0)
        self.valid.fill(valid, False)
        self.go.fill(go, 0)
        self.text.zero_()
        if go:  # by a device index: a host list as index would be a blocking copy
            self.text.index_copy_(0, self.go.buffer[: len(go)], text)

    def at_go(self, t: torch.Tensor, m: int) -> torch.Tensor:
        """Rows of an output [B, ...] at the frames that took a talker step: [m, ...]."""
        return t.index_select(0, self.go.buffer[:m])

    def idle(self) -> None:
        super().idle()
        for t in (self.hidden, self.code0, self.text):
            t.zero_()

    def compute(self) -> None:
        talker = self.talker
        sample = greedy
        if self.sampling is not None:
            draws = iter(range(talker.cfg.num_code_groups - 1))  # the frame's 15 draws
            base = self.frame.buffer * (talker.cfg.num_code_groups - 1)

            def sample(logits: torch.Tensor) -> torch.Tensor:
                return self.sampling.sample(logits, base + next(draws))

        codes, codec_next = talker.predict_residuals(self.hidden, self.code0, sample)
        hidden = self.run_layers(talker.model, (codec_next + self.text)[:, None])
        self.codes.copy_(codes)
        self.next_hidden.copy_(hidden)
        self.logits.copy_(talker.code0_logits(hidden))


class StaticThinker:
    """The engine's thinker decode steps by (bucket, key slots), captured as CUDA graphs when
    `capture` is set."""

    def __init__(self, thinker: Thinker, cache: KVCache, capture: bool = False):
        self.thinker, self.cache = thinker, cache
        self.graphs = StepGraphs(capture)

    @torch.inference_mode()
    def decode(self, rows: Sequence[int], tokens: Sequence[int], rope_deltas: Sequence[float],
               longest: int) -> ThinkerDecodeStep:
        """One thinker step for each row (its last token `tokens[i]`); `longest`: the most
        entries any of these rows holds after the step. Returns the step, whose `logits[:n]`
        and `next_tokens[:n]` are the rows' (valid until the next call with its key)."""
        key = (bucket_for(len(rows)), key_bucket(longest, self.cache.max_len + 1))
        step = self.graphs.get(key, lambda: ThinkerDecodeStep(self.thinker, self.cache, *key))
        step.tokens.fill(tokens, 0)
        step.load(rows, rope_deltas)
        self.graphs.run(key)
        return step


class StaticTalker:
    """The engine's talker frames (code predictor, then talker step) by (bucket, key slots),
    captured as CUDA graphs when `capture` is set."""

    def __init__(self, talker: Talker, cache: KVCache, capture: bool = False):
        self.talker, self.cache = talker, cache
        self.graphs = StepGraphs(capture)

    @torch.inference_mode()
    def talk(self, hidden: torch.Tensor, code0: torch.Tensor, text: torch.Tensor | None,
             go: Sequence[int], rows: Sequence[int], rope_deltas: Sequence[float],
             longest: int, samplers: Sequence[Sampler] | None = None,
             frames: Sequence[int] = ()) -> TalkerStep:
        """Finish n frames (hidden [n, D], code0 [n]) and step the talker for frames `go`
        (text [m, D]; rows, rope_deltas: m each; `longest`: the most entries of these rows after
        the step). The code predictor is greedy, or, with `samplers` (n, one per frame, and
        `frames`: each frame's number in its utterance), samples on the device. Returns the
        step: `codes[:n]`, and `next_hidden`, `logits` at `go` (`at_go`)."""
        sampled = samplers is not None and not all(s.all_greedy for s in samplers)
        key = (bucket_for(hidden.shape[0]), key_bucket(longest, self.cache.max_len + 1), sampled)
        step = self.graphs.get(key, lambda: TalkerStep(self.talker, self.cache, *key))
        step.load_frames(hidden, code0, text, go, rows, rope_deltas, samplers or (), frames)
        self.graphs.run(key)
        return step
