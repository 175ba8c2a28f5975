"""The public entry point: `Omni.load(...)`, then `generate`, `stream`, `open_prefix`, `process`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qomni.cancel import check_cancelled
from qomni.config import OmniConfig
from qomni.engine.config import EngineConfig
from qomni.engine.engine import Engine
from qomni.engine.loop import EngineLoop
from qomni.engine.prefill import prefill
from qomni.engine.request import Prefix, Request, new_speech
from qomni.engine.speech import (
    DEFAULT_SPEAKER,
    code_predictor_sampling,
    talker_sampling_defaults,
)
from qomni.engine.speech_link import SpeechJoin, TalkerLink
from qomni.events import AudioChunk, Finished, GenerateOutput, TextDelta
from qomni.loading import load_model, resolve_model_path
from qomni.models.model import OmniModel
from qomni.multimodal.chat import PromptTooLong, StreamDecoder
from qomni.multimodal.processor import ProcessedInputs, Processor
from qomni.options import GenerateOptions
from qomni.prefix import PromptPrefix, history_inputs, partial_turn_inputs
from qomni.sampling import GREEDY, Sampler, SamplingParams

Conversation = Sequence[Mapping[str, Any]]


class Omni:
    def __init__(self, model: OmniModel, processor: Processor, path: Path,
                 generation_config: dict[str, Any], engine: EngineConfig | None = None):
        self.model = model
        self.engine_config = engine or EngineConfig()
        self._engine_loop: EngineLoop | None = None
        self._loop_lock = threading.Lock()
        self.config = model.cfg
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.path = path
        self.generation_config = generation_config
        self.device = model.thinker.lm_head.weight.device
        self.dtype = model.thinker.lm_head.weight.dtype
        self.quantization: dict[str, str] = {}  # module group -> scheme, for quantized ones
        # Where speech is made when not here: a talker elsewhere, fed each speaking request's
        # thinker states (speech_link.py). A model loaded with audio_output=False can speak.
        self.remote_talker: TalkerLink | None = None

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None, audio_output: bool | None = None,
             progress: bool = True, quantization: str | Mapping[str, str] | None = None,
             engine: EngineConfig | None = None,
             stage_devices: str | Mapping[str, str] | None = None) -> Omni:
        """Load a checkpoint (a directory, a hub id in the local cache, or None for the tiny
        demo). `quantization`: "int4" or "int8" quantizes the decoder layers of the thinker,
        talker and code predictor while loading; components can be set apart, as in
        "int4,code_predictor=int8,lm_heads=int8" (qomni.quant.plan). Checkpoints stored
        quantized (compressed-tensors) are read as they are, without it. `engine` sizes the
        engine (`EngineConfig`: rows, sequence lengths, audio chunks, CUDA graphs, ...); the
        defaults otherwise. `stage_devices` ("thinker=cuda:0,talker=cuda:1") puts the talker,
        code predictor and code2wav on a device of their own."""
        if engine is not None and not isinstance(engine, EngineConfig):
            raise TypeError(f"engine must be an EngineConfig, got {type(engine).__name__}")
        path = resolve_model_path(model)
        cfg = OmniConfig.from_hf(path)
        net, quantized = load_model(path, cfg, dtype, device, audio_output, quantization,
                                    progress, stage_devices)
        gen_file = path / "generation_config.json"
        gen_cfg = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        omni = cls(net, Processor(path, cfg), path, gen_cfg, engine or EngineConfig())
        omni.quantization = quantized
        return omni

    @property
    def speaks(self) -> bool:
        """Speech output is available: a talker here, or a remote one."""
        return bool(self.model.audio_output) or self.remote_talker is not None

    def alive(self) -> bool:
        """The engine thread runs (or has not been started yet)."""
        loop = self._engine_loop
        return loop is None or loop.is_alive()

    @property
    def max_model_len(self) -> int:
        """Tokens one sequence holds, prompt and reply together."""
        return self.engine_config.max_model_len

    @property
    def max_audio_frames(self) -> int:
        """Codec frames (80 ms each) of speech a reply gets when the request sets no cap: the
        checkpoint's talker_max_new_tokens, less one (the reference's cap counts the final
        EOS step too)."""
        return max(1, int(self.generation_config.get("talker_max_new_tokens", 4096)) - 1)

    # -- inputs ---------------------------------------------------------------------------------

    def process(self, messages: Conversation, use_audio_in_video: bool = False,
                **kwargs: Any) -> ProcessedInputs:
        return self.processor(messages, use_audio_in_video=use_audio_in_video, **kwargs)

    @torch.inference_mode()
    def prompt_logits(self, inputs: ProcessedInputs) -> torch.Tensor:
        """Thinker logits for every prompt position: [S, vocab] float32."""
        hidden = prefill(self.model.thinker, [inputs]).hidden
        return self.model.thinker.logits(hidden[0]).float()

    # -- generation -----------------------------------------------------------------------------

    def generate(self, messages: Conversation | Sequence[Conversation], *,
                 options: GenerateOptions | None = None,
                 **kwargs: Any) -> GenerateOutput | list[GenerateOutput]:
        """Answer one conversation (or a list of them, run as a batch). The parameters are
        `GenerateOptions`' fields, as keywords (max_new_tokens=..., sampling=..., ...) or as
        `options=` (keywords then change some of its values). With speech output, also returns
        `audio` (float32, 24 kHz) and `codes` [num_code_groups, frames]."""
        opts = GenerateOptions.build(options, "generate", **kwargs)
        batched = _is_batch(messages)
        if batched and opts.prefix is not None:
            raise ValueError("prefix= goes with one conversation, not a batch")
        convs = list(messages) if batched else [messages]
        reqs = [self._request(c, opts) for c in convs]
        inbox: queue.Queue = queue.Queue()
        loop = self._loop()
        def deliver(req: Request, ev: object) -> None:
            # Text deltas stay on the engine thread: waking this one for each token takes a
            # core from the engine's threads every step (2 cores: 13 -> 8 ms a decode step).
            if not isinstance(ev, TextDelta):
                inbox.put((req, ev))

        with loop.together():
            cancels = [self._submit(loop, req, lambda ev, req=req: deliver(req, ev))
                       for req in reqs]
        audio: dict[str, list[np.ndarray]] = {r.id: [] for r in reqs}
        pending = len(reqs)
        while pending:
            req, ev = inbox.get()
            if isinstance(ev, Exception):
                for cancel in cancels:
                    cancel()
                raise ev
            if isinstance(ev, AudioChunk):
                audio[req.id].append(ev.pcm)
            elif isinstance(ev, Finished):
                pending -= 1
        outs = [self._output(r, audio[r.id]) for r in reqs]
        return outs if batched else outs[0]

    def stream(self, messages: Conversation, *, options: GenerateOptions | None = None,
               **kwargs: Any) -> Iterator[TextDelta | AudioChunk | Finished]:
        """Same arguments as generate(), one conversation. Yields TextDelta as text is decoded
        and AudioChunk as speech is vocoded (the first audio long before the text ends), then one
        Finished. Closing the iterator early aborts the request and frees what it holds."""
        if _is_batch(messages):
            raise ValueError("stream() takes one conversation; use generate() for a batch")
        req = self._request(messages, GenerateOptions.build(options, "stream", **kwargs))
        inbox: queue.Queue = queue.Queue()
        loop = self._loop()
        cancel = self._submit(loop, req, inbox.put)
        try:
            while True:
                ev = inbox.get()
                if isinstance(ev, Exception):
                    raise ev
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            cancel()

    async def astream(self, messages: Conversation, *, options: GenerateOptions | None = None,
                      **kwargs: Any) -> AsyncIterator[TextDelta | AudioChunk | Finished]:
        """stream() for asyncio: the model runs on the engine thread, never on the event loop.
        Cancelling the consumer aborts the request."""
        if _is_batch(messages):
            raise ValueError("astream() takes one conversation")
        opts = GenerateOptions.build(options, "astream", **kwargs)
        cancel = threading.Event()
        try:
            req = await asyncio.to_thread(self._request, messages, opts, cancel)
        except BaseException:  # e.g. the consumer cancelled: the inputs' work stops too
            cancel.set()
            raise
        inbox: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()
        loop = self._loop()
        cancel = self._submit(loop, req,
                              lambda ev: aio.call_soon_threadsafe(inbox.put_nowait, ev))
        try:
            while True:
                ev = await inbox.get()
                if isinstance(ev, Exception):
                    raise ev
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            cancel()

    def open_prefix(self, messages: Conversation, *, partial: bool = False,
                    replaces: PromptPrefix | None = None,
                    options: GenerateOptions | None = None, cancel: threading.Event | None = None,
                    **kwargs: Any) -> PromptPrefix:
        """Prefill the beginning of a prompt now, before the request exists. Pass the result as
        `prefix=` to the request whose prompt continues it: the tokens its prompt shares with
        the prefix's start (same ids, positions and input embeddings, token by token) are not
        prefilled again, the rest is, so the result never depends on the prefix. A prefix holds
        a cache row until a request takes it over, `close()`, or a request that needs the row
        (a prefix never makes requests wait).

        `messages`: the conversation so far (e.g. while the user speaks the next turn); with
        `partial`, its last message is a user turn still arriving, whose last part is the audio
        received so far: the prefix then ends with that audio's finished encoder windows.
        `replaces`: an earlier prefix of the same prompt (the turn with less audio): this one
        takes over its row and keeps what they share; the earlier one is closed either way
        (this call failing included). `options` / keywords: the request's `GenerateOptions`;
        the prompt is rendered as that request renders it (use_audio_in_video, tools,
        enable_thinking, chat_template_kwargs). `cancel`: once set, preparing the prompt stops
        at its next media item or log-mel block (`qomni.cancel.Cancelled`) and nothing is
        prefilled. A prefix that leaves no room for a reply is `PromptTooLong`."""
        if _is_batch(messages):
            raise ValueError("open_prefix() takes one conversation")
        if replaces is not None and not isinstance(replaces, PromptPrefix):
            raise ValueError("replaces must come from Omni.open_prefix, "
                             f"got {type(replaces).__name__}")
        try:
            inputs = self._prefix_inputs(messages, partial, options, cancel, kwargs)
        except BaseException:
            if replaces is not None:
                replaces.close()
            raise
        prefix = Prefix(inputs, capture=self.speaks,
                        base=replaces.prefix if replaces is not None else None)
        loop = self._loop()
        loop.open_prefix(prefix)
        return PromptPrefix(prefix, loop)

    def _prefix_inputs(self, messages: Conversation, partial: bool,
                       options: GenerateOptions | None, cancel: threading.Event | None,
                       kwargs: dict[str, Any]) -> ProcessedInputs:
        template = GenerateOptions.build(options, "open_prefix", **kwargs).template_kwargs()
        limit = self.engine_config.max_model_len

        def process(conv: Conversation, **kw: Any) -> ProcessedInputs:
            return self.processor(conv, **template, max_model_len=limit, cancel=cancel, **kw)

        if partial:
            inputs = partial_turn_inputs(process, self.processor, messages)
        else:
            inputs = history_inputs(process, messages, self.config.tokens.im_start)
        if len(inputs) >= limit:  # the engine could not hold it with a reply
            raise PromptTooLong(len(inputs), limit)
        check_cancelled(cancel)
        return inputs

    # -- helpers --------------------------------------------------------------------------------

    def _request(self, conv: Conversation, opts: GenerateOptions,
                 cancel: threading.Event | None = None) -> Request:
        speak, speaker_id = self._audio_request(opts.return_audio, opts.speaker)
        # Refused here, before its media are decoded, when the text alone is too long.
        inputs = self.processor(conv, **opts.template_kwargs(),
                                max_model_len=self.engine_config.max_model_len, cancel=cancel)
        speech = None
        if speak:
            talker = _seeded(opts.talker_sampling
                             or talker_sampling_defaults(self.generation_config), opts.seed)
            frames = opts.max_audio_frames
            if frames is None:
                frames = self.max_audio_frames
            device = (self.model.talker.model.norm.weight.device if self.model.audio_output
                      else torch.device("cpu"))  # (a remote talker builds its own samplers)
            speech = new_speech(speaker_id, talker, code_predictor_sampling(talker), frames,
                                device)
        params = _seeded(opts.sampling or GREEDY, opts.seed)
        return Request(inputs, Sampler([params], self.device), opts.max_new_tokens,
                       StreamDecoder(self.tokenizer), speech, stop_strings=opts.stop,
                       speech_stops=opts.speech_stop,
                       prefix=opts.prefix.prefix if opts.prefix is not None else None)

    def _output(self, req: Request, audio: list[np.ndarray]) -> GenerateOutput:
        ids = req.text_ids()
        text = req.text if req.stopped_by_string else \
            self.tokenizer.decode(ids, skip_special_tokens=True)
        out = GenerateOutput(text=text,
                             token_ids=ids, finish_reason=req.finish_reason or "abort",
                             usage=req.usage())
        if req.speech is not None:
            g = self.config.talker.num_code_groups
            codes = req.speech.codes
            out.codes = (torch.stack(codes, dim=1).cpu() if codes
                         else torch.zeros(g, 0, dtype=torch.long))
            out.audio = np.concatenate(audio) if audio else np.zeros(0, np.float32)
            out.sample_rate = self.config.code2wav.sample_rate
        return out

    def _submit(self, loop: EngineLoop, req: Request, deliver: Callable[[object], None]
                ) -> Callable[[], None]:
        """Start a request; returns what a caller that goes away calls (a no-op once it is
        done). With a remote talker, its speech is made there and joins its events here."""
        if req.speech is None or self.remote_talker is None:
            loop.submit(req, deliver)
        else:
            join = SpeechJoin(req, self.remote_talker, deliver, lambda: loop.abort(req))
            loop.submit(req, join.from_thinker)

            def cancel() -> None:
                join.cancel()
                if not req.finished:
                    loop.abort(req)
            return cancel
        return lambda: None if req.finished else loop.abort(req)

    def engine_occupancy(self) -> dict[str, int]:
        """`Engine.occupancy()`; all zeros before the engine has started."""
        loop = self._engine_loop
        if loop is None:
            return dict.fromkeys(("waiting", "running", "prefixes", "rows_in_use"), 0)
        return loop.engine.occupancy()

    def _loop(self) -> EngineLoop:
        with self._loop_lock:
            if self._engine_loop is None:
                engine = Engine(self.model, self._stop_ids(), self.engine_config)
                self._engine_loop = EngineLoop(engine)
            return self._engine_loop

    def _stop_ids(self) -> list[int]:
        ids = {self.config.tokens.im_end}
        eos = self.generation_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        return sorted(ids)

    def _audio_request(self, return_audio: bool | None, speaker: str | None) -> tuple[bool, int]:
        """(speak?, speaker codec id). return_audio=None means "if the talker is loaded"."""
        if return_audio and not self.speaks:
            reason = ("this checkpoint has no talker (a Thinking or Captioner checkpoint)"
                      if not self.config.has_audio_output else
                      "it was loaded with audio_output=False")
            raise ValueError(f"speech output is not available: {reason}")
        speak = self.speaks if return_audio is None else return_audio
        if not speak:
            if speaker is not None and self.config.talker is not None:
                self.config.talker.speaker(speaker)  # still reject unknown voices
            return False, -1
        return True, self.config.talker.speaker(speaker or DEFAULT_SPEAKER)


def _seeded(params: SamplingParams, seed: int | None) -> SamplingParams:
    return params if seed is None or params.seed is not None else \
        dataclasses.replace(params, seed=seed)


def _is_batch(messages: Any) -> bool:
    return (isinstance(messages, Sequence) and len(messages) > 0
            and isinstance(messages[0], Sequence) and not isinstance(messages[0], (str, Mapping)))
