"""The seam between the stages: what the talker of one speaking request reads from the thinker,
as a stream of updates. The engine's own talker stage reads it in place; a talker elsewhere
(qomni/serve_ray/talker.py) gets the same updates through Ray and reads the same stream, so
the speech cannot differ.

Legend: S prompt tokens, Dt thinker hidden, k tokens in an update.

Per request: one `StatesUpdate` with the `PromptStates` once its prompt is prefilled (the
talker prompt's user turns and assistant header), then one per thinker step that makes more of
the generated text speakable: those tokens with their input embeddings (the talker reads them
as trailing text, token by token), and finally whether the text is done and how it ended.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from qomni.engine.speech import SpeechText
from qomni.models.thinker import MediaInputs
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import SamplingParams

# Media fields the talker prompt's positions read (the encoders' inputs stay with the thinker).
_TALKER_MEDIA = ("audio_lengths", "image_grid_thw", "video_grid_thw", "video_second_per_grid")


@dataclass
class SpeechParams:
    """How the request speaks: the talker builds its samplers from these."""

    speaker_id: int
    sampling: SamplingParams  # codebook 0
    code_sampling: SamplingParams  # codebooks 1..G-1
    max_frames: int


@dataclass
class PromptStates:
    inputs: ProcessedInputs  # ids, positions and media grids, without the encoders' inputs
    embeds: torch.Tensor  # [S, Dt] the thinker's input embeddings (media features in place)
    hidden: torch.Tensor  # [S, Dt] its hidden states after accept_hidden_layer layers
    speech: SpeechParams


@dataclass
class StatesUpdate:
    prompt: PromptStates | None = None
    tokens: list[int] = field(default_factory=list)  # generated, now speakable
    embeds: torch.Tensor | None = None  # [k', Dt] of those that are tokens (not the -1 mark)
    done: bool = False  # (as SpeechText) the text is over: no more tokens
    stopped: bool = False
    eos: bool = False

    def to(self, device: torch.device | str) -> StatesUpdate:
        """Copies of the tensors on `device` (the CPU, to cross processes): compact, as a
        view would pickle its whole storage."""
        p = self.prompt
        if p is not None:
            p = dataclasses.replace(p, embeds=p.embeds.to(device, copy=True),
                                    hidden=p.hidden.to(device, copy=True))
        e = None if self.embeds is None else self.embeds.to(device, copy=True)
        return dataclasses.replace(self, prompt=p, embeds=e)


def talker_inputs(x: ProcessedInputs) -> ProcessedInputs:
    """What the talker reads of a prompt's inputs."""
    media = MediaInputs(**{k: getattr(x.media, k) for k in _TALKER_MEDIA})
    return dataclasses.replace(x, media=media)


class ThinkerStates:
    """One request's stream, as the talker reads it."""

    def __init__(self) -> None:
        self.prompt: PromptStates | None = None
        self.tokens: list[int] = []
        self.embeds: list[torch.Tensor] = []  # [Dt] each, of tokens[i]
        self.done = self.stopped = self.eos = False

    def apply(self, update: StatesUpdate) -> None:
        if self.done:
            raise ValueError("thinker states after the end of the text")
        if update.prompt is not None:
            self.prompt = update.prompt
        elif self.prompt is None:
            raise ValueError("thinker states before the prompt's")
        self.tokens += update.tokens
        if update.embeds is not None:
            self.embeds += list(update.embeds)
        self.done, self.stopped, self.eos = update.done, update.stopped, update.eos

    def text(self) -> SpeechText:
        return SpeechText(self.tokens, self.done, self.stopped, self.eos)

    def drop_prompt(self) -> None:
        """The talker prompt is built: its thinker states are not needed any more."""
        self.prompt = dataclasses.replace(self.prompt, embeds=None, hidden=None)


class StatesSender:
    """The thinker side of one request's stream: what it has sent so far."""

    def __init__(self) -> None:
        self.sent = 0  # tokens
        self.done = False

    def update(self, text: SpeechText) -> StatesUpdate | None:
        """The update that brings the talker to `text` (its `embeds` still to fill), or None."""
        if self.done or (len(text.tokens) == self.sent and not text.done):
            return None
        new = text.tokens[self.sent:]
        self.sent, self.done = len(text.tokens), text.done
        return StatesUpdate(tokens=new, done=text.done, stopped=text.stopped, eos=text.eos)
