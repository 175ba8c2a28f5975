"""The engine's model calls, over cache rows: prompts embedded and prefilled (several at once, each
from where its row stands), thinker decode steps, talker prefill and steps with the code
predictor, and vocoder chunks. It owns the caches; which row is whose is the scheduler's.

Legend: R rows (max_num_seqs), n rows in a call, S tokens, Dt thinker hidden, D talker hidden,
G codebooks, V vocabulary.

Every call takes host lists (rows, tokens, position offsets) and builds its tensors here, so the
step shapes are decided in one place. With `cuda_graphs` the decode calls go through the static
steps (static_steps.py, static_vocoder.py): batch buckets, captured as CUDA graphs on a CUDA
device. The talker stage may run on its own device (placement.py): the thinker states it reads
are handed over here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qomni.engine.config import EngineConfig
from qomni.engine.graphs import capture_blockers
from qomni.engine.prefill import Prompt, embed_prompt, pack
from qomni.engine.speech import TalkerPrompt, Trailing, build_talker_prompt, special_embeds
from qomni.engine.static_steps import StaticTalker, StaticThinker
from qomni.engine.static_vocoder import PooledStream, StaticVocoder
from qomni.models.code2wav_stream import StreamingCode2Wav, push_together
from qomni.models.model import OmniModel
from qomni.models.rope import decode_positions
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import Sampler


@dataclass
class Chunk:
    """Tokens [start, end) of a prompt, prefilled into `row`, whose cache holds the first `start`
    (maybe more, which are dropped)."""

    row: int
    prompt: Prompt
    start: int
    end: int
    capture: bool  # return the accept-layer hidden states of these tokens (for the talker)


class ModelRunner:
    def __init__(self, model: OmniModel, config: EngineConfig):
        self.model, self.cfg = model, model.cfg
        self.device = model.thinker.lm_head.weight.device
        # A conversation's audio is embedded once, not again at every turn and every prefix.
        model.thinker.audio_tower.cache_windows(config.audio_cache_windows)
        self.cache = model.thinker.model.new_cache(config.max_num_seqs, config.max_model_len)
        self.lengths = [0] * config.max_num_seqs  # each row's cached tokens, known on the host
        capture = graph_mode(config.cuda_graphs, self.device, capture_blockers(model.thinker))
        self.static = None if capture is None else StaticThinker(model.thinker, self.cache,
                                                                 capture)
        self.vocoder: StaticVocoder | None = None
        if model.audio_output:
            self.talker_device = model.talker.model.norm.weight.device
            self.talker_cache = model.talker.new_cache(config.max_num_seqs, config.talker_len)
            self.talker_lengths = [0] * config.max_num_seqs
            tok = self.cfg.tokens
            with torch.inference_mode():
                self.trailing = dict(zip((Trailing.PAD, Trailing.EOS),
                                         special_embeds(model, (tok.tts_pad, tok.tts_eos))))
            capture = graph_mode(config.cuda_graphs, self.talker_device,
                                 capture_blockers(model.talker))
            if capture is not None:
                self.talker_static = StaticTalker(model.talker, self.talker_cache, capture)
                self.vocoder = StaticVocoder(model.code2wav, config.max_num_seqs, capture)
            else:
                self.talker_static = None

    # -- thinker --------------------------------------------------------------------------------

    def embed(self, inputs: ProcessedInputs) -> Prompt:
        """The prompt's input embeddings (the audio and vision encoders run here)."""
        return embed_prompt(self.model.thinker, inputs, self.device)

    def prefill(self, chunks: Sequence[Chunk]
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Prefill the chunks in one thinker forward, right-padded, each row from its own start
        position. Returns the final hidden state of each chunk's last token [n, Dt] and, for
        chunks that capture, the accept-layer hidden states of their tokens [end - start, Dt]."""
        thinker = self.model.thinker
        rows = [c.row for c in chunks]
        for c in chunks:
            self.cache.reset([c.row], c.start)
        batch = pack([c.prompt for c in chunks], [(c.start, c.end) for c in chunks])
        capture = self.cfg.talker.accept_hidden_layer if any(c.capture for c in chunks) else None
        hidden, captured = thinker(batch.embeds, batch.positions, self.cache.rows(rows),
                                   batch.n_new, batch.deepstack, capture)
        for c in chunks:
            self.lengths[c.row] = c.end
        last = hidden[torch.arange(len(chunks), device=self.device), batch.n_new - 1]
        kept = [captured[i, : c.end - c.start] if c.capture else None
                for i, c in enumerate(chunks)]
        return last, kept

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Thinker logits of final hidden states [n, Dt] -> [n, V]."""
        return self.model.thinker.logits(hidden)

    def decode(self, rows: Sequence[int], tokens: Sequence[int],
               rope_deltas: Sequence[float]) -> torch.Tensor:
        """One thinker step for each row, whose last generated token is `tokens[i]`: logits
        [n, V] (with the static steps: a view valid until the next decode)."""
        for r in rows:
            self.lengths[r] += 1
        if self.static is not None:
            longest = max(self.lengths[r] for r in rows)
            step = self.static.decode(rows, tokens, rope_deltas, longest)
            return step.logits[: len(rows)]
        thinker = self.model.thinker
        view = self.cache.rows(list(rows))
        pos = decode_positions(view.lengths, torch.tensor(rope_deltas, device=self.device))
        last = torch.tensor(tokens, device=self.device)[:, None]
        hidden, _ = thinker(thinker.embed(last), pos, view, self._ones(len(rows)))
        return thinker.logits(hidden[:, 0])

    # -- talker ---------------------------------------------------------------------------------

    def talker_prompt(self, inputs: ProcessedInputs, embeds: torch.Tensor,
                      captured: torch.Tensor, generated: Sequence[int],
                      speaker_id: int) -> TalkerPrompt:
        """The talker prompt of a request (`speech.build_talker_prompt`), from the thinker's
        states handed over to the talker's device."""
        return build_talker_prompt(self.model, inputs, self.to_talker(embeds),
                                   self.to_talker(captured), generated, speaker_id)

    def to_talker(self, x: torch.Tensor) -> torch.Tensor:
        """A thinker-side tensor on the talker's device (the stage hand-off)."""
        return x.to(self.talker_device)

    def talker_prefill(self, row: int, prompt: TalkerPrompt) -> torch.Tensor:
        """Prefill a talker prompt into `row` (from empty): its last hidden state [1, D]."""
        self.talker_cache.reset([row])
        n = prompt.embeds.shape[0]
        self.talker_lengths[row] = n
        hidden = self.model.talker(prompt.embeds[None], prompt.positions[:, None],
                                   self.talker_cache.rows([row]),
                                   torch.tensor([n], device=self.talker_device))
        return hidden[:, -1]

    def speak(self, hidden: torch.Tensor, code0: torch.Tensor, samplers: Sequence[Sampler],
              sample: Callable[[torch.Tensor], torch.Tensor], frames: Sequence[int],
              go: Sequence[int], rows: Sequence[int], text: torch.Tensor | None,
              rope_deltas: Sequence[float]
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Finish n frames whose code0 was chosen (hidden [n, D]: the talker hidden that chose
        it; `frames`: each one's number in its utterance), the code predictor sampling with each
        frame's sampler, then one talker step for frames `go` (indices into the n; their talker
        `rows`, trailing `text` [m, D], rope deltas). Returns the frames' codes [n, G] and, for
        `go`, the next hidden [m, D] and its codebook-0 logits [m, V] (None when `go` is empty).
        Eagerly, `sample` (logits [n, V] -> ids [n]) draws with the samplers' generators; the
        static step draws on the device, from the same settings and seeds but its own noise."""
        for r in rows:
            self.talker_lengths[r] += 1
        if self.talker_static is not None and not any(s.uses_penalty or s.uses_counts
                                                      for s in samplers):
            longest = max((self.talker_lengths[r] for r in rows), default=1)
            step = self.talker_static.talk(hidden, code0, text, go, rows, rope_deltas, longest,
                                           samplers, frames)
            codes = step.codes[: hidden.shape[0]].clone()
            if not go:
                return codes, None, None
            m = len(go)
            return codes, step.at_go(step.next_hidden, m), step.at_go(step.logits, m)
        talker = self.model.talker
        codes, codec_next = talker.predict_residuals(hidden, code0, sample)
        if not go:
            return codes, None, None
        view = self.talker_cache.rows(list(rows))
        pos = decode_positions(view.lengths, torch.tensor(rope_deltas,
                                                          device=self.talker_device))
        out = talker((codec_next[list(go)] + text)[:, None], pos, view,
                     self._ones(len(rows), self.talker_device))[:, 0]
        return codes, out, talker.code0_logits(out)

    def code0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.talker.code0_logits(hidden)

    def text_embed(self, token: int) -> torch.Tensor:
        """A generated token as talker trailing text [D]."""
        ids = torch.tensor([token], device=self.device)
        embed = self.to_talker(self.model.thinker.embed(ids))
        return self.model.talker.text_projection(embed)[0]

    # -- vocoder --------------------------------------------------------------------------------

    def new_vocoder(self, row: int) -> StreamingCode2Wav | PooledStream:
        """A stream for the request in talker row `row`."""
        if self.vocoder is not None:
            return PooledStream(self.model.code2wav, row)
        return StreamingCode2Wav(self.model.code2wav)

    def vocode(self, vocoders: list, codes: torch.Tensor) -> list[torch.Tensor]:
        """Push a chunk of codes [n, G, F] to vocoders standing at the same frame: samples."""
        if self.vocoder is not None:
            return self.vocoder.push_streams(vocoders, codes)
        return push_together(vocoders, codes)

    def _ones(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.ones(n, dtype=torch.long, device=device or self.device)


def graph_mode(setting: bool | None, device: torch.device, blockers: list[str]) -> bool | None:
    """How a stage on `device` decodes: None eagerly, False through the static steps called as
    they are, True through the static steps captured as CUDA graphs. `setting` is
    EngineConfig.cuda_graphs: None is "on a CUDA device, when nothing in the stage reads
    back to the host", True insists (an error where that cannot hold)."""
    if setting is False or (setting is None and (device.type != "cuda" or blockers)):
        return None
    if device.type != "cuda":
        return False
    if blockers:
        raise ValueError("cuda_graphs: these modules read device values back to the host and "
                         f"cannot be captured: {', '.join(blockers[:4])}"
                         + (" ..." if len(blockers) > 4 else "")
                         + " (quantized MoE experts); load without cuda_graphs")
    return True
