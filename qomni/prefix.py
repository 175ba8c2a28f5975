"""Prompt beginnings prefilled ahead of their request (`Omni.open_prefix`): the handle a caller
holds, and how the inputs of a conversation so far, or of a turn still arriving, are cut."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qomni.engine.request import Prefix
from qomni.models.audio_encoder import audio_token_count
from qomni.multimodal.processor import ProcessedInputs, Processor, media_parts

if TYPE_CHECKING:
    from qomni.engine.loop import EngineLoop

Conversation = Sequence[Mapping[str, Any]]
Process = Callable[..., ProcessedInputs]  # (messages, add_generation_prompt=...) -> inputs


class PromptPrefix:
    """A prompt beginning being prefilled by the engine (see `Omni.open_prefix`)."""

    def __init__(self, prefix: Prefix, loop: EngineLoop):
        self.prefix, self._loop = prefix, loop

    def __len__(self) -> int:
        return len(self.prefix.inputs)

    @property
    def ready(self) -> bool:
        return self.prefix.ready and not self.prefix.closed

    def close(self) -> None:
        """Free its cache row now (a no-op once a request took it over)."""
        self._loop.close_prefix(self.prefix)


def history_inputs(process: Process, messages: Conversation, im_start: int) -> ProcessedInputs:
    """The inputs of a finished conversation as the start of a longer one. Rendered with a next
    user turn after it, then cut where that turn starts: the template renders a message
    differently once a user turn follows it (an assistant reply after the last user query keeps
    its think block)."""
    probe = process([*messages, {"role": "user", "content": "."}], add_generation_prompt=False)
    n = int(torch.nonzero(probe.input_ids == im_start).flatten()[-1])
    return dataclasses.replace(probe, input_ids=probe.input_ids[:n],
                               positions=probe.positions[:, :n], prompt="")


def partial_turn_inputs(process: Process, processor: Processor, messages: Conversation,
                        ) -> ProcessedInputs:
    """The prompt up to the finished windows of the audio still arriving (the last part of
    the last message). A window is finished once the audio reaches past its last STFT
    frame: its log-mel frames, hence its embeddings, are then what the whole turn will give
    (unless a louder moment later raises the -8 floor of the log-mel: the prefix then
    differs and the request prefills everything, see `log_mel_features`)."""
    parts = media_parts(messages)
    last = messages[-1].get("content") if messages else None
    if (not parts or parts[-1][0] != "audio" or not isinstance(last, Sequence)
            or isinstance(last, str) or not last or last[-1] is not parts[-1][1]):
        raise ValueError("open_prefix(partial=True): the last message must end with the "
                         "audio part still arriving")
    full = process(messages, add_generation_prompt=False)
    cfg = processor.config
    media = full.media
    lengths = media.audio_lengths
    frames = int(lengths[-1])
    keep = processor.finished_audio_windows(frames) * processor.audio_window_frames
    tokens = audio_token_count(keep, cfg.thinker.audio.n_window)
    start = int(torch.nonzero(full.input_ids == cfg.tokens.audio_start)[-1]) + 1
    cut = start + tokens
    kept = media.audio_features.shape[-1] - frames + keep  # frames of all audios kept
    if keep:
        lengths = torch.cat([lengths[:-1], lengths.new_tensor([keep])])
    else:
        lengths = lengths[:-1]
    media = dataclasses.replace(
        media, audio_features=media.audio_features[:, :kept] if len(lengths) else None,
        audio_lengths=lengths if len(lengths) else None)
    return dataclasses.replace(full, input_ids=full.input_ids[:cut],
                               positions=full.positions[:, :cut], prompt="", media=media)
