"""The whole network as stored in a checkpoint: `thinker`, and with speech output `talker` and
`code2wav`."""

from __future__ import annotations

from torch import nn

from qomni.config import OmniConfig
from qomni.models.code2wav import Code2Wav
from qomni.models.talker import Talker
from qomni.models.thinker import Thinker


class OmniModel(nn.Module):
    def __init__(self, cfg: OmniConfig, audio_output: bool, thinker: bool = True):
        """thinker=False: the speech stages alone, for a talker that runs apart from its
        thinker (qomni.engine.talker_engine)."""
        super().__init__()
        if audio_output and not cfg.has_audio_output:
            raise ValueError("this checkpoint has no talker (enable_audio_output=false)")
        self.cfg = cfg
        self.thinker = Thinker(cfg.thinker, cfg.tokens) if thinker else None
        self.audio_output = audio_output
        if audio_output:
            self.talker = Talker(cfg.talker)
            self.code2wav = Code2Wav(cfg.code2wav)
