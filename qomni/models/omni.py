"""The whole network as stored in a checkpoint: `thinker`, and with speech output `talker` and
`code2wav` (added by the speech stage)."""

from __future__ import annotations

from torch import nn

from qomni.config import OmniConfig
from qomni.models.thinker import Thinker


class OmniModel(nn.Module):
    def __init__(self, cfg: OmniConfig, audio_output: bool):
        super().__init__()
        self.cfg = cfg
        self.thinker = Thinker(cfg.thinker, cfg.tokens)
        self.audio_output = audio_output
