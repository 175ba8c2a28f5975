"""The engine's model calls, over cache rows: prompts embedded and prefilled (several at once, each
from where its row stands), thinker decode steps, talker prefill and steps with the code
predictor, and vocoder chunks. It owns the caches; which row is whose is the scheduler's.

Legend: R rows (max_num_seqs), n rows in a call, S tokens, Dt thinker hidden, D talker hidden,
G codebooks, V vocabulary.

Every call takes host lists (rows, tokens, position offsets) and builds its tensors here, so the
step shapes are decided in one place (fixed-size decode batches for CUDA graphs go here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qomni.engine.config import EngineConfig
from qomni.engine.prefill import Prompt, embed_prompt, pack
from qomni.engine.speech import TalkerPrompt, Trailing, build_talker_prompt, special_embeds
from qomni.models.code2wav_stream import StreamingCode2Wav, push_together
from qomni.models.model import OmniModel
from qomni.models.rope import decode_positions
from qomni.multimodal.processor import ProcessedInputs


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
        if model.audio_output:
            self.talker_cache = model.talker.new_cache(config.max_num_seqs, config.talker_len)
            tok = self.cfg.tokens
            with torch.inference_mode():
                self.trailing = dict(zip((Trailing.PAD, Trailing.EOS),
                                         special_embeds(model, (tok.tts_pad, tok.tts_eos))))

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
        [n, V]."""
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
        """The talker prompt of a request (`speech.build_talker_prompt`)."""
        return build_talker_prompt(self.model, inputs, embeds, captured, generated, speaker_id)

    def talker_prefill(self, row: int, prompt: TalkerPrompt) -> torch.Tensor:
        """Prefill a talker prompt into `row` (from empty): its last hidden state [1, D]."""
        self.talker_cache.reset([row])
        n = prompt.embeds.shape[0]
        hidden = self.model.talker(prompt.embeds[None], prompt.positions[:, None],
                                   self.talker_cache.rows([row]),
                                   torch.tensor([n], device=self.device))
        return hidden[:, -1]

    def talker_step(self, rows: Sequence[int], inputs: torch.Tensor,
                    rope_deltas: Sequence[float]) -> torch.Tensor:
        """One talker step per row; inputs [n, D] (codec part + trailing text). -> [n, D]."""
        view = self.talker_cache.rows(list(rows))
        pos = decode_positions(view.lengths, torch.tensor(rope_deltas, device=self.device))
        out = self.model.talker(inputs[:, None], pos, view, self._ones(len(rows)))
        return out[:, 0]

    def code0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.talker.code0_logits(hidden)

    def finish_frames(self, hidden: torch.Tensor, code0: torch.Tensor,
                      sample: Callable[[torch.Tensor], torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The code predictor for frames whose code0 was chosen: codes [n, G] and the codec part
        of each row's next talker input [n, D]."""
        return self.model.talker.predict_residuals(hidden, code0, sample)

    def text_embed(self, token: int) -> torch.Tensor:
        """A generated token as talker trailing text [D]."""
        ids = torch.tensor([token], device=self.device)
        return self.model.talker.text_projection(self.model.thinker.embed(ids))[0]

    # -- vocoder --------------------------------------------------------------------------------

    def new_vocoder(self) -> StreamingCode2Wav:
        return StreamingCode2Wav(self.model.code2wav)

    def vocode(self, vocoders: list[StreamingCode2Wav], codes: torch.Tensor
               ) -> list[torch.Tensor]:
        """Push a chunk of codes [n, G, F] to vocoders standing at the same frame: samples."""
        return push_together(vocoders, codes)

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.long, device=self.device)
