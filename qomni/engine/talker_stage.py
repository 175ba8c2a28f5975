"""The talker stage: talker prefill once a speaking request's text has begun, then one talker
step (batched) for every request whose next trailing text is known, the code predictor for all
their frames at once, and the streaming vocoder in chunks. It reads each request's thinker
states (`thinker_states.ThinkerStates`) and nothing else of the thinker, so it runs the same
inside the engine (engine.py, after each thinker step) and in a process of its own
(`TalkerEngine`, for a thinker elsewhere).

Legend: n requests in a call, Dt thinker hidden, D talker hidden, V talker codec vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from qomni.config import OmniConfig
from qomni.engine.config import EngineConfig
from qomni.engine.request import SpeechState
from qomni.engine.speech import (
    ASSISTANT_POSITIONS,
    Trailing,
    assistant_header,
    talker_prompt_ready,
    trailing_text,
)
from qomni.engine.talker_runner import TalkerRunner
from qomni.engine.thinker_states import ThinkerStates
from qomni.models.code2wav import Code2Wav
from qomni.models.talker import Talker
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import sample_rows


class SpeechJob(Protocol):
    """What the stage reads and sets on a speaking request (`engine.request.Request`, or
    `talker_engine.TalkJob`)."""

    speech: SpeechState
    states: ThinkerStates
    talker_row: int | None

    def emit_audio(self, pcm: torch.Tensor, sample_rate: int) -> None: ...


class TalkerStage:
    def __init__(self, cfg: OmniConfig, talker: Talker, code2wav: Code2Wav,
                 specials: torch.Tensor, config: EngineConfig):
        """specials [3, Dt]: the thinker's input embeddings of tts_pad, tts_bos, tts_eos."""
        self.cfg, self.config = cfg, config
        self.runner = TalkerRunner(cfg, talker, code2wav, specials, config)

    def prepare(self, speech: SpeechState, inputs: ProcessedInputs) -> None:
        """Check that a request can speak here, and cap its frames to the talker cache."""
        n = len(inputs)
        room = self.config.talker_len - n - ASSISTANT_POSITIONS
        if room < 1:
            raise ValueError(f"the prompt has {n} tokens, too many for the talker cache "
                             f"({self.config.talker_len}, max_talker_len)")
        speech.max_frames = min(speech.max_frames, room)
        speech.header = assistant_header(inputs.input_ids, self.cfg.tokens)

    @staticmethod
    def finished(job: SpeechJob) -> bool:
        """Its speech is over and all of it vocoded."""
        return job.speech.done and not job.speech.pending

    def step(self, jobs: Sequence[SpeechJob]) -> bool:
        """One talker step and the vocoder chunks due; whether anything was done."""
        return self._talk(jobs) | self._vocode(jobs)

    def _talk(self, jobs: Sequence[SpeechJob]) -> bool:
        # The prompt's states come with the request's first token.
        new = [j for j in jobs if j.speech.hidden is None and not j.speech.done
               and j.states.prompt is not None]
        for job in new:
            ready = talker_prompt_ready(job.speech.header, job.states.text())
            if ready is False:
                job.speech.done = True  # an empty answer: nothing to say
            elif ready:
                self._talker_prefill(job)
        ready = []
        for job in jobs:
            sp = job.speech
            if sp.done or sp.hidden is None or job in new:
                continue
            text = trailing_text(sp.header, job.states.text(), sp.frames)
            if text is not None:
                ready.append((job, text))
        if not ready:
            return bool(new)
        reqs = [r for r, _ in ready]
        go = [i for i, r in enumerate(reqs) if r.speech.frames + 1 < r.speech.max_frames]
        samplers = [r.speech.code_sampler for r in reqs]
        text = torch.stack([self._trailing_embed(*ready[i]) for i in go]) if go else None
        code0 = torch.stack([r.speech.code0 for r in reqs])
        codes, hidden, logits = self.runner.speak(
            torch.stack([r.speech.hidden for r in reqs]), code0, samplers,
            lambda logits: sample_rows(logits, samplers, [None] * len(samplers)),
            [r.speech.frames for r in reqs], go, [reqs[i].talker_row for i in go], text,
            [reqs[i].speech.rope_delta for i in go])
        for i, req in enumerate(reqs):
            sp = req.speech
            sp.pending.append(codes[i])
            sp.codes.append(codes[i])
            sp.frames += 1
            sp.seen[code0[i]] = True
            if sp.frames >= sp.max_frames:
                sp.done = True
        if go:
            self._choose_code0([reqs[i] for i in go], hidden, logits)
        return True

    def _talker_prefill(self, job: SpeechJob) -> None:
        sp, states = job.speech, job.states
        p = states.prompt
        prompt = self.runner.talker_prompt(p.inputs, p.embeds, p.hidden, states.embeds,
                                           sp.header, sp.speaker_id)
        states.drop_prompt()
        sp.rope_delta, sp.tail = prompt.rope_delta, prompt.tail
        sp.seen = torch.zeros(self.cfg.talker.text.vocab_size, dtype=torch.bool,
                              device=self.runner.talker_device)
        hidden = self.runner.talker_prefill(job.talker_row, prompt)
        self._choose_code0([job], hidden, self.runner.code0_logits(hidden))

    def _choose_code0(self, jobs: list[SpeechJob], hidden: torch.Tensor,
                      logits: torch.Tensor) -> None:
        """Sample codebook 0 of each request's next frame from logits [n, V] (of hidden
        [n, D])."""
        eos = self.cfg.talker.codec_eos_token_id
        params = [j.speech.sampler.params[0] for j in jobs]
        early = [i for i, (j, p) in enumerate(zip(jobs, params))
                 if p.ignore_eos or j.speech.frames < p.min_tokens]
        if early:  # speech that must go on: EOS is never a frame
            logits[torch.tensor(early, device=logits.device), eos] = float("-inf")
        code0 = sample_rows(logits, [j.speech.sampler for j in jobs],
                            [j.speech.seen for j in jobs])
        for i, job in enumerate(jobs):
            sp = job.speech
            sp.hidden, sp.code0 = hidden[i], code0[i]
            if int(code0[i]) == eos:
                sp.done = True

    def _trailing_embed(self, job: SpeechJob, text: int | Trailing) -> torch.Tensor:
        """Trailing text [D]: an entry of the assistant segment, tts_eos or tts_pad."""
        if isinstance(text, Trailing):
            return self.runner.trailing[text]
        header = job.speech.header
        if text < header:  # a prompt token after the first four of the segment
            return job.speech.tail[text - 4]
        return self.runner.text_embed(job.states.embeds[text - header])

    def _vocode(self, jobs: Sequence[SpeechJob]) -> bool:
        """Vocode each request's pending frames once a chunk is due. Chunks grow: the first has
        `first_chunk_frames` frames (latency), then each is as long as all audio sent before it,
        up to `chunk_frames`, so playback never waits on a chunk longer than the audio it has
        queued. Requests standing at the same frame with equal chunks share one decode."""
        first, most = self.config.first_chunk_frames, self.config.chunk_frames
        groups: dict[tuple[int, int], list[SpeechJob]] = {}
        for job in jobs:
            sp = job.speech
            if not sp.pending:
                continue
            if sp.vocoder is None:
                sp.vocoder = self.runner.new_vocoder(job.talker_row)
            done = sp.vocoder.frames
            need = first if done == 0 else min(most, max(first, done))
            if len(sp.pending) >= need or sp.done:
                groups.setdefault((done, len(sp.pending)), []).append(job)
        sample_rate = self.cfg.code2wav.sample_rate
        for group in groups.values():
            codes = torch.stack([torch.stack(j.speech.pending, dim=1) for j in group])
            pcms = self.runner.vocode([j.speech.vocoder for j in group], codes)
            for job, pcm in zip(group, pcms):
                job.speech.pending.clear()
                job.emit_audio(pcm, sample_rate)
        return bool(groups)
