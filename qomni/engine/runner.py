"""The engine's thinker calls, over cache rows: prompts embedded and prefilled (several at
once, each from where its row stands) and decode steps. It owns the thinker cache; which row is
whose is the scheduler's. The talker's calls are talker_runner.py's.

Legend: R rows (max_num_seqs), n rows in a call, S tokens, Dt thinker hidden, V vocabulary.

Every call takes host lists (rows, tokens, position offsets) and builds its tensors here, so the
step shapes are decided in one place. With `cuda_graphs` the decode calls go through the static
steps (static_steps.py): batch buckets, captured as CUDA graphs on a CUDA device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qomni.engine.config import EngineConfig
from qomni.engine.graphs import capture_blockers
from qomni.engine.prefill import Prompt, embed_prompt, pack
from qomni.engine.static_steps import StaticThinker
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
        self.lengths = [0] * config.max_num_seqs  # each row's cached tokens, known on the host
        capture = graph_mode(config.cuda_graphs, self.device, capture_blockers(model.thinker))
        self.static = None if capture is None else StaticThinker(model.thinker, self.cache,
                                                                 capture)

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

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.long, device=self.device)


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
