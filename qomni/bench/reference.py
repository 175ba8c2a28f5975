"""The reference's side of the benchmark: the same checkpoint and prompts through transformers'
`Qwen3OmniMoeForConditionalGeneration.generate`. The only module of qomni that imports
transformers (a test extra, never a runtime dependency).

Inputs come from qomni's processor (equal to transformers' own, see the parity tests). The
reference cannot stream, so its stages are taken with forward hooks on one
`generate(return_audio=True)`, and its time to first audio is that call's wall time. Also the
reference's greedy thinker ids, which `--vs-vllm` checks both engines against.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

from qomni.bench.floors import (
    CallTimer,
    best_calibration,
    calibrate,
    fastest,
    peak_rss_gib,
    stage,
    timed,
)
from qomni.bench.setup import (
    GREEDY_TALKER,
    TEXT_CONVERSATION,
    Load,
    Settings,
    log,
    media_conversation,
    random_codes,
)
from qomni.config import OmniConfig
from qomni.loading import resolve_device, resolve_dtype
from qomni.multimodal.processor import ProcessedInputs, Processor
from qomni.omni import DEFAULT_SPEAKER


def _transformers() -> Any:
    """The transformers package, or a clear error: it is a test extra, not a dependency."""
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError(f"comparing with the reference needs transformers, a test extra "
                           f"({e}): pip install 'qomni[test]'") from None
    return transformers


def hf_inputs(x: ProcessedInputs, device: torch.device, batch: int = 1) -> dict[str, Any]:
    """transformers' generate() inputs from qomni's processor output. `batch` > 1 repeats a
    text-only prompt."""
    ids = x.input_ids[None].expand(batch, -1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    media = x.media
    if batch > 1 and (media.audio_features is not None or media.pixel_values is not None):
        raise ValueError("batched transformers inputs are text-only here")
    if media.audio_features is not None:
        lengths = media.audio_lengths.tolist()
        feats = media.audio_features.new_zeros(len(lengths), media.audio_features.shape[0],
                                               max(lengths))
        mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        for i, chunk in enumerate(media.audio_features.split(lengths, dim=-1)):
            feats[i, :, : chunk.shape[-1]] = chunk
            mask[i, : chunk.shape[-1]] = 1
        out |= {"input_features": feats, "feature_attention_mask": mask}
    if media.pixel_values is not None:
        out |= {"pixel_values": media.pixel_values, "image_grid_thw": media.image_grid_thw}
    return {k: v.to(device) for k, v in out.items()}


def _generate(model: Any, inputs: dict[str, Any], tokens: int, frames: int) -> Any:
    return model.generate(**inputs, speaker=DEFAULT_SPEAKER, return_audio=True,
                          thinker_max_new_tokens=tokens, thinker_do_sample=False,
                          talker_max_new_tokens=frames + 1,  # its cap counts the EOS step
                          talker_do_sample=False,
                          talker_repetition_penalty=GREEDY_TALKER.repetition_penalty)


def _samples(wavs: Any) -> int:
    return sum(w.shape[-1] for w in wavs) if isinstance(wavs, list) else wavs.shape[-1]


def _speech_run(model: Any, inputs: dict[str, Any], settings: Settings, sample_rate: int,
                stages: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One multimodal speaking generate(); its stages timed by forward hooks."""
    parts = {"prefill": model.thinker, "audio_encoder": model.thinker.model.audio_tower,
             "vision_encoder": model.thinker.model.visual, "talker_call": model.talker,
             "code2wav": model.code2wav}
    with CallTimer(parts, device) as calls:
        total, (seqs, wavs) = timed(
            lambda: _generate(model, inputs, settings.reply_tokens, settings.reply_frames),
            device)
    tokens = seqs.shape[1] - inputs["input_ids"].shape[1]
    frames = len(calls.calls["talker_call"]) - 1  # each call after the prefill ends a frame
    # A decode step's cost, generate()'s own work included, is the time from one forward call
    # to the next (the first call is the prefill).
    decode = float(median(np.diff(calls.starts["prefill"][1:])))
    frame = float(median(np.diff(calls.starts["talker_call"][1:])))
    stages["prefill"] = stage(calls.calls["prefill"][0][0], inputs["input_ids"].shape[1], "tok")
    stages["audio_encoder"] = stage(calls.seconds("audio_encoder"))
    stages["vision_encoder"] = stage(calls.seconds("vision_encoder"))
    stages["thinker_decode"] = stage(decode * (tokens - 1), tokens - 1, "tok")
    stages["talker_prefill"] = stage(calls.calls["talker_call"][0][0])
    stages["talker"] = stage(frame * frames, frames, "frames")
    # no streaming: the first audio sample exists when generate() returns
    return {"time_to_first_audio_s": total, "total_s": total, "tokens": tokens, "frames": frames,
            "audio_s": _samples(wavs) / sample_rate, "code2wav_s": calls.seconds("code2wav")}


