"""The talker stage's model calls, over talker cache rows: talker prefill, talker steps with the
code predictor, and vocoder chunks. It owns the talker cache; the thinker's calls are
runner.py's.

Legend: R rows (max_num_seqs), n rows in a call, S tokens, Dt thinker hidden, D talker hidden,
G codebooks, V vocabulary.

The stage may run on its own device (placement.py) or in its own process (serve_ray): the
thinker states it reads are handed over here (`to_talker`). It needs nothing of the thinker but
those states and the input embeddings of tts_pad, tts_bos and tts_eos. With `cuda_graphs` the
talker steps and the vocoder go through the static steps (static_steps.py, static_vocoder.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qomni.config import OmniConfig
from qomni.engine.config import EngineConfig
from qomni.engine.graphs import capture_blockers
from qomni.engine.runner import graph_mode
from qomni.engine.speech import TalkerPrompt, Trailing, build_talker_prompt, special_embeds
from qomni.engine.static_steps import StaticTalker
from qomni.engine.static_vocoder import PooledStream, StaticVocoder
from qomni.models.code2wav import Code2Wav
from qomni.models.code2wav_stream import StreamingCode2Wav, push_together
from qomni.models.rope import decode_positions
from qomni.models.talker import Talker
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import Sampler


class TalkerRunner:
    def __init__(self, cfg: OmniConfig, talker: Talker, code2wav: Code2Wav,
                 specials: torch.Tensor, config: EngineConfig):
        """specials [3, Dt]: the thinker's input embeddings of tts_pad, tts_bos, tts_eos."""
        self.cfg, self.talker, self.code2wav = cfg, talker, code2wav
        self.talker_device = talker.model.norm.weight.device
        self.talker_cache = talker.new_cache(config.max_num_seqs, config.talker_len)
        self.talker_lengths = [0] * config.max_num_seqs
        with torch.inference_mode():
            # As pairs, as the reference projects them (each talker prompt: pad and bos).
            self.pad_bos = tuple(special_embeds(talker, specials[[0, 1]]))
            self.trailing = dict(zip((Trailing.PAD, Trailing.EOS),
                                     special_embeds(talker, specials[[0, 2]])))
        self.vocoder: StaticVocoder | None = None
        self.talker_static: StaticTalker | None = None
        capture = graph_mode(config.cuda_graphs, self.talker_device, capture_blockers(talker))
        if capture is not None:
            self.talker_static = StaticTalker(talker, self.talker_cache, capture)
            self.vocoder = StaticVocoder(code2wav, config.max_num_seqs, capture)

    def talker_prompt(self, inputs: ProcessedInputs, embeds: torch.Tensor,
                      captured: torch.Tensor, generated: Sequence[torch.Tensor], header: int,
                      speaker_id: int) -> TalkerPrompt:
        """The talker prompt of a request (`speech.build_talker_prompt`), from the thinker's
        states handed over to the talker's device; `generated`: the input embeddings [Dt] of
        the generated tokens so far; `header`: prompt tokens in the assistant segment."""
        embeds, captured = self.to_talker(embeds), self.to_talker(captured)
        short = max(0, 4 - header)
        first = (self.to_talker(torch.stack(list(generated[:short]))) if short
                 else embeds[:0])
        return build_talker_prompt(self.cfg, self.talker, inputs, embeds, captured, first,
                                   self.pad_bos, speaker_id)

    def to_talker(self, x: torch.Tensor) -> torch.Tensor:
        """A thinker-side tensor on the talker's device (the stage hand-off)."""
        return x.to(self.talker_device)

    def talker_prefill(self, row: int, prompt: TalkerPrompt) -> torch.Tensor:
        """Prefill a talker prompt into `row` (from empty): its last hidden state [1, D]."""
        self.talker_cache.reset([row])
        n = prompt.embeds.shape[0]
        self.talker_lengths[row] = n
        hidden = self.talker(prompt.embeds[None], prompt.positions[:, None],
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
        talker = self.talker
        codes, codec_next = talker.predict_residuals(hidden, code0, sample)
        if not go:
            return codes, None, None
        view = self.talker_cache.rows(list(rows))
        pos = decode_positions(view.lengths, torch.tensor(rope_deltas,
                                                          device=self.talker_device))
        ones = torch.ones(len(rows), dtype=torch.long, device=self.talker_device)
        out = talker((codec_next[list(go)] + text)[:, None], pos, view, ones)[:, 0]
        return codes, out, talker.code0_logits(out)

    def code0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.talker.code0_logits(hidden)

    def text_embed(self, embed: torch.Tensor) -> torch.Tensor:
        """A generated token's input embedding [Dt] as talker trailing text [D]."""
        return self.talker.text_projection(self.to_talker(embed[None]))[0]

    def new_vocoder(self, row: int) -> StreamingCode2Wav | PooledStream:
        """A stream for the request in talker row `row`."""
        if self.vocoder is not None:
            return PooledStream(self.code2wav, row)
        return StreamingCode2Wav(self.code2wav)

    def vocode(self, vocoders: list, codes: torch.Tensor) -> list[torch.Tensor]:
        """Push a chunk of codes [n, G, F] to vocoders standing at the same frame: samples."""
        if self.vocoder is not None:
            return self.vocoder.push_streams(vocoders, codes)
        return push_together(vocoders, codes)
