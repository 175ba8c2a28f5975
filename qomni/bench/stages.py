"""qomni's side of the benchmark: every stage timed against its floor, then the engine end to end.

Stage rows time the model calls the engine makes, in a plain batch-1 loop: one-shot stages
(prefill, code2wav) report the best of REPEATS runs after a warm-up that also counts their
FLOPs; step loops (decode, talker frames) report the median step. The end-to-end rows (time to
first audio, a spoken turn, speech throughput) go through `Omni.stream` / `Omni.generate`, i.e.
the engine.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

import torch

from qomni.bench.floors import (
    REPEATS,
    CallTimer,
    best_calibration,
    calibrate,
    fastest,
    flop_counter,
    kv_bytes,
    param_count,
    peak_rss_gib,
    set_floors,
    stage,
    timed,
    weight_bytes,
)
from qomni.bench.setup import (
    CHUNK,
    FIRST_CHUNK,
    GREEDY_TALKER,
    TEXT_CONVERSATION,
    Load,
    Settings,
    log,
    media_conversation,
    random_codes,
    spoken_turn,
)
from qomni.engine.config import EngineConfig
from qomni.engine.prefill import Prefill, prefill
from qomni.engine.speech import build_talker_prompt, special_embeds, thinker_embeds
from qomni.events import AudioChunk, TextDelta
from qomni.models.code2wav_stream import StreamingCode2Wav
from qomni.models.model import OmniModel
from qomni.models.rope import decode_positions
from qomni.multimodal.processor import ProcessedInputs
from qomni.omni import DEFAULT_SPEAKER, Omni
from qomni.weights import release_free_memory

Stages = dict[str, dict[str, Any]]


def _prefill_stages(model: OmniModel, inputs: ProcessedInputs, settings: Settings,
                    stages: Stages) -> tuple[Prefill, torch.Tensor]:
    """The prompt through the encoders and the thinker (capturing the talker's layer), and its
    first token [1]; the cache keeps room for the decode steps."""
    thinker = model.thinker
    device = thinker.lm_head.weight.device
    capture = model.cfg.talker.accept_hidden_layer if model.audio_output else None

    def run() -> tuple[Prefill, torch.Tensor]:
        pre = prefill(thinker, [inputs], settings.decode_tokens + 2, capture)
        return pre, thinker.logits(pre.hidden[:, -1]).argmax(-1)

    parts = {"audio_encoder": thinker.audio_tower, "vision_encoder": thinker.visual,
             "thinker_lm": thinker}
    counter = flop_counter()
    with counter, CallTimer(parts, device, counter) as counted:
        run()  # warm-up, counting FLOPs
    best = None
    for _ in range(REPEATS):
        with CallTimer(parts, device) as timer:
            seconds, out = timed(run, device)
        if best is None or seconds < best[0]:
            best = seconds, timer, out
    seconds, timer, out = best
    stages["prefill"] = stage(seconds, len(inputs), "tok", flops=counter.get_total_flops())
    for name in parts:
        stages[name] = stage(timer.seconds(name), flops=counted.total_flops(name))
    return out


def _decode_stage(model: OmniModel, inputs: ProcessedInputs, pre: Prefill, token: torch.Tensor,
                  steps: int, stages: Stages) -> None:
    thinker = model.thinker
    device = thinker.lm_head.weight.device
    ones = torch.ones(1, dtype=torch.long, device=device)

    def step(tok: torch.Tensor) -> torch.Tensor:
        pos = decode_positions(pre.cache.lengths, inputs.rope_delta)
        hidden, _ = thinker(thinker.embed(tok[:, None]), pos, pre.cache, ones)
        return thinker.logits(hidden[:, 0]).argmax(-1)

    token = step(token)  # warm-up
    times = []
    layers = thinker.model.layers
    with _layer_timer(layers, device) as timer:
        for _ in range(steps):
            seconds, token = timed(partial(step, token), device)
            times.append(seconds)
    kv = kv_bytes(model.cfg.thinker.text, len(inputs) + steps / 2,
                  thinker.lm_head.weight.element_size())
    per_step = weight_bytes(thinker.model) + weight_bytes(thinker.lm_head) + kv
    stages["thinker_decode"] = stage(median(times) * steps, steps, "tok",
                                     bytes_read=per_step * steps)
    stages["thinker_decode_layer"] = _layer_row(timer, layers, steps, "tok", kv)


def _layer_timer(layers: torch.nn.ModuleList, device: torch.device) -> CallTimer:
    return CallTimer({str(i): layer for i, layer in enumerate(layers)}, device)


def _layer_row(timer: CallTimer, layers: torch.nn.ModuleList, steps: int, unit: str,
               kv: float) -> dict[str, Any]:
    """One decoder layer's share of a step (the median step's layers ÷ their count), against
    one layer's bytes: what compares across depths (a shallow and the full-depth model) and
    across dtypes without the embeddings and heads. `timer` saw the last `steps` steps."""
    n = len(layers)
    calls = [timer.calls[str(i)][-steps:] for i in range(n)]
    per_step = [sum(c[s][0] for c in calls) for s in range(steps)]
    per_layer = (weight_bytes(layers) + kv) / n
    return stage(median(per_step) / n * steps, steps, unit, bytes_read=per_layer * steps)


def _talker_stages(model: OmniModel, inputs: ProcessedInputs, pre: Prefill, token: torch.Tensor,
                   frames: int, stages: Stages) -> None:
    """The talker's prefill, then frames of (code predictor for the frame's codebooks 1..15,
    talker step for the next frame's codebook 0), as the engine runs them."""
    talker, tcfg = model.talker, model.cfg.talker
    device = talker.codec_head.weight.device
    first = int(token)
    tok = model.cfg.tokens
    pad_bos = tuple(special_embeds(talker, thinker_embeds(model, (tok.tts_pad, tok.tts_bos))))
    prompt = build_talker_prompt(model.cfg, talker, inputs, pre.embeds[0], pre.captured[0],
                                 thinker_embeds(model, [first]).to(device), pad_bos,
                                 tcfg.speaker(DEFAULT_SPEAKER))
    n = prompt.embeds.shape[0]
    cache = talker.new_cache(1, n + frames + 2)
    ones = torch.ones(1, dtype=torch.long, device=device)

    def choose(hidden: torch.Tensor) -> torch.Tensor:
        return talker.code0_logits(hidden).argmax(-1)

    def step(codec_next: torch.Tensor) -> torch.Tensor:
        # the trailing text token, as the engine adds it
        text = special_embeds(talker, thinker_embeds(model, [first]))[0]
        pos = decode_positions(cache.lengths, prompt.rope_delta)
        return talker((codec_next + text)[:, None], pos, cache, ones)[:, 0]

    prefill_s, hidden = timed(lambda: talker(prompt.embeds[None], prompt.positions[:, None],
                                             cache, torch.tensor([n], device=device))[:, -1],
                              device)
    code0 = choose(hidden)
    predictor, steps = [], []
    with _layer_timer(talker.model.layers, device) as timer:
        for frame in range(frames + 1):  # frame 0 is a warm-up
            t1, (_, codec_next) = timed(partial(talker.predict_residuals, hidden, code0), device)
            t2, hidden = timed(partial(step, codec_next), device)
            code0 = choose(hidden)
            if frame:
                predictor.append(t1)
                steps.append(t2)
    cp = talker.code_predictor
    element = talker.codec_head.weight.element_size()
    # every code-predictor step reads all its layers; each codebook's head is read once a frame
    cp_bytes = (tcfg.num_code_groups - 1) * weight_bytes(cp.model.layers) + weight_bytes(cp.lm_head)
    step_bytes = (weight_bytes(talker.model) + weight_bytes(talker.codec_head)
                  + weight_bytes(talker.text_projection)
                  + kv_bytes(tcfg.text, n + frames / 2, element))
    stages["talker_prefill"] = stage(prefill_s, n, "tok")
    stages["talker_step_layer"] = _layer_row(timer, talker.model.layers, frames, "frames",
                                             kv_bytes(tcfg.text, n + frames / 2, element))
    both = [a + b for a, b in zip(predictor, steps)]
    stages["talker"] = stage(median(both) * frames, frames, "frames",
                             bytes_read=(cp_bytes + step_bytes) * frames)
    stages["code_predictor"] = stage(median(predictor) * frames, frames, "frames",
                                     bytes_read=cp_bytes * frames)
    stages["talker_step"] = stage(median(steps) * frames, frames, "frames",
                                  bytes_read=step_bytes * frames)


