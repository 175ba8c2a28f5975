"""The public entry point: `Omni.load(...)`, then `generate`, `stream`, `process`, `prompt_logits`."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qomni.config import OmniConfig
from qomni.engine.generate import generate_tokens, prefill
from qomni.events import Finished, GenerateOutput, TextDelta, Usage
from qomni.models.omni import OmniModel
from qomni.multimodal.chat import StreamDecoder
from qomni.multimodal.processor import ProcessedInputs, Processor
from qomni.sampling import GREEDY, Sampler, SamplingParams
from qomni.weights import load_weights, meta_parameters

Conversation = Sequence[Mapping[str, Any]]
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
        audio_output = False  # speech output is not built yet
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
        batched = _is_batch(messages)
        convs = list(messages) if batched else [messages]
        self._check_audio_request(return_audio, speaker)
        inputs = [self.process(c, use_audio_in_video, **template_kwargs) for c in convs]
        sampler = self._sampler(sampling, seed, len(inputs))
        tokens: list[list[int]] = [[] for _ in inputs]
        reasons = ["length"] * len(inputs)
        for step in generate_tokens(self.model.thinker, inputs, sampler, max_new_tokens,
                                    self._stop_ids()):
            for b, (tok, act) in enumerate(zip(step.tokens.tolist(), step.active.tolist())):
                if not act:
                    continue
                if step.reasons[b] == "stop":
                    reasons[b] = "stop"
                else:
                    tokens[b].append(tok)
        outs = [GenerateOutput(text=self.tokenizer.decode(t, skip_special_tokens=True),
                               token_ids=t, finish_reason=r,
                               usage=Usage(len(x), len(t) + (r == "stop")))
                for t, r, x in zip(tokens, reasons, inputs)]
        return outs if batched else outs[0]

    def stream(self, messages: Conversation, *, max_new_tokens: int = 1024,
               sampling: SamplingParams | None = None,
               talker_sampling: SamplingParams | None = None, speaker: str | None = None,
               return_audio: bool | None = None, max_audio_frames: int | None = None,
               use_audio_in_video: bool = False, seed: int | None = None,
               **template_kwargs: Any) -> Iterator[TextDelta | Finished]:
        """Yield TextDelta events as text is decoded, then one Finished event."""
        if _is_batch(messages):
            raise ValueError("stream() takes one conversation; use generate() for a batch")
        self._check_audio_request(return_audio, speaker)
        inputs = self.process(messages, use_audio_in_video, **template_kwargs)
        sampler = self._sampler(sampling, seed, 1)
        decoder = StreamDecoder(self.tokenizer)
        pending: list[int] = []
        n, reason = 0, "length"
        for step in generate_tokens(self.model.thinker, [inputs], sampler, max_new_tokens,
                                    self._stop_ids()):
            tok = int(step.tokens[0])
            n += 1
            if step.reasons[0] == "stop":
                reason = "stop"
                break
            pending.append(tok)
            text = decoder.push([tok])
            if text:
                yield TextDelta(text, pending)
                pending = []
        tail = decoder.flush()
        if tail or pending:
            yield TextDelta(tail, pending)
        yield Finished(reason, Usage(len(inputs), n))

    # -- helpers --------------------------------------------------------------------------------

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

    def _check_audio_request(self, return_audio: bool | None, speaker: str | None) -> None:
        if return_audio and not self.model.audio_output:
            raise ValueError("speech output is not available: this model was loaded without a "
                             "talker (audio_output=False, or a thinker-only checkpoint)")


def _is_batch(messages: Any) -> bool:
    return (isinstance(messages, Sequence) and len(messages) > 0
            and isinstance(messages[0], Sequence) and not isinstance(messages[0], (str, Mapping)))