def bench_transformers(path: str | Path, settings: Settings, load: Load) -> dict[str, Any]:
    """The same measurements through transformers' reference implementation (in this process)."""
    transformers = _transformers()
    dev = resolve_device(load.device)
    dt = resolve_dtype(load.dtype, dev)
    model = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        path, dtype=dt).to(dev).eval()
    # A bug of the reference: its talker reads audio_config, which only the thinker's config
    # has (audio together with an image crashes without this).
    model.talker.config.audio_config = model.config.thinker_config.audio_config
    log(f"transformers {transformers.__version__}: loaded on {dev} as {dt}; calibrating")
    calib = calibrate(dev, dt)
    cfg = OmniConfig.from_hf(Path(path))
    sample_rate = cfg.code2wav.sample_rate
    processor = Processor(path, cfg)
    text = processor(TEXT_CONVERSATION)
    stages: dict[str, Any] = {}
    with torch.inference_mode():
        _generate(model, hf_inputs(text, dev), 2, 2)  # warm-up
        log("transformers: one multimodal generate(return_audio=True)")
        inputs = hf_inputs(processor(media_conversation(settings)), dev)
        e2e = _speech_run(model, inputs, settings, sample_rate, stages, dev)
        log("transformers: code2wav")
        codes = random_codes(cfg, settings.code2wav_frames, dev)
        seconds, wav = fastest(partial(model.code2wav.chunked_decode, codes, chunk_size=300,
                                       left_context_size=25), dev)
        stages["code2wav_full"] = stage(seconds, wav.shape[-1] / sample_rate, "audio s")
        throughput = []
        for batch in settings.batches:
            log(f"transformers: speech throughput at batch {batch}")
            run = partial(_generate, model, hf_inputs(text, dev, batch),
                          settings.decode_tokens, settings.e2e_frames)
            wall, (_, wavs) = timed(run, dev)
            throughput.append({"batch": batch, "wall_s": wall,
                               "audio_s": _samples(wavs) / sample_rate})
    calib = best_calibration(calib, calibrate(dev, dt))
    return {"backend": "transformers", "version": transformers.__version__, "device": str(dev),
            "dtype": str(dt).removeprefix("torch."), "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "calibration": calib,
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "stages": stages, "e2e": e2e,
            "throughput": throughput, "peak_rss_gib": peak_rss_gib(),
            "load_average_after": os.getloadavg()[0]}


def greedy_thinker_ids(path: str, prompt_ids: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """transformers' greedy thinker ids in float32, one prompt at a time, EOS ignored."""
    transformers = _transformers()
    model = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, enable_audio_output=False).eval()
    thinker = model.thinker
    thinker.generation_config.eos_token_id = None  # no stop token: new_tokens every time
    ids = []
    with torch.inference_mode():
        for prompt in prompt_ids:
            x = torch.tensor([prompt])
            out = thinker.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                   max_new_tokens=new_tokens, do_sample=False)
            ids.append(out[0, x.shape[1]:].tolist())
    return {"backend": "transformers", "version": transformers.__version__, "token_ids": ids}