def _code2wav_stages(model: OmniModel, frames: int, stages: Stages) -> None:
    c2w = model.code2wav
    device = c2w.code_embedding.weight.device
    codes = random_codes(model.cfg, frames, device)
    rate = model.cfg.code2wav.sample_rate

    def stream() -> int:
        vocoder, done, size, samples = StreamingCode2Wav(c2w), 0, FIRST_CHUNK, 0
        while done < frames:
            samples += vocoder.push(codes[:, :, done: done + size]).shape[-1]
            done, size = done + size, CHUNK
        return samples

    for name, run in (("code2wav_stream", stream), ("code2wav_full", lambda: c2w(codes).shape[-1])):
        counter = flop_counter()
        with counter, torch.inference_mode():
            run()  # warm-up, counting FLOPs
        with torch.inference_mode():
            seconds, samples = fastest(run, device)
        stages[name] = stage(seconds, samples / rate, "audio s",
                             flops=counter.get_total_flops())


def _first_audio(omni: Omni, conversation: list, settings: Settings, to_end: bool = False,
                 **options: Any) -> dict[str, float]:
    """One long spoken reply through Omni.stream: times from the call to the first text and the
    first audio chunk. The stream is closed there (which aborts the request: the rest of the
    reply is what the throughput runs measure), or with `to_end` read to its end: then also the
    whole turn's wall time and speech, and their real-time factor (wall ÷ speech)."""
    stream = omni.stream(conversation, max_new_tokens=settings.reply_tokens,
                         max_audio_frames=settings.reply_frames, talker_sampling=GREEDY_TALKER,
                         speaker=DEFAULT_SPEAKER, **options)
    rate = omni.config.code2wav.sample_rate
    out: dict[str, float] = {}
    first_text, samples = None, 0
    start = time.perf_counter()
    for event in stream:
        now = time.perf_counter() - start
        if isinstance(event, TextDelta) and first_text is None:
            first_text = now
        elif isinstance(event, AudioChunk):
            samples += event.pcm.size
            if not out:
                out = {"time_to_first_text_s": first_text, "time_to_first_audio_s": now,
                       "first_chunk_s": event.pcm.size / rate}
                if not to_end:
                    stream.close()
                    return out
    if not out:
        raise RuntimeError("the reply ended without audio")
    wall = time.perf_counter() - start
    return out | {"wall_s": wall, "audio_s": samples / rate, "rtf": wall / (samples / rate)}


