"""The public entry point: `Omni.load(...)`, then `generate`, `stream`, `process`, `prompt_logits`."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qomni.config import OmniConfig
from qomni.engine.generate import Step, generate_tokens, prefill
from qomni.engine.speech import build_talker_prompt, talker_frames, talker_sampling_defaults, \
    trailing_text
from qomni.events import AudioChunk, Finished, GenerateOutput, TextDelta, Usage
from qomni.models.omni import OmniModel
from qomni.multimodal.chat import StreamDecoder
from qomni.multimodal.processor import ProcessedInputs, Processor
from qomni.sampling import GREEDY, Sampler, SamplingParams
from qomni.weights import load_weights, meta_parameters

Conversation = Sequence[Mapping[str, Any]]
DEFAULT_SPEAKER = "Ethan"  # the reference's default voice
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A checkpoint directory: a local path, a hub id already in the local Hugging Face cache,
    or (None) the tiny random demo checkpoint, made on first use."""
    if model is None:
        from qomni.tiny import demo_checkpoint

        return demo_checkpoint()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if isinstance(model, str) and _HUB_ID.fullmatch(model):
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(
            os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
        snapshots = sorted((hub / f"models--{model.replace('/', '--')}" / "snapshots").glob("*"))
        if snapshots:
            return snapshots[-1]
        raise FileNotFoundError(
            f"{model!r} is not a local directory and is not in the Hugging Face cache at {hub}; "
            f"download it first (e.g. `hf download {model}`) or pass its directory")
    raise FileNotFoundError(f"model directory {str(path)!r} does not exist")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: bfloat16 on CUDA (the checkpoint's dtype), float32 on CPU (where bf16 single-token
    matmuls are slower than fp32)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class Omni:
    def __init__(self, model: OmniModel, processor: Processor, path: Path,
                 generation_config: dict[str, Any]):
        self.model = model
        self.config = model.cfg
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.path = path
        self.generation_config = generation_config
        self.device = model.thinker.lm_head.weight.device
        self.dtype = model.thinker.lm_head.weight.dtype

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None, audio_output: bool | None = None,
             progress: bool = True) -> Omni:
        path = resolve_model_path(model)
        cfg = OmniConfig.from_hf(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(dtype, device)
        if audio_output and not cfg.has_audio_output:
            raise ValueError(f"{path} has no talker (a Thinking or Captioner checkpoint, "
                             "enable_audio_output=false): it cannot produce speech")
        if audio_output is None:
            audio_output = cfg.has_audio_output
        with meta_parameters():
            net = OmniModel(cfg, audio_output)
        skip = [] if audio_output else ["talker.", "code2wav."]
        load_weights(net, path, dtype=dtype, device=device, skip_prefixes=skip, progress=progress)
        net.to(device).eval()
        gen_file = path / "generation_config.json"
        gen_cfg = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        return cls(net, Processor(path, cfg), path, gen_cfg)

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
                 max_new_tokens: int = 1024, sampling: SamplingParams | None = None,
                 talker_sampling: SamplingParams | None = None, speaker: str | None = None,
                 return_audio: bool | None = None, max_audio_frames: int | None = None,
                 use_audio_in_video: bool = False, seed: int | None = None,
                 **template_kwargs: Any) -> GenerateOutput | list[GenerateOutput]:
        """Answer one conversation (or a list of them, as a batch). With speech output, also
        returns `audio` (float32, 24 kHz) and `codes` [num_code_groups, frames]."""
        batched = _is_batch(messages)
        convs = list(messages) if batched else [messages]
        speak, speaker_id = self._audio_request(return_audio, speaker)
        inputs = [self.process(c, use_audio_in_video, **template_kwargs) for c in convs]
        text = self._thinker(inputs, sampling, seed, max_new_tokens, speak)
        outs = []
        for x, (tokens, reason) in zip(inputs, text.results):
            ids = tokens[:-1] if reason == "stop" else tokens
            outs.append(GenerateOutput(text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                       token_ids=ids, finish_reason=reason,
                                       usage=Usage(len(x), len(tokens))))
        if speak:
            codes = self._speak(inputs, text, speaker_id, talker_sampling, seed, max_audio_frames)
            for out, c in zip(outs, codes):
                out.codes, out.usage.audio_frames = c, c.shape[1]
                out.audio = self._vocode(c)
                out.sample_rate = self.config.code2wav.sample_rate
        return outs if batched else outs[0]

    def stream(self, messages: Conversation, *, max_new_tokens: int = 1024,
               sampling: SamplingParams | None = None,
               talker_sampling: SamplingParams | None = None, speaker: str | None = None,
               return_audio: bool | None = None, max_audio_frames: int | None = None,
               use_audio_in_video: bool = False, seed: int | None = None,
               **template_kwargs: Any) -> Iterator[TextDelta | AudioChunk | Finished]:
        """Yield TextDelta events as text is decoded, AudioChunk events with speech output,
        then one Finished event."""
        if _is_batch(messages):
            raise ValueError("stream() takes one conversation; use generate() for a batch")
        speak, speaker_id = self._audio_request(return_audio, speaker)
        inputs = self.process(messages, use_audio_in_video, **template_kwargs)
        decoder = StreamDecoder(self.tokenizer)
        text = _ThinkerRun(self.model.thinker, [inputs], self._sampler(sampling, seed, 1),
                           max_new_tokens, self._stop_ids(),
                           self._accept_layer() if speak else None)
        pending: list[int] = []
        for step in text.steps():
            tok = int(step.tokens[0])
            if step.reasons[0] == "stop":
                break
            pending.append(tok)
            delta = decoder.push([tok])
            if delta:
                yield TextDelta(delta, pending)
                pending = []
        tail = decoder.flush()
        if tail or pending:
            yield TextDelta(tail, pending)
        tokens, reason = text.results[0]
        usage = Usage(len(inputs), len(tokens))
        if speak:
            (codes,) = self._speak([inputs], text, speaker_id, talker_sampling, seed,
                                   max_audio_frames)
            usage.audio_frames = codes.shape[1]
            if codes.shape[1]:
                yield AudioChunk(self._vocode(codes), self.config.code2wav.sample_rate)
        yield Finished(reason, usage)

    # -- helpers --------------------------------------------------------------------------------

    def _thinker(self, inputs: list[ProcessedInputs], sampling: SamplingParams | None,
                 seed: int | None, max_new_tokens: int, speak: bool) -> _ThinkerRun:
        run = _ThinkerRun(self.model.thinker, inputs, self._sampler(sampling, seed, len(inputs)),
                          max_new_tokens, self._stop_ids(),
                           self._accept_layer() if speak else None)
        for _ in run.steps():
            pass
        return run

    def _speak(self, inputs: list[ProcessedInputs], text: _ThinkerRun, speaker_id: int,
               talker_sampling: SamplingParams | None, seed: int | None,
               max_audio_frames: int | None) -> list[torch.Tensor]:
        """Codec codes [G, F] per row for the thinker's finished answers."""
        pre = text.prefill
        with torch.inference_mode():
            prompts, trailing = [], []
            for b, (x, (tokens, _)) in enumerate(zip(inputs, text.results)):
                n = len(x)
                prompts.append(build_talker_prompt(self.model, x, pre.embeds[b, :n],
                                                   pre.captured[b, :n], tokens[0], speaker_id))
                trailing.append(trailing_text(self.model, tokens))
            params = talker_sampling or talker_sampling_defaults(self.generation_config)
            if seed is not None and params.seed is None:
                params = dataclasses.replace(params, seed=seed)
            if max_audio_frames is None:
                max_audio_frames = int(self.generation_config.get("talker_max_new_tokens", 4096)) - 1
            frames: list[list[torch.Tensor]] = [[] for _ in inputs]
            for step in talker_frames(self.model, prompts, trailing, params, max_audio_frames):
                for b in step.emitted.nonzero().flatten().tolist():
                    frames[b].append(step.codes[b])
        g = self.config.talker.num_code_groups
        return [torch.stack(f, dim=1).cpu() if f else torch.zeros(g, 0, dtype=torch.long)
                for f in frames]

    @torch.inference_mode()
    def _vocode(self, codes: torch.Tensor) -> np.ndarray:
        if codes.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        wav = self.model.code2wav(codes[None].to(self.device))
        return wav[0, 0].cpu().numpy()

    def _accept_layer(self) -> int:
        return self.config.talker.accept_hidden_layer

    def _stop_ids(self) -> list[int]:
        ids = {self.config.tokens.im_end}
        eos = self.generation_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        return sorted(ids)

    def _sampler(self, sampling: SamplingParams | None, seed: int | None, n: int) -> Sampler:
        params = sampling or GREEDY
        if seed is not None:
            params = dataclasses.replace(params, seed=seed)
        return Sampler([params] * n, self.device)

    def _audio_request(self, return_audio: bool | None, speaker: str | None) -> tuple[bool, int]:
        """(speak?, speaker codec id). return_audio=None means "if the talker is loaded"."""
        if return_audio and not self.model.audio_output:
            reason = ("this checkpoint has no talker (a Thinking or Captioner checkpoint)"
                      if not self.config.has_audio_output else
                      "it was loaded with audio_output=False")
            raise ValueError(f"speech output is not available: {reason}")
        speak = self.model.audio_output if return_audio is None else return_audio
        if not speak:
            if speaker is not None and self.config.talker is not None:
                self.config.talker.speaker(speaker)  # still reject unknown voices
            return False, -1
        return True, self.config.talker.speaker(speaker or DEFAULT_SPEAKER)


class _ThinkerRun:
    """Drives `generate_tokens` and keeps what later stages need: the prefill (embeddings and
    captured hidden states) and each row's generated tokens (including the final one) and finish
    reason."""

    def __init__(self, thinker, inputs, sampler, max_new_tokens, stop_ids, capture):
        self._it = generate_tokens(thinker, inputs, sampler, max_new_tokens, stop_ids, capture)
        self.prefill = next(self._it)
        self.results: list[tuple[list[int], str]] = [([], "length") for _ in inputs]

    def steps(self) -> Iterator[Step]:
        for step in self._it:
            for b, (tok, act) in enumerate(zip(step.tokens.tolist(), step.active.tolist())):
                if act:
                    self.results[b][0].append(tok)
                    if step.reasons[b] is not None:
                        self.results[b] = (self.results[b][0], step.reasons[b])
            yield step


def _is_batch(messages: Any) -> bool:
    return (isinstance(messages, Sequence) and len(messages) > 0
            and isinstance(messages[0], Sequence) and not isinstance(messages[0], (str, Mapping)))
