"""The talker stage alone, for a thinker elsewhere. Each speaking request is a `TalkJob` fed
its thinker states (`thinker_states.StatesUpdate`, in order, from any thread); its audio
leaves as `AudioChunk` events, then one `SpeechEnd` with its codes. An `EngineLoop` runs it as
it runs the engine. `LocalTalker` links a thinker-only `Omni` to one in the same process;
serve_ray/talker.py puts one in each Ray talker replica.

The stage is the engine's own (`talker_stage.TalkerStage`) reading the same states, so the
speech is what the single-process engine makes: the same codes and the same samples.

Legend: G codebooks, F frames, Dt thinker hidden.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass

import torch

from qomni.config import OmniConfig
from qomni.engine.config import EngineConfig
from qomni.engine.loop import Deliver, EngineLoop
from qomni.engine.request import SpeechState, new_speech
from qomni.engine.talker_stage import TalkerStage
from qomni.engine.thinker_states import PromptStates, StatesUpdate, ThinkerStates
from qomni.events import AudioChunk
from qomni.loading import load_model, resolve_dtype, resolve_model_path
from qomni.models.code2wav import Code2Wav
from qomni.models.talker import Talker
from qomni.quant.linear import QuantEmbedding
from qomni.quant.plan import parse_quantization
from qomni.weights import read_rows

_ids = itertools.count()
EMBED_KEY = "thinker.model.embed_tokens.weight"


@dataclass
class SpeechEnd:
    """A job's speech is over and all of it vocoded."""

    codes: torch.Tensor  # int64 [G, F] on the CPU


class TalkJob:
    """One speaking request, as the talker stage reads it (`talker_stage.SpeechJob`)."""

    def __init__(self) -> None:
        self.id = f"talk-{next(_ids)}"
        self.states = ThinkerStates()
        self.speech: SpeechState | None = None  # once its prompt's states arrived
        self.talker_row: int | None = None
        self.events: deque = deque()
        self.finished = False
        self.inbox: deque[StatesUpdate] = deque()  # fed from any thread, read by the loop's

    def feed(self, update: StatesUpdate) -> None:
        """Its next thinker states (then wake the loop that runs it)."""
        self.inbox.append(update)

    def emit_audio(self, pcm: torch.Tensor, sample_rate: int) -> None:
        if pcm.numel():
            self.events.append(AudioChunk(pcm.cpu().numpy(), sample_rate))


class TalkerEngine:
    """Jobs wait for a talker cache row once their prompt's states are in; each step reads the
    states that arrived, admits jobs into free rows, runs one talker stage step over the
    running ones and retires those whose speech is over."""

    def __init__(self, cfg: OmniConfig, talker: Talker, code2wav: Code2Wav,
                 specials: torch.Tensor, config: EngineConfig | None = None):
        """specials [3, Dt]: the thinker's input embeddings of tts_pad, tts_bos, tts_eos."""
        self.config = config = config or EngineConfig()
        self.cfg = cfg
        self.stage = TalkerStage(cfg, talker, code2wav, specials, config)
        self.device = self.stage.runner.talker_device
        self.free_rows = list(range(config.max_num_seqs))
        self.waiting: list[TalkJob] = []
        self.running: list[TalkJob] = []
        self.on_events = lambda: None  # (EngineLoop's mid-step hook: a talker step has none)
        self._busy = False  # the last step did something: the next one may too

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None, quantization: str | None = None,
             engine: EngineConfig | None = None, progress: bool = True) -> TalkerEngine:
        """The talker, code predictor and code2wav of a checkpoint (as Omni.load would load
        them) and three rows of the thinker's embedding table; nothing else of the thinker."""
        path = resolve_model_path(model)
        cfg = OmniConfig.from_hf(path)
        if not cfg.has_audio_output:
            raise ValueError(f"{path} has no talker (a Thinking or Captioner checkpoint)")
        net, _ = load_model(path, cfg, dtype, device, True, quantization, progress,
                            thinker=False)
        weight = net.talker.model.norm.weight
        tok = cfg.tokens
        rows = read_rows(path, EMBED_KEY, (tok.tts_pad, tok.tts_bos, tok.tts_eos))
        stored = resolve_dtype(dtype, weight.device)
        if "embeddings" in parse_quantization(quantization):  # as the thinker looks them up
            table = QuantEmbedding(3, rows.shape[1], weight.dtype, weight.device)
            table.load_part("weight", rows)
            specials = table(torch.arange(3, device=weight.device))
        else:  # rounded to the stored dtype as loaded, then in the compute dtype
            specials = rows.to(weight.device, stored).to(weight.dtype)
        return cls(cfg, net.talker, net.code2wav, specials, engine)

    # -- jobs (the EngineLoop's surface) --------------------------------------------------------

    def add(self, job: TalkJob) -> None:
        self.waiting.append(job)

    def abort(self, job: TalkJob) -> None:
        if not job.finished:
            self._release(job)

    def has_work(self) -> bool:
        jobs = self.running + self.waiting
        return (self._busy or any(j.inbox for j in jobs)
                or bool(self.free_rows and any(j.speech is not None for j in self.waiting)))

    @torch.inference_mode()
    def step(self) -> None:
        for job in self.running + self.waiting:
            self._read(job)
        while self.free_rows:
            job = next((j for j in self.waiting if j.speech is not None), None)
            if job is None:
                break
            self.waiting.remove(job)
            job.talker_row = self.free_rows.pop(0)
            self.running.append(job)
        self._busy = bool(self.running) and self.stage.step(self.running)
        for job in [j for j in self.running if self.stage.finished(j)]:
            codes = job.speech.codes
            g = self.cfg.talker.num_code_groups
            job.events.append(SpeechEnd(torch.stack(codes, dim=1).cpu() if codes
                                        else torch.zeros(g, 0, dtype=torch.long)))
            self._release(job)

    def _read(self, job: TalkJob) -> None:
        """Apply the states that arrived; states out of order fail the job alone."""
        try:
            while job.inbox:
                update = job.inbox.popleft()
                if update.prompt is not None and job.speech is not None:
                    raise ValueError("thinker states with a second prompt")
                job.states.apply(update)
                if update.prompt is not None:
                    job.speech = self._speech(update.prompt)
        except ValueError as e:
            self._release(job)
            job.events.append(e)

    def _speech(self, prompt: PromptStates) -> SpeechState:
        p = prompt.speech
        speech = new_speech(p.speaker_id, p.sampling, p.code_sampling, p.max_frames,
                            self.device)
        self.stage.prepare(speech, prompt.inputs)
        return speech

    def _release(self, job: TalkJob) -> None:
        if job.talker_row is not None:
            self.free_rows.append(job.talker_row)
            job.talker_row = None
        for jobs in (self.running, self.waiting):
            if job in jobs:
                jobs.remove(job)
        if job.speech is not None:
            job.speech.done = True
        job.inbox.clear()
        job.finished = True


class LocalTalker:
    """A `speech_link.TalkerLink` to a TalkerEngine in this process, run on its own thread."""

    def __init__(self, engine: TalkerEngine):
        self.engine = engine
        self.loop = EngineLoop(engine)

    def open(self, deliver: Deliver) -> _LocalChannel:
        job = TalkJob()
        self.loop.submit(job, deliver)
        return _LocalChannel(job, self.loop)

    def close(self) -> None:
        self.loop.close()


class _LocalChannel:
    def __init__(self, job: TalkJob, loop: EngineLoop):
        self.job, self.loop = job, loop

    def send(self, update: StatesUpdate) -> None:
        self.job.feed(update)
        self.loop.wake()

    def abort(self) -> None:
        self.loop.abort(self.job)