def _voice_turn(omni: Omni, settings: Settings) -> dict[str, Any]:
    """End of speech -> first audio for a spoken turn: prefilled whole when it ends, and with
    the conversation and the turn's finished encoder windows prefilled while it was spoken (the
    prefix a realtime session has opened by then). The audio encoder's window cache is emptied
    before each run, so only what was encoded while the turn was spoken is reused."""
    conversation = spoken_turn(settings)
    tower = omni.model.thinker.audio_tower
    size = tower.window_cache.max_windows if tower.window_cache else 0
    tower.cache_windows(size)
    whole = _first_audio(omni, conversation, settings)["time_to_first_audio_s"]
    tower.cache_windows(size)
    audio = conversation[-1]["content"][0]["audio"]
    pre = omni.processor.pre
    windows = omni.processor.finished_audio_windows(audio.size // pre.hop_length)
    spoken = audio[:(windows * omni.processor.audio_window_frames + 2) * pre.hop_length]
    turn = [conversation[0], {"role": "user", "content": [{"type": "audio", "audio": spoken}]}]
    prefix = omni.open_prefix(turn, partial=True) if windows else omni.open_prefix(
        conversation[:1])
    deadline = time.monotonic() + 600
    while not prefix.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("the prefix was never prefilled")
        time.sleep(0.01)
    engine = omni._loop().engine
    cached = engine.cached_tokens
    ahead = _first_audio(omni, conversation, settings, prefix=prefix)["time_to_first_audio_s"]
    return {"prefilled_whole_s": whole, "prefilled_ahead_s": ahead, "prefix_tokens": len(prefix),
            "prompt_tokens": len(omni.process(conversation)), "windows": windows,
            "cached_tokens": engine.cached_tokens - cached}


def _throughput(omni: Omni, batch: int, settings: Settings) -> dict[str, Any]:
    """`batch` speaking requests at once through Omni.generate (the engine batches them)."""
    convs = [TEXT_CONVERSATION] * batch
    wall, outs = timed(lambda: omni.generate(
        convs, max_new_tokens=settings.decode_tokens, max_audio_frames=settings.e2e_frames,
        talker_sampling=GREEDY_TALKER, speaker=DEFAULT_SPEAKER), omni.device)
    audio = sum(o.audio.size for o in outs) / omni.config.code2wav.sample_rate
    return {"batch": batch, "wall_s": wall, "audio_s": audio,
            "frames": sum(int(o.codes.shape[1]) for o in outs)}


def bench_qomni(path: str | Path, settings: Settings, load: Load) -> dict[str, Any]:
    """Every qomni measurement on the checkpoint at `path` (in this process)."""
    load_s = time.perf_counter()
    omni = Omni.load(path, dtype=load.dtype, device=load.device, progress=False,
                     quantization=load.quantization,
                     engine=EngineConfig(max_num_seqs=max(settings.batches),
                                         max_model_len=settings.max_model_len,
                                         first_chunk_frames=FIRST_CHUNK, chunk_frames=CHUNK))
    load_s = time.perf_counter() - load_s
    load_rss = peak_rss_gib()
    dev, model = omni.device, omni.model
    if not model.audio_output:
        raise ValueError(f"{path} has no talker: qomni bench measures speech output too")
    quant = "".join(f", {k} {v}" for k, v in omni.quantization.items())
    log(f"qomni: loaded on {dev} as {omni.dtype}{quant}; calibrating")
    calib = calibrate(dev, omni.dtype)
    if not settings.calibrate_at_end:
        calib = best_calibration(calib, calibrate(dev, omni.dtype))
    conversation = media_conversation(settings)
    processing_s, inputs = timed(lambda: omni.process(conversation), dev)
    stages: Stages = {}
    with torch.inference_mode():
        log(f"qomni: prefill of {len(inputs)} tokens")
        pre, token = _prefill_stages(model, inputs, settings, stages)
        log("qomni: thinker decode")
        _decode_stage(model, inputs, pre, token, settings.decode_tokens, stages)
        log("qomni: talker and code predictor")
        _talker_stages(model, inputs, pre, token, settings.talker_frames, stages)
        del pre
        log("qomni: code2wav")
        _code2wav_stages(model, settings.code2wav_frames, stages)
    release_free_memory()  # what the stage rows freed, before the engine's turn
    log("qomni: end to end (Omni.stream)")
    omni.generate(TEXT_CONVERSATION, max_new_tokens=2, max_audio_frames=2)  # starts the engine
    e2e = _first_audio(omni, conversation, settings, to_end=settings.reply_to_end) | {
        "tokens": settings.reply_tokens, "frames": settings.reply_frames}
    log("qomni: a spoken turn, prefilled whole and while spoken")
    voice = _voice_turn(omni, settings)
    throughput = []
    for batch in settings.batches:
        log(f"qomni: speech throughput at batch {batch}")
        throughput.append(_throughput(omni, batch, settings))
    if settings.calibrate_at_end:
        calib = best_calibration(calib, calibrate(dev, omni.dtype))
    set_floors(stages, calib)
    return {"backend": "qomni", "device": str(dev), "dtype": str(omni.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "params": param_count(model),
            "quantization": omni.quantization, "load_s": load_s,
            "calibration": calib, "prompt_tokens": len(inputs), "processing_s": processing_s,
            "stages": stages, "e2e": e2e, "voice_turn": voice, "throughput": throughput,
            "peak_rss_gib": peak_rss_gib(),
            "peak_rss_load_gib": load_rss, "load_average_after": os.getloadavg()[0]}
